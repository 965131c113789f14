/*
 * berth-exec: runs one command inside a live Berth bwrap sandbox. It replaces the chain
 * `sh (join cgroup) -> nsenter -> setpriv -> env -> command` with one small static binary:
 *
 *   1. join the sandbox's cgroup (write our pid to each cgroup.procs file);
 *   2. enter the sandbox init's namespaces and root (as host root);
 *   3. fork, so the child is inside the sandbox's pid namespace; the parent waits and
 *      passes on the child's exit status or signal;
 *   4. in the child: drop the capability bounding set, become uid/gid 1000, set
 *      no_new_privs, load the seccomp filter, chdir, and exec the command with exactly
 *      the environment given (nothing is inherited from the server).
 *
 * Processes that enter with setns do not inherit the filter bwrap put on the init, which is
 * why the filter is loaded here. The filter comes from Berth (src/sandbox/seccomp.ts) as hex.
 *
 * Usage (every argument is required; Berth builds this line, it is not a user interface):
 *   berth-exec PID UID GID CWD FILTER_HEX N CGROUP_PROCS_FILE... M NAME=VALUE... -- ARGV...
 *
 * Exit status: the command's, or 125 when berth-exec itself fails (126: command not
 * executable, 127: not found), like env(1).
 *
 * Three more forms do the workspace-disk mounts (workspace-disk.ts) with plain system calls:
 * mount(8) spends most of its ~10 ms in libmount, the kernel needs ~3 ms.
 *   berth-exec --mount-image IMAGE TARGET   loop-attach IMAGE (auto-clear) and mount it (ext4)
 *   berth-exec --bind SOURCE TARGET         bind-mount SOURCE on TARGET
 *   berth-exec --unmount TARGET             unmount TARGET
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/loop.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

/* Must match CGROUP_JOIN_FAILURE in cgroups.ts: the driver looks for it. */
#define CGROUP_JOIN_FAILURE "berth: cannot join the sandbox cgroup"

extern char **environ;

static void die(const char *what, const char *detail) {
  fprintf(stderr, "berth-exec: %s%s%s: %s\n", what, detail ? " " : "", detail ? detail : "", strerror(errno));
  _exit(125);
}

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* Same options as workspace-disk.ts documents for mount(8). */
#define IMAGE_MOUNT_FLAGS (MS_NOSUID | MS_NODEV | MS_NOATIME)
#define IMAGE_MOUNT_DATA "noinit_itable,discard"

static int mount_image(const char *image, const char *target) {
  int file = open(image, O_RDWR | O_CLOEXEC);
  if (file < 0) die("cannot open", image);
  int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (control < 0) die("cannot open", "/dev/loop-control");
  for (int attempt = 0; attempt < 64; attempt++) {
    int number = ioctl(control, LOOP_CTL_GET_FREE);
    if (number < 0) die("no free loop device", NULL);
    char device[32];
    snprintf(device, sizeof device, "/dev/loop%d", number);
    int loop = open(device, O_RDWR | O_CLOEXEC);
    if (loop < 0) die("cannot open", device);
    /* Auto-clear: the device goes away with the last unmount. */
    struct loop_config config = {.fd = (unsigned)file, .info = {.lo_flags = LO_FLAGS_AUTOCLEAR}};
    strncpy((char *)config.info.lo_file_name, image, LO_NAME_SIZE - 1);
    int configured = ioctl(loop, LOOP_CONFIGURE, &config);
    if (configured != 0 && errno == EINVAL) {
      /* Before Linux 5.8: the two-step form. */
      configured = ioctl(loop, LOOP_SET_FD, file);
      if (configured == 0 && ioctl(loop, LOOP_SET_STATUS64, &config.info) != 0) {
        ioctl(loop, LOOP_CLR_FD, 0);
        configured = -1;
      }
    }
    if (configured != 0) {
      close(loop);
      if (errno == EBUSY) continue; /* Someone took this device first. */
      die("cannot attach", device);
    }
    if (mount(device, target, "ext4", IMAGE_MOUNT_FLAGS, IMAGE_MOUNT_DATA) != 0) {
      int failure = errno;
      ioctl(loop, LOOP_CLR_FD, 0);
      errno = failure;
      die("cannot mount", target);
    }
    close(loop);
    return 0;
  }
  fprintf(stderr, "berth-exec: no free loop device after 64 attempts\n");
  return 125;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "--mount-image") == 0) return mount_image(argv[2], argv[3]);
  if (argc == 4 && strcmp(argv[1], "--bind") == 0) {
    if (mount(argv[2], argv[3], NULL, MS_BIND, NULL) != 0) die("cannot bind", argv[3]);
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "--unmount") == 0) {
    if (umount2(argv[2], 0) != 0) die("cannot unmount", argv[2]);
    return 0;
  }
  if (argc < 9) {
    fprintf(stderr, "berth-exec: bad usage (see berth-exec.c)\n");
    return 125;
  }
  int arg = 1;
  const char *pid = argv[arg++];
  uid_t uid = (uid_t)strtoul(argv[arg++], NULL, 10);
  gid_t gid = (gid_t)strtoul(argv[arg++], NULL, 10);
  const char *cwd = argv[arg++];
  const char *hex = argv[arg++];

  /* The filter: hex pairs -> struct sock_filter[] (host byte order, as Berth wrote it). */
  size_t hex_length = strlen(hex);
  if (hex_length == 0 || hex_length % 16 != 0) {
    fprintf(stderr, "berth-exec: bad seccomp filter\n");
    return 125;
  }
  unsigned char *filter = malloc(hex_length / 2);
  if (!filter) die("out of memory", NULL);
  for (size_t i = 0; i < hex_length / 2; i++) {
    int high = hex_value(hex[2 * i]), low = hex_value(hex[2 * i + 1]);
    if (high < 0 || low < 0) {
      fprintf(stderr, "berth-exec: bad seccomp filter\n");
      return 125;
    }
    filter[i] = (unsigned char)(high << 4 | low);
  }
  struct sock_fprog program = {.len = (unsigned short)(hex_length / 16), .filter = (struct sock_filter *)filter};

  /* 1. The cgroup, before anything else runs: children inherit it. */
  int cgroup_files = atoi(argv[arg++]);
  char self[32];
  snprintf(self, sizeof self, "%d\n", (int)getpid());
  for (int i = 0; i < cgroup_files && arg < argc; i++, arg++) {
    int fd = open(argv[arg], O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, self, strlen(self)) < 0) {
      fprintf(stderr, "%s: %s\n", CGROUP_JOIN_FAILURE, argv[arg]);
      return 125;
    }
    close(fd);
  }
  int env_count = arg < argc ? atoi(argv[arg++]) : -1;
  if (env_count < 0 || arg + env_count >= argc || strcmp(argv[arg + env_count], "--") != 0) {
    fprintf(stderr, "berth-exec: bad usage (see berth-exec.c)\n");
    return 125;
  }
  char **env = calloc((size_t)env_count + 1, sizeof *env);
  if (!env) die("out of memory", NULL);
  for (int i = 0; i < env_count; i++) env[i] = argv[arg++];
  arg++; /* "--" */
  char **command = &argv[arg];
  if (!command[0]) {
    fprintf(stderr, "berth-exec: no command\n");
    return 125;
  }

  /*
   * 2. Namespaces. Open them all first (the pid could exit meanwhile; open fds keep them).
   * As host root we may enter the others directly; the user namespace goes last, since
   * entering it first would leave us without rights over the host-owned ones.
   */
  static const char *const names[] = {"cgroup", "ipc", "uts", "net", "pid", "mnt", "user"};
  static const int types[] = {CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWUTS, CLONE_NEWNET,
                              CLONE_NEWPID,    CLONE_NEWNS,  CLONE_NEWUSER};
  int fds[7];
  char path[64];
  for (int i = 0; i < 7; i++) {
    snprintf(path, sizeof path, "/proc/%s/ns/%s", pid, names[i]);
    fds[i] = open(path, O_RDONLY | O_CLOEXEC);
    if (fds[i] < 0) die("cannot open", path);
  }
  snprintf(path, sizeof path, "/proc/%s/root", pid);
  int root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root < 0) die("cannot open", path);
  /* Host root's supplementary groups must not follow us in (the sandbox cannot setgroups). */
  if (setgroups(0, NULL) != 0) die("setgroups", NULL);
  for (int i = 0; i < 6; i++) {
    if (setns(fds[i], types[i]) != 0) die("cannot enter namespace", names[i]);
    close(fds[i]);
  }
  /* The sandbox's root, as the init sees it (setns leaves us at the namespace's root mount). */
  if (fchdir(root) != 0 || chroot(".") != 0) die("cannot enter the sandbox root", NULL);
  close(root);
  if (setns(fds[6], CLONE_NEWUSER) != 0) die("cannot enter namespace", "user");
  close(fds[6]);

  /* 3. A pid namespace applies to children only. */
  pid_t child = fork();
  if (child < 0) die("fork", NULL);
  if (child > 0) {
    int status;
    while (waitpid(child, &status, 0) < 0) {
      if (errno != EINTR) die("waitpid", NULL);
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    /* Die of the same signal, so the caller sees what killed the command. */
    int signal_number = WTERMSIG(status);
    signal(signal_number, SIG_DFL);
    kill(getpid(), signal_number);
    return 128 + signal_number;
  }

  /* 4. Become the sandbox user for good: no capabilities now or after any exec. */
  for (int capability = 0; capability <= 63; capability++) {
    if (prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 && errno == EINVAL) break;
  }
  if (setgid(gid) != 0) die("setgid", NULL);
  if (setuid(uid) != 0) die("setuid", NULL);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", NULL);
  if (chdir(cwd) != 0) die("cannot change directory to", cwd);
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) die("cannot load the seccomp filter", NULL);
  environ = env;
  execvp(command[0], command);
  int failure = errno;
  fprintf(stderr, "berth-exec: %s: %s\n", command[0], strerror(failure));
  _exit(failure == ENOENT ? 127 : 126);
}
