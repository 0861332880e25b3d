// A posix_spawn that starts the child inside a cgroup v2 group (clone3 with
// CLONE_INTO_CGROUP, Linux 5.7): the child never runs a moment outside its limits,
// and nobody has to move it afterwards. glibc 2.36 has no posix_spawnattr_setcgroup_np.
// Unlike posix_spawn the child is a copy of the parent (no CLONE_VM, which would need a
// stack of its own and a return path in assembly): the kernel copies page tables, not
// pages, and the child execs at once.
#define _GNU_SOURCE
#include "CSystemShims.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

pid_t iof_spawn_into_cgroup(const char *path, char *const argv[], char *const envp[], const int *from, const int *to, int count,
                            int cgroup_fd) {
    // The child reports a failed exec through this pipe; a successful one closes it.
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return -errno;
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = SIGCHLD;
    args.cgroup = (uint64_t)cgroup_fd;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) {
        int error = errno;
        close(report[0]);
        close(report[1]);
        return -error;
    }
    if (pid == 0) {
        // The child of a multithreaded process, with a copy of its memory: only
        // async-signal-safe calls from here to exec.
        struct sigaction defaults;
        memset(&defaults, 0, sizeof defaults);
        defaults.sa_handler = SIG_DFL;
        for (int signal = 1; signal < NSIG; signal++) sigaction(signal, &defaults, NULL);  // fails harmlessly for some
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        for (int i = 0; i < count; i++) {
            int source = from[i] >= 0 ? from[i] : open("/dev/null", O_RDWR);
            if (source < 0) goto failed;
            // dup2 onto itself keeps close-on-exec: clear it, as posix_spawn does.
            if (source == to[i] ? fcntl(source, F_SETFD, 0) < 0 : dup2(source, to[i]) < 0) goto failed;
            if (from[i] < 0 && source != to[i]) close(source);
        }
        execve(path, argv, envp);
    failed:;
        int error = errno;
        ssize_t ignored = write(report[1], &error, sizeof error);
        (void)ignored;
        _exit(127);
    }
    close(report[1]);
    int error = 0;
    ssize_t got;
    do got = read(report[0], &error, sizeof error); while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof error) {
        int status;
        while (waitpid((pid_t)pid, &status, 0) < 0 && errno == EINTR) {}
        return -error;
    }
    return (pid_t)pid;
}
