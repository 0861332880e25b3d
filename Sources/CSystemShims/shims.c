#define _GNU_SOURCE
#include "CSystemShims.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

static int result(long rc) { return rc < 0 ? -errno : (int)rc; }

int iof_set_no_new_privs(void) { return result(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)); }
int iof_set_parent_death_signal(int signal) { return result(prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0)); }
int iof_set_thread_name(const char *name) { return result(prctl(PR_SET_NAME, name, 0, 0, 0)); }
int iof_set_dumpable(int dumpable) { return result(prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)); }

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
int iof_pidfd_open(int pid) { return result(syscall(SYS_pidfd_open, pid, 0)); }
int iof_pidfd_send_signal(int pidfd, int signal) { return result(syscall(SYS_pidfd_send_signal, pidfd, signal, NULL, 0)); }

int iof_set_thread_background(int nice)
{
    /* Both calls act on the calling thread alone on Linux (pid 0 and a thread id). */
    struct sched_param parameters = {0};
    if (sched_setscheduler(0, SCHED_BATCH, &parameters) < 0)
        return -errno;
    return result(setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice));
}

int iof_inherit_process_nice(void)
{
    /* PRIO_PROCESS with the process id names its main thread on Linux. */
    errno = 0;
    int process = getpriority(PRIO_PROCESS, (id_t)getpid());
    if (errno != 0) return -errno;
    id_t self = (id_t)syscall(SYS_gettid);
    errno = 0;
    int mine = getpriority(PRIO_PROCESS, self);
    if (errno != 0) return -errno;
    return mine < process ? result(setpriority(PRIO_PROCESS, self, process)) : 0;
}

int iof_close_from(int first)
{
    if (syscall(SYS_close_range, (unsigned)first, ~0u, 0) == 0)
        return 0;
    /* Kernels before 5.9: close one by one up to the limit. */
    long max = sysconf(_SC_OPEN_MAX);
    for (long fd = first; fd < max; fd++)
        close((int)fd);
    return 0;
}

pid_t iof_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int iof_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int iof_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    return fallocate(fd, mode, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}

int iof_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC) == 0 ? 0 : -errno; }

static _Thread_local void *iof_thread_value;
void *iof_thread_local_get(void) { return iof_thread_value; }
void iof_thread_local_set(void *value) { iof_thread_value = value; }

/* The calling thread's engine depth and its queue of calls deferred there: in thread
 * storage, so that neither a deferral nor a thread's end allocates or frees anything. */
static _Thread_local struct {
    int depth;
    unsigned head, tail;
    struct { void *function, *request, *argument; } calls[IOF_THREAD_CALL_QUEUE];
} iof_engine_thread;

int iof_engine_enter(void) { return ++iof_engine_thread.depth; }
int iof_engine_leave(void) { return --iof_engine_thread.depth; }

int iof_engine_push(void *function, void *request, void *argument)
{
    if (iof_engine_thread.depth == 0 || iof_engine_thread.tail - iof_engine_thread.head == IOF_THREAD_CALL_QUEUE)
        return 0;
    unsigned slot = iof_engine_thread.tail++ % IOF_THREAD_CALL_QUEUE;
    iof_engine_thread.calls[slot].function = function;
    iof_engine_thread.calls[slot].request = request;
    iof_engine_thread.calls[slot].argument = argument;
    return 1;
}

int iof_engine_pop(void **function, void **request, void **argument)
{
    if (iof_engine_thread.head == iof_engine_thread.tail)
        return 0;
    unsigned slot = iof_engine_thread.head++ % IOF_THREAD_CALL_QUEUE;
    *function = iof_engine_thread.calls[slot].function;
    *request = iof_engine_thread.calls[slot].request;
    *argument = iof_engine_thread.calls[slot].argument;
    return 1;
}

int iof_memfd(const char *name, int64_t size)
{
    long fd = syscall(SYS_memfd_create, name, 1u /* MFD_CLOEXEC */ | 2u /* MFD_ALLOW_SEALING */);
    if (fd < 0)
        return -errno;
    /* Sealed at its size: the process it is shared with can neither shrink it (the
     * other side's next read would be a SIGBUS) nor grow it, nor lift the seals. */
    if (ftruncate((int)fd, (off_t)size) != 0 ||
        fcntl((int)fd, 1033 /* F_ADD_SEALS */, 0x0002 | 0x0004 | 0x0001 /* SHRINK | GROW | SEAL */) != 0) {
        int error = errno;
        close((int)fd);
        return -error;
    }
    return (int)fd;
}

void iof_store_u64(volatile uint64_t *where, uint64_t value) { __atomic_store_n(where, value, __ATOMIC_RELEASE); }
uint64_t iof_load_u64(volatile uint64_t *where) { return __atomic_load_n(where, __ATOMIC_ACQUIRE); }
void iof_or_u64(volatile uint64_t *where, uint64_t bits) { __atomic_fetch_or(where, bits, __ATOMIC_RELAXED); }
int iof_cas_u8(volatile uint8_t *where, uint8_t expected, uint8_t desired)
{
    return __atomic_compare_exchange_n(where, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
uint8_t iof_load_u8(volatile uint8_t *where) { return __atomic_load_n(where, __ATOMIC_ACQUIRE); }
void iof_store_u8(volatile uint8_t *where, uint8_t value) { __atomic_store_n(where, value, __ATOMIC_RELEASE); }

ssize_t iof_send_with_fds(int socket, const void *bytes, size_t length, const int *fds, int count)
{
    if (count < 0 || count > IOF_MAX_FDS_PER_SEND)
        return -EINVAL;
    struct iovec vector = {.iov_base = (void *)bytes, .iov_len = length};
    union {
        char buffer[CMSG_SPACE(sizeof(int) * IOF_MAX_FDS_PER_SEND)];
        struct cmsghdr align;
    } control;
    struct msghdr message = {.msg_iov = &vector, .msg_iovlen = 1};
    if (count > 0) {
        memset(&control, 0, sizeof control);
        message.msg_control = control.buffer;
        message.msg_controllen = CMSG_SPACE(sizeof(int) * count);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * count);
        memcpy(CMSG_DATA(header), fds, sizeof(int) * count);
    }
    ssize_t sent;
    do
        sent = sendmsg(socket, &message, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent < 0 ? -errno : sent;
}

ssize_t iof_receive_with_fds(int socket, void *bytes, size_t length, int *fds, int capacity, int *count, int *truncated)
{
    struct iovec vector = {.iov_base = bytes, .iov_len = length};
    union {
        char buffer[CMSG_SPACE(sizeof(int) * IOF_MAX_FDS_PER_SEND)];
        struct cmsghdr align;
    } control;
    struct msghdr message = {.msg_iov = &vector, .msg_iovlen = 1, .msg_control = control.buffer,
                             .msg_controllen = sizeof control.buffer};
    *count = 0;
    *truncated = 0;
    ssize_t received;
    do
        received = recvmsg(socket, &message, MSG_CMSG_CLOEXEC);
    while (received < 0 && errno == EINTR);
    if (received < 0)
        return -errno;
    if (message.msg_flags & MSG_CTRUNC)
        *truncated = 1;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (int)((header->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
            if (*count < capacity)
                fds[(*count)++] = fd;
            else {
                close(fd);
                *truncated = 1;
            }
        }
    }
    return received;
}

ssize_t iof_send_with_fd(int socket, const void *bytes, size_t length, int fd)
{
    return iof_send_with_fds(socket, bytes, length, &fd, fd >= 0 ? 1 : 0);
}

ssize_t iof_receive_with_fd(int socket, void *bytes, size_t length, int *fd)
{
    int count = 0, truncated = 0;
    ssize_t received = iof_receive_with_fds(socket, bytes, length, fd, 1, &count, &truncated);
    if (count == 0)
        *fd = -1;
    return received;
}

int iof_setxattr(const char *path, const char *name, const void *value, size_t size) {
    return setxattr(path, name, value, size, 0);
}

long iof_fgetxattr(int fd, const char *name, void *value, size_t size) {
    return (long)fgetxattr(fd, name, value, size);
}

int iof_fsetxattr_create(int fd, const char *name, const void *value, size_t size) {
    return fsetxattr(fd, name, value, size, XATTR_CREATE);
}

int iof_birth_time(int fd, int64_t *seconds, uint32_t *nanoseconds) {
    struct statx info;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_BTIME, &info) != 0) return -1;
    if (!(info.stx_mask & STATX_BTIME)) {
        errno = ENODATA;
        return -1;
    }
    *seconds = info.stx_btime.tv_sec;
    *nanoseconds = info.stx_btime.tv_nsec;
    return 0;
}

int iof_fadvise_willneed(int fd, int64_t offset, int64_t length) {
    return posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_WILLNEED);
}

long long iof_peer_uid(int socket)
{
    struct ucred credentials;
    socklen_t size = sizeof credentials;
    if (getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &credentials, &size) != 0)
        return -errno;
    return credentials.uid;
}
