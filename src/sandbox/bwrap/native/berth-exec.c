/*
 * berth-exec: the bwrap driver's root-side helper, one small static binary for the few things
 * that need host root and must be fast.
 *
 * Launching a sandbox (replaces `sh (join cgroup) -> unshare -> sh -> mount -> setpriv`):
 *   berth-exec --launch-sandbox PARENT_PID GATE_FD N CGROUP_PROCS_FILE... WORKDIR UID GID BWRAP ARGS...
 * ties its life to PARENT_PID (the server), joins the cgroup (on cgroup v1 that waits ~10 ms for
 * an RCU grace period, so the host mounts the workspace disk meanwhile and then writes one byte to
 * GATE_FD; -1: no gate), makes a private mount namespace (slave, so the host's unmounts reach it)
 * and a pid namespace, binds WORKDIR on LAUNCH_WORKDIR (bwrap, running as the unprivileged UID,
 * could not reach it where it is), and forks the pid namespace's init, which becomes UID:GID
 * without supplementary groups or capabilities and execs BWRAP. It writes the init's host pid to
 * GATE_FD (a socket) and waits for it, exiting with its status.
 *
 * Why the pid namespace: bwrap arms --die-with-parent only part-way through its set-up (its
 * monitor arms it after cloning the sandbox, and the sandbox waits on the monitor before arming
 * its own), so a server killed in that window left a half-made sandbox behind. Here every process
 * of the sandbox lives in a pid namespace whose init dies with this launcher, which dies with the
 * server, and each link is checked right after it is armed: the kernel then ends the whole
 * namespace, whatever moment the server was killed at.
 * Commands then run through the sandbox's agent (../../agent/berth-agent.c), not through here.
 *
 * Workspace-disk mounts (workspace-disk.ts) with plain system calls: mount(8) spends most of
 * its ~10 ms in libmount, the kernel needs ~3 ms.
 *   berth-exec --mount-image IMAGE TARGET   loop-attach IMAGE (auto-clear) and mount it (ext4)
 *   berth-exec --bind SOURCE TARGET         bind-mount SOURCE on TARGET
 *   berth-exec --move SOURCE TARGET         move the mount at SOURCE to TARGET
 *   berth-exec --unmount TARGET             unmount TARGET
 *
 * Exit status: 0, or 125 when berth-exec itself fails (with the reason on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/loop.h>
#include <poll.h>
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

static void die(const char *what, const char *detail) {
  fprintf(stderr, "berth-exec: %s%s%s: %s\n", what, detail ? " " : "", detail ? detail : "", strerror(errno));
  _exit(125);
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

/* Must match LAUNCHER_WORKDIR in bwrap-driver.ts. */
#define LAUNCH_WORKDIR "/run/berth/workdir"

/* Writes our pid into each cgroup.procs file; false when one cannot be joined. */
static int join_cgroups(char **files, int count) {
  char self[32];
  snprintf(self, sizeof self, "%d\n", (int)getpid());
  for (int i = 0; i < count; i++) {
    int fd = open(files[i], O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, self, strlen(self)) < 0) {
      fprintf(stderr, "%s: %s\n", CGROUP_JOIN_FAILURE, files[i]);
      return 0;
    }
    close(fd);
  }
  return 1;
}

/* True when the other end of `fd` (a pipe or socket) is gone: its last writer exited. */
static int hung_up(int fd) {
  struct pollfd check = {fd, POLLRDHUP, 0};
  return poll(&check, 1, 0) == 1 && (check.revents & (POLLHUP | POLLRDHUP | POLLERR));
}

static int launch(int argc, char **argv) {
  int arg = 2;
  pid_t server = arg < argc ? (pid_t)atoi(argv[arg++]) : 0;
  /* Die with the server; if it died before this line, our parent is already someone else. */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != server) return 125;
  int gate = arg < argc ? atoi(argv[arg++]) : -1;
  int cgroup_files = arg < argc ? atoi(argv[arg++]) : -1;
  if (cgroup_files < 0 || arg + cgroup_files + 4 > argc) {
    fprintf(stderr, "berth-exec: bad usage (see berth-exec.c)\n");
    return 125;
  }
  if (!join_cgroups(&argv[arg], cgroup_files)) return 125;
  arg += cgroup_files;
  if (gate >= 0) {
    /* The workspace must be in place before the mount namespace copies the host's mounts. */
    char go;
    if (read(gate, &go, 1) != 1) return 125; /* The host gave up on this sandbox. */
  }
  const char *workdir = argv[arg++];
  uid_t uid = (uid_t)strtoul(argv[arg++], NULL, 10);
  gid_t gid = (gid_t)strtoul(argv[arg++], NULL, 10);
  if (unshare(CLONE_NEWNS | CLONE_NEWPID) != 0) die("cannot make mount and pid namespaces", NULL);
  if (mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL) != 0) die("cannot make mounts slaves", NULL);
  if (mount(workdir, LAUNCH_WORKDIR, NULL, MS_BIND, NULL) != 0) die("cannot bind", workdir);
  /* Closed by our exit (however it comes): tells the init whether we still lived once it armed. */
  int alive[2];
  if (pipe2(alive, O_CLOEXEC) != 0) die("pipe", NULL);
  pid_t init = fork();
  if (init < 0) die("cannot fork the sandbox's init", NULL);
  if (init == 0) {
    /* PID 1 of the new pid namespace: when it dies, the kernel kills everything in it. */
    close(alive[1]);
    if (gate >= 0) close(gate);
    /* This namespace's /proc, so bwrap's pid numbers and /proc agree. */
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("cannot mount /proc", NULL);
    if (setgroups(0, NULL) != 0) die("setgroups", NULL);
    if (setgid(gid) != 0) die("setgid", NULL);
    if (setuid(uid) != 0) die("setuid", NULL);
    /* Armed after the uid change, which clears it; then make sure the launcher was still there. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || hung_up(alive[0])) _exit(125);
    execv(argv[arg], &argv[arg]);
    die("cannot run", argv[arg]);
  }
  close(alive[0]);
  /* Nothing of the sandbox's stays open here: its stdio, data and info pipes are the init's. */
  for (int fd = 0; fd < 1024; fd++)
    if (fd != 2 && fd != gate && fd != alive[1]) close(fd);
  if (gate >= 0) {
    dprintf(gate, "%d\n", (int)init);
    close(gate);
  }
  int status;
  while (waitpid(init, &status, 0) < 0)
    if (errno != EINTR) return 125;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--launch-sandbox") == 0) return launch(argc, argv);
  if (argc == 4 && strcmp(argv[1], "--mount-image") == 0) return mount_image(argv[2], argv[3]);
  if (argc == 4 && strcmp(argv[1], "--bind") == 0) {
    if (mount(argv[2], argv[3], NULL, MS_BIND, NULL) != 0) die("cannot bind", argv[3]);
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "--unmount") == 0) {
    if (umount2(argv[2], 0) != 0) die("cannot unmount", argv[2]);
    return 0;
  }
  if (argc == 4 && strcmp(argv[1], "--move") == 0) {
    if (mount(argv[2], argv[3], NULL, MS_MOVE, NULL) != 0) die("cannot move", argv[2]);
    return 0;
  }
  fprintf(stderr, "berth-exec: bad usage (see berth-exec.c)\n");
  return 125;
}
