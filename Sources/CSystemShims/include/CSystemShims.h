/* Thin wrappers over syscalls and variadic C functions that Swift cannot call
 * directly (prctl, syscall). Each returns 0 or -errno unless noted. What confines a
 * worker (seccomp, Landlock, namespaces) is in CSandboxShims: a plug-in that links
 * this module links no sandboxing library. */
#ifndef IOF_SYSTEM_SHIMS_H
#define IOF_SYSTEM_SHIMS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

int iof_set_no_new_privs(void);
int iof_set_parent_death_signal(int signal);
int iof_set_dumpable(int dumpable);
/* A pidfd for `pid`, which stays bound to that very process: it polls readable once the
 * process ends, and a signal sent through it never reaches a process that reused the
 * pid. fd or -errno. */
int iof_pidfd_open(int pid);
int iof_pidfd_send_signal(int pidfd, int signal);
int iof_set_thread_name(const char *name);
/* Makes the calling thread a background one: SCHED_BATCH (it never preempts a running
 * thread when it wakes) at the given nice value. 0 or -errno. */
int iof_set_thread_background(int nice);
/* Raises the calling thread's nice value to its process's (its main thread's) if it
 * is lower. 0 or -errno. */
int iof_inherit_process_nice(void);
/* Closes every fd >= first. */
int iof_close_from(int first);

/* fallocate(2); mode bits FALLOC_FL_*. */
int iof_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// posix_fadvise(POSIX_FADV_WILLNEED): 0 or an errno.
int iof_fadvise_willneed(int fd, int64_t offset, int64_t length);
#define IOF_FALLOC_KEEP_SIZE 0x01
#define IOF_FALLOC_PUNCH_HOLE 0x02
#define IOF_FALLOC_ZERO_RANGE 0x10

/* pipe2(fds, O_CLOEXEC) */
int iof_pipe_cloexec(int fds[2]);

/* accept4(fd, NULL, NULL, SOCK_CLOEXEC) */
int iof_accept_cloexec(int fd);

/* The calling thread's kernel id. */
pid_t iof_gettid(void);

/* An anonymous shared-memory file of `size` bytes (memfd_create, close-on-exec),
 * sealed so that its size can never change: fd or -errno. */
int iof_memfd(const char *name, int64_t size);
/* Atomic 64-bit store (release) and load (acquire) on memory shared between processes. */
void iof_store_u64(volatile uint64_t *where, uint64_t value);
uint64_t iof_load_u64(volatile uint64_t *where);
/* Atomic OR (relaxed) of `bits` into a word of a shared mapping (a change bitmap that
 * several connection threads mark at once). */
void iof_or_u64(volatile uint64_t *where, uint64_t bits);
/* Atomic byte operations on a state array shared between threads: compare-and-swap
 * (1 if `*where` was `expected` and is now `desired`), load (acquire), store (release). */
int iof_cas_u8(volatile uint8_t *where, uint8_t expected, uint8_t desired);
uint8_t iof_load_u8(volatile uint8_t *where);
void iof_store_u8(volatile uint8_t *where, uint8_t value);

/* One pointer that belongs to the calling thread (the chain engine keeps the resumes a
 * serialized filter issues from inside its own callback there). */
void *iof_thread_local_get(void);
void iof_thread_local_set(void *value);

/* The chain engine's per-thread state for calls filters defer (ABI 1.7 defer_call):
 * how deep the calling thread is in the engine, and a FIFO of calls deferred while it
 * is. enter/leave return the new depth; push queues (1) only inside the engine and
 * with room, else returns 0 (the caller queues elsewhere); pop takes the oldest (1),
 * or returns 0 when there is none. */
enum { IOF_THREAD_CALL_QUEUE = 64 };
int iof_engine_enter(void);
int iof_engine_leave(void);
int iof_engine_push(void *function, void *request, void *argument);
int iof_engine_pop(void **function, void **request, void **argument);

/* The uid of the process at the other end of a unix socket (SO_PEERCRED), or -errno. */
long long iof_peer_uid(int socket);
/* Sends `length` bytes (one record on a SOCK_SEQPACKET socket) with `fd` attached as
 * SCM_RIGHTS (none if fd < 0): bytes sent or -errno. */
ssize_t iof_send_with_fd(int socket, const void *bytes, size_t length, int fd);
/* Receives one record; `*fd` is the attached fd (close-on-exec) or -1. Bytes or -errno. */
ssize_t iof_receive_with_fd(int socket, void *bytes, size_t length, int *fd);

/* Sends `length` bytes of a stream socket with `count` fds (at most IOF_MAX_FDS_PER_SEND)
 * attached as SCM_RIGHTS: bytes sent (maybe fewer, then the fds went with them) or -errno. */
#define IOF_MAX_FDS_PER_SEND 250
ssize_t iof_send_with_fds(int socket, const void *bytes, size_t length, const int *fds, int count);
/* Receives bytes and any fds sent with them (close-on-exec, at most `capacity`; more are
 * closed and *truncated set): bytes or -errno; *count says how many fds. */
ssize_t iof_receive_with_fds(int socket, void *bytes, size_t length, int *fds, int capacity, int *count, int *truncated);

/// setxattr(2), which Glibc's Swift module does not export (sys/xattr.h).
int iof_setxattr(const char *path, const char *name, const void *value, size_t size);
/* fgetxattr(2): the value's size, or -1 with errno set. */
long iof_fgetxattr(int fd, const char *name, void *value, size_t size);
/* fsetxattr(2) with XATTR_CREATE: fails with EEXIST if the attribute is there. */
int iof_fsetxattr_create(int fd, const char *name, const void *value, size_t size);
/* statx(2)'s birth time of the file behind fd: 0, or -1 with errno set (ENODATA: the
 * file system keeps none). */
int iof_birth_time(int fd, int64_t *seconds, uint32_t *nanoseconds);
/* Starts `path` as posix_spawn would, but inside the cgroup v2 group whose directory
 * `cgroup_fd` is open on (clone3, CLONE_INTO_CGROUP). The child gets default signal
 * handling with nothing blocked, then dup2(from[i], to[i]) for each pair (from -1:
 * /dev/null). The child's pid, or -errno: the clone's (ENOSYS, EINVAL: fall back on
 * posix_spawn) or the exec's. */
pid_t iof_spawn_into_cgroup(const char *path, char *const argv[], char *const envp[], const int *from, const int *to, int count,
                            int cgroup_fd);

#endif
