/* What confines a sandboxed process: Landlock, seccomp (libseccomp), namespaces,
 * identity and its private view of the file system. Linked by the worker alone, never
 * by a plug-in. Each returns 0 or -errno unless noted. */
#ifndef IOF_SANDBOX_SHIMS_H
#define IOF_SANDBOX_SHIMS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

/* Landlock. Returns the ABI version (>= 1), or -errno if unsupported. */
int iof_landlock_abi(void);
/* The filesystem access rights ABI `abi` knows (LANDLOCK_ACCESS_FS_* bits). */
uint64_t iof_landlock_fs_rights(int abi);
uint64_t iof_landlock_read_rights(void);    /* read files, read dirs                */
uint64_t iof_landlock_execute_right(void);  /* execute (mmap PROT_EXEC of .so)      */
/* Returns a ruleset fd, or -errno. */
int iof_landlock_create_ruleset(uint64_t handled_fs);
/* The same, also scoping signals and abstract unix sockets to the domain (ABI >= 6):
 * the process may signal and connect to nothing outside its own sandbox. */
int iof_landlock_create_scoped_ruleset(uint64_t handled_fs);
/* Allows `rights` beneath `path` (or on the file). -errno on failure. */
int iof_landlock_allow_path(int ruleset_fd, const char *path, uint64_t rights);
int iof_landlock_restrict_self(int ruleset_fd);

/* Seccomp (libseccomp). A context that allows everything but what is denied. */
void *iof_seccomp_new(void);
/* Makes syscall `name` fail with `err`; -ENOENT-like result if the name is unknown here. */
int iof_seccomp_deny(void *ctx, const char *name, int err);
/* Refuses clone with any CLONE_NEW* flag (and clone3, whose flags a filter cannot see,
 * with ENOSYS so that the C library falls back to clone). */
int iof_seccomp_deny_new_namespaces(void *ctx, int err);
/* Refuses making processes: clone without CLONE_THREAD, fork, vfork. */
int iof_seccomp_deny_new_processes(void *ctx, int err);
/* Refuses close, shutdown and close_range of `fd`, and dup2/dup3 onto it: an fd the
 * host handed over (a listening socket) stays as it was given. */
int iof_seccomp_pin_fd(void *ctx, int fd, int err);
/* Refuses socket(AF_PACKET, …) and socket(…, SOCK_RAW, …). */
int iof_seccomp_deny_raw_sockets(void *ctx, int err);
int iof_seccomp_load(void *ctx);
void iof_seccomp_release(void *ctx);

/* unshare(2): 0 or -errno; and the flags Swift cannot import as constants. */
int iof_unshare(int flags);
int iof_clone_newipc(void);
int iof_clone_newuts(void);

/* Moves the process into a private mount namespace and covers each path (a file that
 * exists) with /dev/null there: the host's control socket, say. 0 or -errno. */
int iof_hide_paths(const char *const *paths, int count);

/* ---- isolation.c: namespaces, identity, the private root ---------------------- */
int iof_clone_newuser(void);
int iof_clone_newns(void);
int iof_clone_newnet(void);
int iof_clone_newpid(void);
/* unshare(CLONE_NEWUSER | other_namespaces), mapping the caller's own uid and gid (and
 * nothing else) into the new user namespace. The caller must be single-threaded. */
int iof_enter_user_namespace(int other_namespaces);
/* Drops supplementary groups, then sets real, effective and saved gid and uid (from
 * root this drops every capability). 0 or -errno. */
int iof_become(uint32_t uid, uint32_t gid);
/* Empties the permitted, effective, inheritable, ambient and bounding sets. */
int iof_drop_capabilities(void);
/* 1 if the process holds any capability (in its user namespace), 0 if none, -errno. */
int iof_has_capabilities(void);
/* Forks after unshare(CLONE_NEWPID): returns in the child only, as init of the new pid
 * namespace, with an fd that reports a hang-up once the parent is gone (see
 * iof_parent_is_gone), or -errno. The parent stays outside: it closes every fd but
 * stderr, drops to uid/gid if `change_identity`, forwards SIGTERM, SIGINT and SIGHUP to
 * the child, kills it on iof_kill_self, and exits as the child exits (same status,
 * or killed by the same signal). It dies with its supervisor unless
 * `outlive_supervisor` (then a later supervisor adopts it by pid). */
int iof_fork_namespace_init(uint32_t uid, uint32_t gid, int change_identity, int outlive_supervisor);
int iof_parent_is_gone(int alive_fd);
/* Kills the calling process for good, even as init of its own pid namespace (which
 * ignores its own SIGKILL): through the parent iof_fork_namespace_init left outside. */
void iof_kill_self(void);

enum iof_view_kind { IOF_VIEW_READ_ONLY = 0, IOF_VIEW_READ_WRITE = 1, IOF_VIEW_SYMLINK = 2 };
struct iof_view_entry {
    const char *path;  /* where it appears, the same absolute path as outside          */
    int fd;            /* an O_PATH fd of what is shown there (binds)                  */
    int kind;          /* enum iof_view_kind                                            */
    const char *link;  /* the symlink's target (IOF_VIEW_SYMLINK)                      */
};
/* Makes a tmpfs mounted on `scratch` the process's root, holding only `entries` (each
 * bound from its fd, so their parent directories need not be reachable by the
 * process's identity), /proc (a new procfs if `new_proc`, for a new pid namespace),
 * and nothing else; the old root is detached. Needs CAP_SYS_ADMIN over the current
 * mount namespace, which must be private to the process. On failure, `*failed_entry`
 * is the index of the entry that could not be placed, or -1. */
/* open(path, O_PATH | O_CLOEXEC): a handle on a file or directory that grants no access by itself. */
int iof_open_path(const char *path);
int iof_enter_private_root(const char *scratch, const struct iof_view_entry *entries, int count, int new_proc,
                           int *failed_entry);

#endif
