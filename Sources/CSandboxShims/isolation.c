/* Namespaces, identity and the worker's private view of the file system: the steps
 * that turn a freshly started worker into an unprivileged process that sees only what
 * it was given. Everything here runs while the process is still single-threaded and
 * before any plug-in code is loaded. */
#define _GNU_SOURCE
#include "CSandboxShims.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int iof_clone_newuser(void) { return CLONE_NEWUSER; }
int iof_clone_newns(void) { return CLONE_NEWNS; }
int iof_clone_newnet(void) { return CLONE_NEWNET; }
int iof_clone_newpid(void) { return CLONE_NEWPID; }

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t length = (ssize_t)strlen(text);
    int rc = write(fd, text, (size_t)length) == length ? 0 : -errno;
    close(fd);
    return rc;
}

int iof_enter_user_namespace(int other_namespaces)
{
    uid_t uid = geteuid();
    gid_t gid = getegid();
    if (unshare(CLONE_NEWUSER | other_namespaces) != 0)
        return -errno;
    /* The same ids inside as outside, and nothing else mapped: files keep showing their
     * real owner, and no id the process could switch to exists in here. */
    char line[64];
    int rc = write_file("/proc/self/setgroups", "deny");
    if (rc != 0)
        return rc;
    snprintf(line, sizeof line, "%u %u 1\n", (unsigned)uid, (unsigned)uid);
    if ((rc = write_file("/proc/self/uid_map", line)) != 0)
        return rc;
    snprintf(line, sizeof line, "%u %u 1\n", (unsigned)gid, (unsigned)gid);
    return write_file("/proc/self/gid_map", line);
}

int iof_become(uint32_t uid, uint32_t gid)
{
    if (setgroups(0, NULL) != 0 || setresgid(gid, gid, gid) != 0 || setresuid(uid, uid, uid) != 0)
        return -errno;
    /* Changing identity made the process undumpable, which makes its own /proc files
     * root's: the steps that follow write /proc/self/uid_map. It is made undumpable
     * again once confined. */
    return prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

int iof_drop_capabilities(void)
{
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL && errno != EPERM)
            return -errno;
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    return syscall(SYS_capset, &header, data) == 0 ? 0 : -errno;
}

int iof_has_capabilities(void)
{
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) != 0)
        return -errno;
    return (data[0].effective | data[1].effective | data[0].permitted | data[1].permitted) != 0;
}

/* ---- the supervising parent of a pid namespace ------------------------------------ */

static int kill_request_fd = -1;

void iof_kill_self(void)
{
    if (kill_request_fd >= 0) {
        /* As init of its pid namespace this process ignores its own SIGKILL: the parent
         * outside does it. */
        char byte = 'k';
        if (write(kill_request_fd, &byte, 1) == 1)
            for (;;)
                pause();
    }
    kill(getpid(), SIGKILL);
    _exit(137);
}

/* Leaves the way the child left: the same exit status, or killed by the same signal,
 * so that whoever waits for this process sees what happened to the worker. */
static void mirror(int status)
{
    if (WIFEXITED(status))
        _exit(WEXITSTATUS(status));
    int signal = WTERMSIG(status);
    struct rlimit none = {0, 0};
    setrlimit(RLIMIT_CORE, &none);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signal);
    struct sigaction defaults = {.sa_handler = SIG_DFL};
    sigaction(signal, &defaults, NULL);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(signal);
    _exit(128 + signal);
}

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* Closes every fd from 3 on except two. By ranges: a loop of close() up to the limit
 * is 65,000 system calls, tens of milliseconds taken from the worker's start on a
 * small host. The loop stays for kernels before 5.9. */
static void close_all_but(int keep, int other)
{
    int low = keep < other ? keep : other, high = keep < other ? other : keep;
    unsigned ranges[3][2] = {{3, (unsigned)low - 1}, {(unsigned)low + 1, (unsigned)high - 1}, {(unsigned)high + 1, ~0u}};
    for (int i = 0; i < 3; i++) {
        if (ranges[i][0] > ranges[i][1])
            continue;
        if (syscall(SYS_close_range, ranges[i][0], ranges[i][1], 0) != 0) {
            unsigned last = ranges[i][1] < 65535 ? ranges[i][1] : 65535;
            for (unsigned fd = ranges[i][0]; fd <= last; fd++)
                close((int)fd);
        }
    }
}

int iof_fork_namespace_init(uint32_t uid, uint32_t gid, int change_identity, int outlive_supervisor)
{
    int alive[2], kill_pipe[2];
    if (pipe2(alive, O_CLOEXEC) != 0)
        return -errno;
    if (pipe2(kill_pipe, O_CLOEXEC) != 0) {
        int error = errno;
        close(alive[0]);
        close(alive[1]);
        return -error;
    }
    sigset_t watched;
    sigemptyset(&watched);
    sigaddset(&watched, SIGCHLD);
    sigaddset(&watched, SIGTERM);
    sigaddset(&watched, SIGINT);
    sigaddset(&watched, SIGHUP);
    sigset_t previous;
    sigprocmask(SIG_BLOCK, &watched, &previous);
    pid_t supervisor = getppid();
    pid_t child = fork();
    if (child < 0) {
        int error = errno;
        sigprocmask(SIG_SETMASK, &previous, NULL);
        return -error;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &previous, NULL);
        close(alive[1]);
        close(kill_pipe[0]);
        kill_request_fd = kill_pipe[1];
        /* The read end of `alive` reports a hang-up once the parent is gone; the
         * caller checks it after asking to follow its parent in death. */
        return alive[0];
    }

    /* The parent: stays outside the namespace, holds nothing of the worker's, forwards
     * the supervisor's requests to stop, and ends as the worker ended. */
    close(alive[0]);
    close(kill_pipe[1]);
    close_all_but(alive[1], kill_pipe[0]);
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        if (null > 2)
            close(null);
    }
    if (change_identity)
        iof_become(uid, gid);
    iof_drop_capabilities();
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* After the last change of credentials, which clears it: this process dies with
     * the supervisor, and the child (which asks the same of this one) with it. A
     * process that outlives its supervisor (a VM's worker, which the next host adopts)
     * stays; the child still dies with this one. */
    if (!outlive_supervisor) {
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        if (getppid() != supervisor)
            kill(getpid(), SIGKILL);
    }
    int signals = signalfd(-1, &watched, SFD_CLOEXEC);
    struct pollfd polled[2] = {{.fd = signals, .events = POLLIN}, {.fd = kill_pipe[0], .events = POLLIN}};
    for (;;) {
        int status;
        pid_t done = waitpid(child, &status, WNOHANG);
        if (done == child)
            mirror(status);
        if (poll(polled, 2, -1) < 0 && errno != EINTR)
            _exit(70);
        if (polled[0].revents & POLLIN) {
            struct signalfd_siginfo info;
            if (read(signals, &info, sizeof info) == (ssize_t)sizeof info && info.ssi_signo != SIGCHLD)
                kill(child, (int)info.ssi_signo);
        }
        if (polled[1].revents & (POLLIN | POLLHUP)) {
            char byte;
            if (read(kill_pipe[0], &byte, 1) == 1)
                kill(child, SIGKILL);
            else
                polled[1].fd = -1; /* the child closed it (or is gone): keep waiting */
        }
    }
}

int iof_parent_is_gone(int alive_fd)
{
    struct pollfd polled = {.fd = alive_fd, .events = POLLIN};
    return poll(&polled, 1, 0) > 0 && (polled.revents & (POLLHUP | POLLIN));
}

/* ---- the private root ------------------------------------------------------------- */

static int make_parents(char *path)
{
    for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = 0;
        int rc = mkdir(path, 0755);
        *slash = '/';
        if (rc != 0 && errno != EEXIST)
            return -errno;
    }
    return 0;
}

/* The flags a read-only remount of a bind must keep: in a user namespace the kernel
 * refuses to clear nosuid, nodev or noexec that the original mount has. */
static unsigned long kept_flags(int fd)
{
    struct statvfs info;
    unsigned long flags = 0;
    if (fstatvfs(fd, &info) != 0)
        return MS_NOSUID | MS_NODEV;
    if (info.f_flag & ST_NOSUID)
        flags |= MS_NOSUID;
    if (info.f_flag & ST_NODEV)
        flags |= MS_NODEV;
    if (info.f_flag & ST_NOEXEC)
        flags |= MS_NOEXEC;
    if (info.f_flag & ST_NOATIME)
        flags |= MS_NOATIME;
    if (info.f_flag & ST_NODIRATIME)
        flags |= MS_NODIRATIME;
    if (info.f_flag & ST_RELATIME)
        flags |= MS_RELATIME;
    return flags;
}

static int place(const char *root, const struct iof_view_entry *entry)
{
    char target[4096];
    if (snprintf(target, sizeof target, "%s%s", root, entry->path) >= (int)sizeof target)
        return -ENAMETOOLONG;
    int rc = make_parents(target);
    if (rc != 0)
        return rc;
    if (entry->kind == IOF_VIEW_SYMLINK)
        return symlink(entry->link, target) == 0 || errno == EEXIST ? 0 : -errno;
    struct stat info;
    if (fstat(entry->fd, &info) != 0)
        return -errno;
    if (S_ISDIR(info.st_mode)) {
        if (mkdir(target, 0755) != 0 && errno != EEXIST)
            return -errno;
    } else {
        int made = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (made < 0)
            return -errno;
        close(made);
    }
    char source[64];
    snprintf(source, sizeof source, "/proc/self/fd/%d", entry->fd);
    if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) != 0)
        return -errno;
    if (entry->kind == IOF_VIEW_READ_ONLY &&
        mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | kept_flags(entry->fd), NULL) != 0)
        return -errno;
    return 0;
}

static int build_private_root(const char *scratch, const struct iof_view_entry *entries, int count, int new_proc,
                              int *failed_entry);

int iof_enter_private_root(const char *scratch, const struct iof_view_entry *entries, int count, int new_proc,
                           int *failed_entry)
{
    *failed_entry = -1;
    /* Mount points any identity can pass through, whatever umask the host runs with. */
    mode_t previous_umask = umask(022);
    int rc = build_private_root(scratch, entries, count, new_proc, failed_entry);
    umask(previous_umask);
    return rc;
}

static int build_private_root(const char *scratch, const struct iof_view_entry *entries, int count, int new_proc,
                              int *failed_entry)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        return -errno;
    if (mount("iofilter-root", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") != 0)
        return -errno;
    for (int i = 0; i < count; i++) {
        int rc = place(scratch, &entries[i]);
        if (rc != 0) {
            *failed_entry = i;
            return rc;
        }
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/proc", scratch);
    mkdir(path, 0555);
    /* A procfs of the process's own pid namespace: it lists the worker alone, and
     * /proc/self and /proc/TID mean what the process thinks they mean. */
    if (new_proc && mount("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        return -errno;
    snprintf(path, sizeof path, "%s/.old-root", scratch);
    if (mkdir(path, 0700) != 0)
        return -errno;
    if (syscall(SYS_pivot_root, scratch, path) != 0)
        return -errno;
    if (chdir("/") != 0)
        return -errno;
    if (umount2("/.old-root", MNT_DETACH) != 0)
        return -errno;
    rmdir("/.old-root");
    /* Nothing more is made in the root itself: it holds mount points only. */
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        return -errno;
    return 0;
}

int iof_open_path(const char *path) { return open(path, O_PATH | O_CLOEXEC); }
