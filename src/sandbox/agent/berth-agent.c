/*
 * berth-agent: the process inside a Berth sandbox that runs commands for the host. Over one
 * connection the host starts commands (argv, env, cwd), feeds their stdin, reads their stdout and
 * stderr, kills them, and learns how they ended. Two drivers use it:
 *
 *   microvm  PID 1 inside the VM (the initramfs /init sets up mounts and modules, then execs it);
 *            the connection is a virtio-serial port, and the agent survives host disconnects
 *            (a VM restored from a snapshot gets a new host connection).
 *   bwrap    `berth-agent --stdio` is the sandbox's init command; the connection is its stdin and
 *            stdout. It already runs as the sandbox user under the seccomp filter, and every
 *            command it forks inherits both, its namespaces and its cgroup, so running a command
 *            costs a frame and a fork instead of a host process entering the namespaces. The
 *            stdin pipe is also the sandbox's lifeline: when the host end closes (Berth exited
 *            or was killed), the agent exits and the kernel ends everything in the sandbox.
 *
 * Why C and not a shell loop: one process must multiplex many commands' pipes, cap output while
 * still draining it, kill whole process trees, and reap orphans. A shell cannot do that
 * correctly. Built with `gcc -static -Os` (no libc needed where it runs).
 *
 * A third mode, `berth-agent --bridge PORT SOCKET`, is the bwrap sandbox's only way out: it
 * listens on 127.0.0.1:PORT inside the sandbox's network namespace (which has nothing but
 * loopback) and relays each connection to the unix socket SOCKET, the session's egress proxy,
 * bound into the sandbox by the host. HTTP_PROXY and HTTPS_PROXY point at it. The gvisor driver
 * runs the same bridge as its container's init.
 *
 * A fourth, `berth-agent --egress-port NAME PORT`, is the microvm's way out: the VM has no network
 * device, so it listens on 127.0.0.1:PORT and carries each connection over the virtio-serial port
 * NAME, where the driver opens one connection to the session's egress proxy per connection here.
 * Frames as below, id = the connection: OPEN, DATA, END (no more data from the sender), CLOSE, and
 * ACK (payload: u32 bytes the receiver has written on). A sender keeps at most EGRESS_WINDOW bytes
 * unacknowledged per connection, so neither side buffers more than that for a reader that stalls,
 * and one stalled connection never holds up the others.
 *
 * Wire format, both directions: a 9-byte header (u8 type, u32 id, u32 payload length, all
 * little-endian) and the payload. `id` names a command chosen by the host; 0 is the agent itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <linux/fs.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

/* Host to guest. */
enum { MSG_INIT = 1, MSG_START = 2, MSG_STDIN = 3, MSG_STDIN_EOF = 4, MSG_KILL = 5 };
/* Guest to host. */
enum { MSG_READY = 10, MSG_STDOUT = 11, MSG_STDERR = 12, MSG_EXIT = 13, MSG_ERROR = 14 };

#define SANDBOX_UID 1000
#define MAX_PROCESSES 256
#define MAX_FRAME (16 * 1024 * 1024)
/* After a command's direct child exits, how long its pipes may stay open (a background `sleep &`
 * holds them forever). Same as the host-side drivers. */
#define DRAIN_GRACE_MS 100
#define CGROUP_ROOT "/sys/fs/cgroup/sandbox"
#define PORT_NAME "berth.agent"

struct process {
  int used;
  uint32_t id;
  pid_t pid;
  int stdin_fd, stdout_fd, stderr_fd;
  /* Bytes the host sent for stdin that the command has not read yet. */
  char *pending;
  size_t pending_length, pending_offset;
  int stdin_eof;
  /* Output cap per stream (0: none), bytes forwarded so far, and whether any were dropped. */
  uint64_t cap, stdout_sent, stderr_sent;
  int truncated;
  int exited, status;
  long long exited_at_ms;
  char cgroup[96];
};

static struct process processes[MAX_PROCESSES];
/* The host connection: one fd both ways for the VM's port, stdin and stdout with --stdio. */
static int port_fd = -1;
static int output_fd = -1;
static int port_connected = 1;
/* --stdio: the bwrap driver's mode (see the top of this file). */
static int stdio_mode;
/* When the host last hung up; the port is read again after SIGIO or a 1 s re-check. */
static long long hangup_at_ms;
static unsigned long command_counter;
extern char **environ;

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Writes all of buffer to a blocking fd. The host always reads, so this cannot deadlock. */
static void write_all(int fd, const void *buffer, size_t length) {
  const char *cursor = buffer;
  while (length > 0) {
    ssize_t written = write(fd, cursor, length);
    if (written < 0) {
      if (errno == EINTR || errno == EAGAIN) {
        struct pollfd wait_for = {fd, POLLOUT, 0};
        poll(&wait_for, 1, 100);
        continue;
      }
      return; /* Host gone; the next connection starts afresh. */
    }
    cursor += written;
    length -= (size_t)written;
  }
}

static void send_frame(uint8_t type, uint32_t id, const void *payload, uint32_t length) {
  char header[9];
  header[0] = (char)type;
  memcpy(header + 1, &id, 4);
  memcpy(header + 5, &length, 4);
  write_all(output_fd, header, sizeof header);
  if (length > 0) write_all(output_fd, payload, length);
}

static void send_text(uint8_t type, uint32_t id, const char *text) {
  send_frame(type, id, text, (uint32_t)strlen(text));
}

static int write_file(const char *path, const char *text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t written = write(fd, text, strlen(text));
  close(fd);
  return written < 0 ? -1 : 0;
}

static int set_nonblocking(int fd) {
  return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Finds the virtio-serial port the host named `port_name` and opens it. */
static int open_port(const char *port_name) {
  for (int attempt = 0; attempt < 500; attempt++) {
    DIR *directory = opendir("/sys/class/virtio-ports");
    struct dirent *entry;
    while (directory && (entry = readdir(directory)) != NULL) {
      if (entry->d_name[0] == '.') continue;
      char path[300], name[64] = {0};
      snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", entry->d_name);
      int fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd < 0) continue;
      ssize_t length = read(fd, name, sizeof name - 1);
      close(fd);
      if (length > 0 && strncmp(name, port_name, strlen(port_name)) == 0) {
        snprintf(path, sizeof path, "/dev/%s", entry->d_name);
        closedir(directory);
        return open(path, O_RDWR | O_CLOEXEC);
      }
    }
    if (directory) closedir(directory);
    usleep(10000);
  }
  return -1;
}

static struct process *find_process(uint32_t id) {
  for (int index = 0; index < MAX_PROCESSES; index++)
    if (processes[index].used && processes[index].id == id) return &processes[index];
  return NULL;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

#define MAX_TREE 4096

/* Parent pid of `pid` from /proc (0 when it is gone). */
static pid_t parent_of(pid_t pid) {
  char path[64], text[512];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t length = read(fd, text, sizeof text - 1);
  close(fd);
  if (length <= 0) return 0;
  text[length] = '\0';
  /* "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it. */
  char *end = strrchr(text, ')');
  int parent = 0;
  char state;
  if (!end || sscanf(end + 1, " %c %d", &state, &parent) != 2) return 0;
  return (pid_t)parent;
}

/*
 * Stops, then kills, `root` and every descendant, including ones that left its session or
 * process group (setsid). Stopped processes cannot fork, so the tree is collected again until
 * no new member appears; then everything gets SIGKILL. Used where commands have no cgroup of
 * their own (a bwrap sandbox); the pid namespace is the sandbox's, so /proc is small.
 */
static void kill_tree(pid_t root) {
  static pid_t members[MAX_TREE];
  int count = 0, grew = 1;
  members[count++] = root;
  kill(root, SIGSTOP);
  for (int round = 0; grew && round < 64; round++) {
    grew = 0;
    DIR *proc = opendir("/proc");
    struct dirent *entry;
    while (proc && (entry = readdir(proc)) != NULL) {
      pid_t pid = (pid_t)atoi(entry->d_name);
      if (pid <= 1 || pid == getpid()) continue;
      int known = 0;
      for (int index = 0; index < count && !known; index++) known = members[index] == pid;
      if (known) continue;
      pid_t parent = parent_of(pid);
      for (int index = 0; index < count; index++) {
        if (members[index] == parent && count < MAX_TREE) {
          members[count++] = pid;
          kill(pid, SIGSTOP);
          grew = 1;
          break;
        }
      }
    }
    if (proc) closedir(proc);
  }
  for (int index = 0; index < count; index++) kill(members[index], SIGKILL);
}

/* Kills everything a command started, even processes that left its session (setsid). */
static void kill_process(struct process *process) {
  if (process->cgroup[0]) {
    char path[128];
    snprintf(path, sizeof path, "%s/cgroup.kill", process->cgroup);
    write_file(path, "1");
  }
  if (!process->exited) {
    if (!process->cgroup[0]) kill_tree(process->pid);
    kill(-process->pid, SIGKILL), kill(process->pid, SIGKILL);
  }
  process->pending_length = process->pending_offset = 0;
  close_fd(&process->stdin_fd);
}

/* Cgroups of finished commands that still held background processes when they ended. */
static char *stale_cgroups[1024];
static int stale_cgroup_count;

static void remove_stale_cgroups(void) {
  int kept = 0;
  for (int index = 0; index < stale_cgroup_count; index++) {
    if (rmdir(stale_cgroups[index]) == 0 || errno == ENOENT) free(stale_cgroups[index]);
    else stale_cgroups[kept++] = stale_cgroups[index];
  }
  stale_cgroup_count = kept;
}

static void finish_process(struct process *process) {
  close_fd(&process->stdin_fd);
  close_fd(&process->stdout_fd);
  close_fd(&process->stderr_fd);
  char payload[9];
  int32_t exit_code = WIFEXITED(process->status) ? WEXITSTATUS(process->status) : -1;
  int32_t signal_number = WIFSIGNALED(process->status) ? WTERMSIG(process->status) : 0;
  memcpy(payload, &exit_code, 4);
  memcpy(payload + 4, &signal_number, 4);
  payload[8] = (char)process->truncated;
  send_frame(MSG_EXIT, process->id, payload, sizeof payload);
  if (process->cgroup[0] && rmdir(process->cgroup) != 0 && stale_cgroup_count < 1024)
    stale_cgroups[stale_cgroup_count++] = strdup(process->cgroup);
  free(process->pending);
  memset(process, 0, sizeof *process);
}

/* Reads a little-endian u32 from the payload, advancing the cursor; -1 when it runs out. */
static int take_u32(const char **cursor, const char *end, uint32_t *value) {
  if (end - *cursor < 4) return -1;
  memcpy(value, *cursor, 4);
  *cursor += 4;
  return 0;
}

/* START payload: u32 cap, u32 argc, u32 envc, then NUL-terminated cwd, argv..., env... */
static void start_process(uint32_t id, const char *payload, uint32_t length) {
  const char *cursor = payload, *end = payload + length;
  uint32_t cap, argc, envc;
  if (take_u32(&cursor, end, &cap) || take_u32(&cursor, end, &argc) || take_u32(&cursor, end, &envc) ||
      argc == 0 || argc > 65536 || envc > 65536 || find_process(id)) {
    send_text(MSG_ERROR, id, "malformed or duplicate start request");
    return;
  }
  char **strings = calloc(argc + envc + 3, sizeof(char *));
  for (uint32_t index = 0; index < 1 + argc + envc; index++) {
    const char *terminator = memchr(cursor, '\0', (size_t)(end - cursor));
    if (!terminator) {
      free(strings);
      send_text(MSG_ERROR, id, "malformed start request");
      return;
    }
    strings[index] = (char *)cursor;
    cursor = terminator + 1;
  }
  const char *cwd = strings[0];
  char **argv = strings + 1;
  /* argv is NULL-terminated by moving env one slot on. */
  char **env = strings + 1 + argc + 1;
  memmove(env, strings + 1 + argc, envc * sizeof(char *));
  argv[argc] = NULL;
  env[envc] = NULL;

  struct process *process = NULL;
  for (int index = 0; index < MAX_PROCESSES && !process; index++)
    if (!processes[index].used) process = &processes[index];
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
  if (!process || pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
    for (int index = 0; index < 2; index++) close_fd(&in[index]), close_fd(&out[index]), close_fd(&err[index]);
    free(strings);
    send_text(MSG_ERROR, id, process ? "cannot create pipes" : "too many commands running");
    return;
  }
  memset(process, 0, sizeof *process);
  process->used = 1;
  process->id = id;
  process->cap = cap;
  /* A cgroup per command in the VM; a bwrap sandbox's commands share the sandbox's cgroup. */
  if (!stdio_mode) {
    snprintf(process->cgroup, sizeof process->cgroup, "%s/command-%lu", CGROUP_ROOT, ++command_counter);
    if (mkdir(process->cgroup, 0755) != 0) process->cgroup[0] = '\0';
  }

  pid_t pid = fork();
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    if (process->cgroup[0]) {
      char path[128];
      snprintf(path, sizeof path, "%s/cgroup.procs", process->cgroup);
      /* Joining fails when the sandbox's pids limit is reached: then do not run at all. */
      if (write_file(path, "0") != 0) {
        dprintf(err[1], "berth: cannot start the command: %s\n", strerror(errno));
        _exit(126);
      }
    }
    setsid();
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    /* In the VM the agent is root; under bwrap it is the sandbox user already. */
    if (getuid() == 0 && (setgroups(0, NULL) || setgid(SANDBOX_UID) || setuid(SANDBOX_UID))) _exit(126);
    if (chdir(cwd) != 0) {
      dprintf(2, "berth: cannot change directory to %s: %s\n", cwd, strerror(errno));
      _exit(1);
    }
    /* execvp searches the PATH of the current environment, so the command's own PATH applies. */
    environ = env;
    execvp(argv[0], argv);
    dprintf(2, "%s: %s\n", argv[0], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
  }
  close(in[0]);
  close(out[1]);
  close(err[1]);
  free(strings);
  process->stdin_fd = in[1];
  process->stdout_fd = out[0];
  process->stderr_fd = err[0];
  set_nonblocking(in[1]);
  set_nonblocking(out[0]);
  set_nonblocking(err[0]);
  if (pid < 0) {
    process->exited = 1;
    process->status = 127 << 8;
    process->exited_at_ms = now_ms();
    return;
  }
  process->pid = pid;
}

/* Writes as much queued stdin as the pipe takes; closes it once the host said EOF. */
static void flush_stdin(struct process *process) {
  while (process->stdin_fd >= 0 && process->pending_offset < process->pending_length) {
    ssize_t written = write(process->stdin_fd, process->pending + process->pending_offset,
                            process->pending_length - process->pending_offset);
    if (written < 0) {
      if (errno == EAGAIN) return;
      /* EPIPE: the command stopped reading; drop the rest. */
      process->pending_offset = process->pending_length;
      close_fd(&process->stdin_fd);
      break;
    }
    process->pending_offset += (size_t)written;
  }
  if (process->pending_offset == process->pending_length) {
    process->pending_offset = process->pending_length = 0;
    if (process->stdin_eof) close_fd(&process->stdin_fd);
  }
}

/* Forwards what a command wrote, keeping at most `cap` bytes per stream and draining the rest. */
static void forward_output(struct process *process, int *fd, uint8_t type, uint64_t *sent) {
  char buffer[65536];
  for (int round = 0; round < 16; round++) {
    ssize_t length = read(*fd, buffer, sizeof buffer);
    if (length < 0 && errno == EAGAIN) return;
    if (length <= 0) {
      close_fd(fd);
      return;
    }
    uint64_t keep = (uint64_t)length;
    if (process->cap > 0) {
      uint64_t room = process->cap > *sent ? process->cap - *sent : 0;
      if (keep > room) keep = room, process->truncated = 1;
    }
    if (keep > 0) send_frame(type, process->id, buffer, (uint32_t)keep);
    *sent += keep;
  }
}

static int workspace_mounted;

static int chown_entry(const char *path, const struct stat *stats, int flag, struct FTW *walk) {
  (void)stats, (void)flag, (void)walk;
  lchown(path, SANDBOX_UID, SANDBOX_UID);
  return 0;
}

/*
 * INIT payload: u64 wall-clock ms, u32 pids limit, u32 flags (1: mount the workspace disk,
 * 2: give its files to the sandbox user), 32 random bytes. Sent on every new connection: a VM
 * restored from a shared template snapshot must not keep the template's clock or entropy.
 */
static void handle_init(const char *payload, uint32_t length) {
  if (length < 48) {
    send_text(MSG_ERROR, 0, "malformed init request");
    return;
  }
  uint64_t wall_ms;
  uint32_t pids, flags;
  memcpy(&wall_ms, payload, 8);
  memcpy(&pids, payload + 8, 4);
  memcpy(&flags, payload + 12, 4);
  struct timeval wall = {(time_t)(wall_ms / 1000), (suseconds_t)(wall_ms % 1000) * 1000};
  settimeofday(&wall, NULL);
  int random_fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
  if (random_fd >= 0) {
    struct {
      int entropy_count, buf_size;
      unsigned char buf[32];
    } entropy = {256, 32, {0}};
    memcpy(entropy.buf, payload + 16, 32);
    ioctl(random_fd, RNDADDENTROPY, &entropy);
    close(random_fd);
  }
  if (pids > 0) {
    char text[32];
    snprintf(text, sizeof text, "%u", pids);
    write_file(CGROUP_ROOT "/pids.max", text);
  }
  if ((flags & 1) && !workspace_mounted) {
    /* The template VM probed this disk before its snapshot; drop what it cached of that image. */
    int disk = open("/dev/vda", O_RDONLY | O_CLOEXEC);
    if (disk >= 0) ioctl(disk, BLKFLSBUF, 0), close(disk);
    /* noinit_itable: the image is a fresh sparse file, its inode tables already read as zeros. */
    if (mount("/dev/vda", "/workspace", "ext4", MS_NOSUID | MS_NODEV, "noinit_itable") != 0) {
      char message[160];
      snprintf(message, sizeof message, "cannot mount the workspace disk: %s", strerror(errno));
      send_text(MSG_ERROR, 0, message);
      return;
    }
    workspace_mounted = 1;
    if (flags & 2) nftw("/workspace", chown_entry, 16, FTW_PHYS | FTW_MOUNT);
  }
  send_text(MSG_READY, 0, "ready");
}

static void handle_frame(uint8_t type, uint32_t id, const char *payload, uint32_t length) {
  struct process *process = find_process(id);
  switch (type) {
  case MSG_INIT:
    handle_init(payload, length);
    break;
  case MSG_START:
    start_process(id, payload, length);
    break;
  case MSG_STDIN:
    if (!process || process->stdin_fd < 0 || length == 0) break;
    process->pending = realloc(process->pending, process->pending_length + length);
    memcpy(process->pending + process->pending_length, payload, length);
    process->pending_length += length;
    flush_stdin(process);
    break;
  case MSG_STDIN_EOF:
    if (!process) break;
    process->stdin_eof = 1;
    flush_stdin(process);
    break;
  case MSG_KILL:
    if (process) kill_process(process);
    break;
  }
}

static void reap_children(void) {
  int status;
  pid_t pid;
  /* As PID 1 we also reap orphans (background processes whose parent exited). */
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    for (int index = 0; index < MAX_PROCESSES; index++) {
      struct process *process = &processes[index];
      if (process->used && !process->exited && process->pid == pid) {
        process->exited = 1;
        process->status = status;
        process->exited_at_ms = now_ms();
      }
    }
  }
  remove_stale_cgroups();
}

/* Copies what `from` has ready to `to`; 0 at end of stream or on an error. */
static int relay_once(int from, int to) {
  char buffer[65536];
  ssize_t length = read(from, buffer, sizeof buffer);
  if (length <= 0) return 0;
  for (ssize_t sent = 0; sent < length;) {
    ssize_t written = write(to, buffer + sent, (size_t)(length - sent));
    if (written <= 0) return 0;
    sent += written;
  }
  return 1;
}

/* One connection: relays both ways until both sides have finished sending. */
static void relay(int client, const char *path) {
  int upstream = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un address = {.sun_family = AF_UNIX};
  strncpy(address.sun_path, path, sizeof address.sun_path - 1);
  if (upstream < 0 || connect(upstream, (struct sockaddr *)&address, sizeof address) != 0) return;
  int client_open = 1, upstream_open = 1;
  while (client_open || upstream_open) {
    struct pollfd fds[2] = {{client, client_open ? POLLIN : 0, 0}, {upstream, upstream_open ? POLLIN : 0, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (client_open && fds[0].revents && !relay_once(client, upstream)) {
      client_open = 0;
      shutdown(upstream, SHUT_WR);
    }
    if (upstream_open && fds[1].revents && !relay_once(upstream, client)) {
      upstream_open = 0;
      shutdown(client, SHUT_WR);
    }
  }
}

static int bridge(int port, const char *path) {
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int yes = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 128) != 0) {
    fprintf(stderr, "berth-agent: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
    return 1;
  }
  /* The host waits for this line before it runs anything in the sandbox. */
  printf("listening\n");
  fflush(stdout);
  /* Connection handlers are reaped by the kernel. */
  signal(SIGCHLD, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  for (;;) {
    int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (client < 0) continue;
    pid_t pid = fork();
    if (pid == 0) {
      close(listener);
      relay(client, path);
      _exit(0);
    }
    close(client);
  }
}

enum { EGRESS_OPEN = 1, EGRESS_DATA = 2, EGRESS_END = 3, EGRESS_CLOSE = 4, EGRESS_ACK = 5 };
#define EGRESS_MAX_CONNECTIONS 64
#define EGRESS_WINDOW (256 * 1024)
#define EGRESS_CHUNK (32 * 1024)

struct egress_connection {
  int used;
  uint32_t id;
  int fd;
  /* The client sent everything (END went to the host); the host did (END came from it). */
  int client_done, host_done;
  /* Host bytes not yet written to the client (at most EGRESS_WINDOW, the host's credit). */
  char *pending;
  size_t pending_length;
  /* Client bytes sent to the host and not yet acknowledged. */
  uint32_t in_flight;
};

static struct egress_connection egress_connections[EGRESS_MAX_CONNECTIONS];
static int egress_port = -1;

static void egress_send(uint8_t type, uint32_t id, const void *payload, uint32_t length) {
  char header[9];
  header[0] = (char)type;
  memcpy(header + 1, &id, 4);
  memcpy(header + 5, &length, 4);
  write_all(egress_port, header, sizeof header);
  if (length > 0) write_all(egress_port, payload, length);
}

static struct egress_connection *egress_find(uint32_t id) {
  for (int index = 0; index < EGRESS_MAX_CONNECTIONS; index++)
    if (egress_connections[index].used && egress_connections[index].id == id) return &egress_connections[index];
  return NULL;
}

/* Forgets a connection, telling the host when it still knows it. */
static void egress_drop(struct egress_connection *connection, int tell_host) {
  if (tell_host) egress_send(EGRESS_CLOSE, connection->id, NULL, 0);
  close(connection->fd);
  free(connection->pending);
  memset(connection, 0, sizeof *connection);
}

/* Writes what the host sent on to the client, acknowledging what was written. */
static void egress_flush(struct egress_connection *connection) {
  while (connection->pending_length > 0) {
    ssize_t written = write(connection->fd, connection->pending, connection->pending_length);
    if (written < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) egress_drop(connection, 1);
      return;
    }
    memmove(connection->pending, connection->pending + written, connection->pending_length - (size_t)written);
    connection->pending_length -= (size_t)written;
    uint32_t acknowledged = (uint32_t)written;
    egress_send(EGRESS_ACK, connection->id, &acknowledged, 4);
  }
  if (connection->host_done) {
    shutdown(connection->fd, SHUT_WR);
    if (connection->client_done) egress_drop(connection, 1);
  }
}

static void egress_frame(uint8_t type, uint32_t id, const char *payload, uint32_t length) {
  struct egress_connection *connection = egress_find(id);
  if (!connection) return; /* Already gone here: the host learns it from our CLOSE. */
  switch (type) {
  case EGRESS_DATA:
    if (connection->host_done || connection->pending_length + length > EGRESS_WINDOW) {
      egress_drop(connection, 1); /* Past its credit: the host broke the protocol. */
      return;
    }
    memcpy(connection->pending + connection->pending_length, payload, length);
    connection->pending_length += length;
    egress_flush(connection);
    break;
  case EGRESS_END:
    connection->host_done = 1;
    egress_flush(connection);
    break;
  case EGRESS_CLOSE:
    egress_drop(connection, 0);
    break;
  case EGRESS_ACK:
    if (length == 4) {
      uint32_t acknowledged;
      memcpy(&acknowledged, payload, 4);
      connection->in_flight -= acknowledged < connection->in_flight ? acknowledged : connection->in_flight;
    }
    break;
  }
}

/* Sends what the client has ready to the host, within the connection's credit. */
static void egress_read_client(struct egress_connection *connection) {
  static char buffer[EGRESS_CHUNK];
  size_t room = EGRESS_WINDOW - connection->in_flight;
  ssize_t length = read(connection->fd, buffer, room < sizeof buffer ? room : sizeof buffer);
  if (length < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (length < 0) {
    egress_drop(connection, 1);
  } else if (length == 0) {
    connection->client_done = 1;
    egress_send(EGRESS_END, connection->id, NULL, 0);
    if (connection->host_done && connection->pending_length == 0) egress_drop(connection, 1);
  } else {
    connection->in_flight += (uint32_t)length;
    egress_send(EGRESS_DATA, connection->id, buffer, (uint32_t)length);
  }
}

static int egress(const char *port_name, int port) {
  signal(SIGPIPE, SIG_IGN);
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int yes = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 128) != 0) {
    fprintf(stderr, "berth-agent: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
    return 1;
  }
  egress_port = open_port(port_name);
  if (egress_port < 0) {
    fprintf(stderr, "berth-agent: no virtio-serial port named %s\n", port_name);
    return 1;
  }
  /* As for the agent's port: SIGIO when the host connects or disconnects (e.g. after a restore). */
  sigset_t handled;
  sigemptyset(&handled);
  sigaddset(&handled, SIGIO);
  sigprocmask(SIG_BLOCK, &handled, NULL);
  int signal_fd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC);
  fcntl(egress_port, F_SETOWN, getpid());
  fcntl(egress_port, F_SETFL, fcntl(egress_port, F_GETFL) | O_ASYNC);
  int connected = 1;
  long long hung_up_at = 0;
  uint32_t next_id = 1;
  size_t input_capacity = 9 + EGRESS_WINDOW, input_length = 0;
  char *input = malloc(input_capacity);

  for (;;) {
    struct pollfd fds[3 + EGRESS_MAX_CONNECTIONS];
    struct egress_connection *owners[3 + EGRESS_MAX_CONNECTIONS];
    if (!connected && now_ms() - hung_up_at >= 1000) connected = 1;
    int count = 0;
    fds[count] = (struct pollfd){signal_fd, POLLIN, 0}, owners[count++] = NULL;
    fds[count] = (struct pollfd){listener, POLLIN, 0}, owners[count++] = NULL;
    if (connected) fds[count] = (struct pollfd){egress_port, POLLIN, 0}, owners[count++] = NULL;
    for (int index = 0; index < EGRESS_MAX_CONNECTIONS; index++) {
      struct egress_connection *connection = &egress_connections[index];
      if (!connection->used) continue;
      short events = 0;
      if (!connection->client_done && connection->in_flight < EGRESS_WINDOW) events |= POLLIN;
      if (connection->pending_length > 0) events |= POLLOUT;
      fds[count] = (struct pollfd){connection->fd, events, 0}, owners[count++] = connection;
    }
    if (poll(fds, (nfds_t)count, connected ? -1 : 1000) < 0) continue;
    for (int index = 0; index < count; index++) {
      if (!fds[index].revents) continue;
      int fd = fds[index].fd;
      struct egress_connection *connection = owners[index];
      if (fd == signal_fd) {
        struct signalfd_siginfo info;
        while (read(signal_fd, &info, sizeof info) > 0) connected = 1;
      } else if (fd == listener) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (client < 0) continue;
        struct egress_connection *slot = NULL;
        for (int free_index = 0; free_index < EGRESS_MAX_CONNECTIONS && connected; free_index++)
          if (!egress_connections[free_index].used) slot = &egress_connections[free_index];
        char *pending = slot ? malloc(EGRESS_WINDOW) : NULL;
        if (!slot || !pending) {
          close(client); /* No host, or too many connections at once: refused. */
          continue;
        }
        *slot = (struct egress_connection){.used = 1, .id = next_id++, .fd = client, .pending = pending};
        egress_send(EGRESS_OPEN, slot->id, NULL, 0);
      } else if (!connection) {
        ssize_t length = read(egress_port, input + input_length, input_capacity - input_length);
        if (length < 0 && errno == EINTR) continue;
        if (length <= 0) {
          /* The host hung up: its connections are gone. Wait for SIGIO or the 1 s re-check. */
          for (int drop = 0; drop < EGRESS_MAX_CONNECTIONS; drop++)
            if (egress_connections[drop].used) egress_drop(&egress_connections[drop], 0);
          connected = 0, input_length = 0, hung_up_at = now_ms();
          continue;
        }
        input_length += (size_t)length;
        size_t offset = 0;
        while (input_length - offset >= 9) {
          uint32_t id, payload_length;
          memcpy(&id, input + offset + 1, 4);
          memcpy(&payload_length, input + offset + 5, 4);
          if (payload_length > EGRESS_WINDOW) {
            input_length = offset = 0; /* Corrupt stream: drop it. */
            break;
          }
          if (input_length - offset < 9 + payload_length) break;
          egress_frame((uint8_t)input[offset], id, input + offset + 9, payload_length);
          offset += 9 + payload_length;
        }
        memmove(input, input + offset, input_length - offset);
        input_length -= offset;
      } else if (connection->used && connection->fd == fd) {
        /* (A slot freed and reused earlier in this round has another fd: its events are stale.) */
        if (fds[index].revents & POLLOUT) egress_flush(connection);
        if (connection->used && connection->fd == fd && (fds[index].events & POLLIN) &&
            (fds[index].revents & (POLLIN | POLLHUP | POLLERR)))
          egress_read_client(connection);
        /* A client that ended its side and then failed or vanished: nothing can reach it now
         * (and poll would report it again at once, for ever). */
        else if (connection->used && connection->fd == fd && connection->client_done &&
                 (fds[index].revents & (POLLHUP | POLLERR)))
          egress_drop(connection, 1);
      }
    }
  }
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "--bridge") == 0) return bridge(atoi(argv[2]), argv[3]);
  if (argc == 4 && strcmp(argv[1], "--egress-port") == 0) return egress(argv[2], atoi(argv[3]));
  stdio_mode = argc > 1 && strcmp(argv[1], "--stdio") == 0;
  sigset_t handled;
  sigemptyset(&handled);
  sigaddset(&handled, SIGCHLD);
  sigaddset(&handled, SIGIO);
  sigprocmask(SIG_BLOCK, &handled, NULL);
  signal(SIGPIPE, SIG_IGN);
  int signal_fd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC);

  if (stdio_mode) {
    /* Nothing but the connection is inherited by commands: close what bwrap left open. */
    for (int fd = 3; fd < 1024; fd++)
      if (fd != signal_fd) close(fd);
    port_fd = 0;
    output_fd = 1;
    fcntl(0, F_SETFD, FD_CLOEXEC);
    fcntl(1, F_SETFD, FD_CLOEXEC);
    send_text(MSG_READY, 0, "ready");
  } else {
    port_fd = open_port(PORT_NAME);
    if (port_fd < 0) {
      fprintf(stderr, "berth-agent: no virtio-serial port named " PORT_NAME "\n");
      return 1;
    }
    output_fd = port_fd;
    /* The port raises SIGIO when the host connects or disconnects (e.g. after a restore). */
    fcntl(port_fd, F_SETOWN, getpid());
    fcntl(port_fd, F_SETFL, fcntl(port_fd, F_GETFL) | O_ASYNC);
  }

  char *input = malloc(MAX_FRAME + 9);
  size_t input_length = 0;

  for (;;) {
    struct pollfd fds[2 + 3 * MAX_PROCESSES];
    struct process *owners[2 + 3 * MAX_PROCESSES];
    if (!port_connected && now_ms() - hangup_at_ms >= 1000) port_connected = 1;
    int count = 0, timeout = port_connected ? -1 : 1000;
    fds[count] = (struct pollfd){signal_fd, POLLIN, 0}, owners[count++] = NULL;
    if (port_connected) fds[count] = (struct pollfd){port_fd, POLLIN, 0}, owners[count++] = NULL;
    long long now = now_ms();
    for (int index = 0; index < MAX_PROCESSES; index++) {
      struct process *process = &processes[index];
      if (!process->used) continue;
      if (process->exited) {
        long long left = process->exited_at_ms + DRAIN_GRACE_MS - now;
        if ((process->stdout_fd < 0 && process->stderr_fd < 0) || left <= 0) {
          finish_process(process);
          continue;
        }
        if (timeout < 0 || left < timeout) timeout = (int)left;
      }
      if (process->stdout_fd >= 0) fds[count] = (struct pollfd){process->stdout_fd, POLLIN, 0}, owners[count++] = process;
      if (process->stderr_fd >= 0) fds[count] = (struct pollfd){process->stderr_fd, POLLIN, 0}, owners[count++] = process;
      if (process->stdin_fd >= 0 && process->pending_length > 0)
        fds[count] = (struct pollfd){process->stdin_fd, POLLOUT, 0}, owners[count++] = process;
    }
    if (poll(fds, (nfds_t)count, timeout) < 0 && errno != EINTR) continue;

    for (int index = 0; index < count; index++) {
      if (!fds[index].revents) continue;
      struct process *process = owners[index];
      int fd = fds[index].fd;
      if (fd == signal_fd) {
        struct signalfd_siginfo info;
        while (read(signal_fd, &info, sizeof info) > 0)
          if (info.ssi_signo == SIGIO) port_connected = 1;
        reap_children();
      } else if (!process) {
        ssize_t length = read(port_fd, input + input_length, MAX_FRAME + 9 - input_length);
        if (length == 0 && stdio_mode) return 0; /* The lifeline closed: the sandbox ends. */
        if (length <= 0) {
          /* The host hung up; wait for SIGIO (or the 1 s re-check) before reading again. */
          if (length == 0 || errno != EINTR) port_connected = 0, input_length = 0, hangup_at_ms = now_ms();
          continue;
        }
        input_length += (size_t)length;
        size_t offset = 0;
        while (input_length - offset >= 9) {
          uint32_t id, payload_length;
          memcpy(&id, input + offset + 1, 4);
          memcpy(&payload_length, input + offset + 5, 4);
          if (payload_length > MAX_FRAME) {
            input_length = offset = 0; /* Corrupt stream: drop it. */
            break;
          }
          if (input_length - offset < 9 + payload_length) break;
          handle_frame((uint8_t)input[offset], id, input + offset + 9, payload_length);
          offset += 9 + payload_length;
        }
        memmove(input, input + offset, input_length - offset);
        input_length -= offset;
      } else if (process->used) {
        if (fd == process->stdout_fd) forward_output(process, &process->stdout_fd, MSG_STDOUT, &process->stdout_sent);
        else if (fd == process->stderr_fd) forward_output(process, &process->stderr_fd, MSG_STDERR, &process->stderr_sent);
        else if (fd == process->stdin_fd) flush_stdin(process);
      }
    }
  }
}
