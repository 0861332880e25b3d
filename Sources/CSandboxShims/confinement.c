/* Landlock and seccomp: the rules a worker confines itself with before any plug-in
 * code runs. */
#define _GNU_SOURCE
#include "CSandboxShims.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <sched.h>
#include <seccomp.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int result(long rc) { return rc < 0 ? -errno : (int)rc; }

int iof_landlock_abi(void)
{
    return result(syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION));
}

uint64_t iof_landlock_fs_rights(int abi)
{
    uint64_t rights = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE |
                      LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR |
                      LANDLOCK_ACCESS_FS_REMOVE_DIR | LANDLOCK_ACCESS_FS_REMOVE_FILE |
                      LANDLOCK_ACCESS_FS_MAKE_CHAR | LANDLOCK_ACCESS_FS_MAKE_DIR |
                      LANDLOCK_ACCESS_FS_MAKE_REG | LANDLOCK_ACCESS_FS_MAKE_SOCK |
                      LANDLOCK_ACCESS_FS_MAKE_FIFO | LANDLOCK_ACCESS_FS_MAKE_BLOCK |
                      LANDLOCK_ACCESS_FS_MAKE_SYM;
    if (abi >= 2)
        rights |= 1ULL << 13; /* REFER */
    if (abi >= 3)
        rights |= 1ULL << 14; /* TRUNCATE */
    if (abi >= 5)
        rights |= 1ULL << 15; /* IOCTL_DEV */
    return rights;
}

uint64_t iof_landlock_read_rights(void)
{
    return LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR;
}

uint64_t iof_landlock_execute_right(void) { return LANDLOCK_ACCESS_FS_EXECUTE; }

/* The ruleset attribute as Landlock ABI 6 knows it: the system headers may be older
 * than the running kernel. */
struct iof_landlock_ruleset_attr_v6 {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};
#define IOF_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define IOF_LANDLOCK_SCOPE_SIGNAL (1ULL << 1)

int iof_landlock_create_scoped_ruleset(uint64_t handled_fs)
{
    struct iof_landlock_ruleset_attr_v6 attr = {
        .handled_access_fs = handled_fs,
        .scoped = IOF_LANDLOCK_SCOPE_SIGNAL | IOF_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET,
    };
    return result(syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0));
}

int iof_landlock_create_ruleset(uint64_t handled_fs)
{
    struct landlock_ruleset_attr attr = {.handled_access_fs = handled_fs};
    return result(syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0));
}

int iof_landlock_allow_path(int ruleset_fd, const char *path, uint64_t rights)
{
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    /* Directory-only rights on a file are refused by the kernel; strip them. */
    const uint64_t dir_only = LANDLOCK_ACCESS_FS_READ_DIR | LANDLOCK_ACCESS_FS_REMOVE_DIR |
                              LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_CHAR |
                              LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG |
                              LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO |
                              LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM |
                              (1ULL << 13);
    struct landlock_path_beneath_attr beneath = {.allowed_access = rights, .parent_fd = fd};
    long rc = syscall(SYS_landlock_add_rule, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, &beneath, 0);
    if (rc < 0 && errno == EINVAL) {
        beneath.allowed_access = rights & ~dir_only;
        rc = syscall(SYS_landlock_add_rule, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, &beneath, 0);
    }
    int err = rc < 0 ? -errno : 0;
    close(fd);
    return err;
}

int iof_landlock_restrict_self(int ruleset_fd)
{
    return result(syscall(SYS_landlock_restrict_self, ruleset_fd, 0));
}

void *iof_seccomp_new(void)
{
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx)
        return NULL;
    /* A sorted tree instead of a linear list: every syscall of the data path passes
     * through this filter. */
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
    /* Loading a filter would otherwise force the speculative-store-bypass mitigation on
     * this process (meant for JIT sandboxes within one process). The plug-in runs native
     * code in its own process: the system's default policy applies, as for any daemon. */
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_SSB, 1);
    return ctx;
}

int iof_seccomp_deny(void *ctx, const char *name, int err)
{
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR)
        return -ENOENT;
    return seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), nr, 0);
}

int iof_seccomp_deny_new_namespaces(void *ctx, int err)
{
    /* clone with any CLONE_NEW* flag fails with `err` (one rule per flag: a rule matches
     * when the flag is set). clone3 passes its flags in memory a filter cannot read, so
     * it reports ENOSYS and the C library falls back to clone. */
    const uint64_t flags[] = {CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC,
                              CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, 0x00000080 /* CLONE_NEWTIME */};
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(clone), 1,
                                  SCMP_A0(SCMP_CMP_MASKED_EQ, flags[i], flags[i]));
        if (rc < 0)
            return rc;
    }
    int clone3 = seccomp_syscall_resolve_name("clone3");
    if (clone3 != __NR_SCMP_ERROR)
        return seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), clone3, 0);
    return 0;
}

int iof_seccomp_deny_new_processes(void *ctx, int err)
{
    /* A clone without CLONE_THREAD makes a process (fork, vfork, posix_spawn); threads
     * always carry the flag. */
    int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(clone), 1,
                              SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0));
    if (rc < 0)
        return rc;
    const char *names[] = {"fork", "vfork"};
    for (size_t i = 0; i < 2; i++) {
        int nr = seccomp_syscall_resolve_name(names[i]);
        if (nr != __NR_SCMP_ERROR && (rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), nr, 0)) < 0)
            return rc;
    }
    return 0;
}

int iof_seccomp_pin_fd(void *ctx, int fd, int err)
{
    int rc;
    if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(close), 1, SCMP_A0(SCMP_CMP_EQ, (uint64_t)fd))) < 0)
        return rc;
    if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(shutdown), 1, SCMP_A0(SCMP_CMP_EQ, (uint64_t)fd))) < 0)
        return rc;
    if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(dup2), 1, SCMP_A1(SCMP_CMP_EQ, (uint64_t)fd))) < 0)
        return rc;
    if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(dup3), 1, SCMP_A1(SCMP_CMP_EQ, (uint64_t)fd))) < 0)
        return rc;
    int close_range = seccomp_syscall_resolve_name("close_range");
    if (close_range != __NR_SCMP_ERROR)
        /* close_range over a span that includes the fd: refuse any call whose first fd is
         * at or below it (the worker itself never calls it once confined). */
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), close_range, 1, SCMP_A0(SCMP_CMP_LE, (uint64_t)fd));
    return rc < 0 ? rc : 0;
}

int iof_seccomp_deny_raw_sockets(void *ctx, int err)
{
    int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(socket), 1,
                              SCMP_A0(SCMP_CMP_EQ, AF_PACKET));
    if (rc < 0)
        return rc;
    return seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(socket), 1,
                            SCMP_A1(SCMP_CMP_MASKED_EQ, 0xf, SOCK_RAW));
}

int iof_seccomp_load(void *ctx) { return seccomp_load(ctx); }
void iof_seccomp_release(void *ctx) { seccomp_release(ctx); }

int iof_hide_paths(const char *const *paths, int count)
{
    if (unshare(CLONE_NEWNS) != 0)
        return -errno;
    /* Mounts made from here on stay in this process's namespace. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        return -errno;
    for (int i = 0; i < count; i++)
        if (mount("/dev/null", paths[i], NULL, MS_BIND, NULL) != 0)
            return -errno;
    return 0;
}

int iof_unshare(int flags) { return unshare(flags) == 0 ? 0 : -errno; }
int iof_clone_newipc(void) { return CLONE_NEWIPC; }
int iof_clone_newuts(void) { return CLONE_NEWUTS; }

