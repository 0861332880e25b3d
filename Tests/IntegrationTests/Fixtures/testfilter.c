/*
 * A test plug-in whose shape is chosen at compile time (to make malformed plug-ins)
 * and whose behaviour is chosen at run time by the `behaviour` parameter.
 *
 * Compile-time knobs (-D...):
 *   PLUGIN_NAME, PLUGIN_VERSION, CATEGORY, ABI_MAJOR_VALUE, ABI_MINOR_VALUE
 *   STRUCT_SIZE_VALUE           descriptor struct_size
 *   ENTRY_RETURNS_NULL, ENTRY_ABORTS, ENTRY_HANGS, CONSTRUCTOR_SEGFAULTS
 *   NO_START                    leave out the required start callback
 *   BAD_ENUM_SCHEMA, BAD_RANGE_SCHEMA, BAD_DEFAULT_SCHEMA
 *   NO_ENTRY                    export no entry point at all
 *   THREAD_MODEL                an iof_thread_model
 *   WITH_DAEMON                 a partner daemon: it counts its starts in the file
 *                               `starts` of its state directory and answers each line
 *                               on a channel with "echo START LINE"; it logs whether
 *                               socket(2) was refused it. The management operation
 *                               daemon_echo(text) sends "DISK text" over every open
 *                               instance's channel and returns "DISK=REPLY;" for each
 *                               ("DISK=down;" when daemon_channel gives -1). It
 *                               asks for a replica disk "probe" and logs the answer.
 *   DAEMON_LISTENS              its daemon declares IOF_DAEMON_LISTENS (ABI 1.3) and
 *                               answers each peer on its listener with "peer START"
 *
 * Every lifecycle event (snapshot, clone, grow) is appended to events.log in the
 * sidecar directory, one line each ("snapshot", "clone NAME", "grow BYTES").
 *
 * Health (ABI 1.4, when built against a header that has it): the file `health` in the
 * sidecar directory says what `health` answers: "ok", "degraded REASON", "failed
 * REASON", or a number (returned as it is: an out-of-range value). No file: ok. It also
 * reports the statistics lag_seconds and rpo_seconds when the file `lag` there holds
 * "LAG RPO".
 *
 * Run-time behaviours (parameter `behaviour`):
 *   veto-snapshot   refuse snapshots with EBUSY (after logging them)
 *   veto-grow       refuse growing with ENOSPC (after logging it)
 *   pass            pass everything down
 *   defer           defer every start and done, resumed from another thread
 *   defer-on-host   defer every start and done to the host (ABI 1.7 defer_call; on an
 *                   older host, as `defer`)
 *   segv-on-write   dereference NULL on the first write
 *   exec-on-open    try to execve /bin/sh in open (the sandbox must refuse), log the errno
 *   hang-on-read    never return from start for reads past the first MiB
 *   fail-writes     fail every write with ENOSPC
 *   open-outside    in open, try to create `marker` (outside the sandbox's paths), log the errno
 *   refuse-open     fail open with EACCES (a worker that cannot start)
 *   mknod-on-open   in open, try to make a character device in the sidecar, log the errno
 *   signal-parent-on-open  in open, send SIGWINCH to the supervisor (the pid `marker`
 *                   names, else the parent), log the errno
 *   namespace-on-open      in open, try clone(CLONE_NEWUSER|CLONE_NEWNET) and unshare, log
 *   fork-on-open    in open, try to fork a child that would linger, log the errno
 *   break-listener-on-open  in open, shut down, replace and close fd 3 (the listening
 *                   socket), log each errno
 *   allocate-on-read  on reads past the first MiB, allocate (at most 4 GiB) until refused,
 *                   log how much, free it and fail the read with ENOMEM
 *   kill-everything-on-open  in open, kill(-1, SIGKILL), log the errno (tests run it only
 *                   inside a pid namespace of their own)
 *   connect-on-open in open, connect to the unix socket `marker` names, log the errno
 *   sysv-on-open    in open, look up the SysV shared memory segment 0x10f17e57, log
 *   shrink-heartbeat-on-open  in open, truncate fd 5 (the heartbeat page), log the errno
 *   connect-tcp-on-open  in open, connect to 127.0.0.1 on the port `marker` names, log
 *   ptrace-on-open  in open, try to attach to the parent with ptrace, log the errno
 *   report-on-open  in open, log who the worker is and what it sees: uid, effective
 *                   capabilities, processes in /proc, network interfaces, and whether
 *                   the file `marker` names exists for it
 *   open-target-on-open  in open, ask the host for `target` (open_target, ABI 1.1) and
 *                   write "brokered" at its start; ask for `marker` too (not a target
 *                   its policy names) and open `target` directly; log all three
 *   threads-on-open in open, start threads (at most 4096) until refused, log how many,
 *                   then let them all end
 *   freeze-on-read  SIGSTOP the whole worker on reads past the first MiB; log if that
 *                   had no effect (init of a pid namespace ignores its own SIGSTOP)
 *   refuse-attach   fail attach with EACCES (otherwise attach leaves a file `attached`
 *                   in the sidecar directory)
 *   hold-writes     while the sidecar holds a file `hold`, hold each write in start
 *                   (logging "holding a write" once per hold): a kill then finds a
 *                   write in flight, deterministically
 *   invert          XOR every byte with 0xff on the way down (writes) and up (reads):
 *                   a toy encryption, so that the disk holds different bytes
 */
#define _GNU_SOURCE
#include <iofilter.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <dirent.h>
#include <fcntl.h>
#include <stddef.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "org.test.filter"
#endif
#ifndef PLUGIN_VERSION
#define PLUGIN_VERSION "1.0.0"
#endif
#ifndef CATEGORY
#define CATEGORY IOF_CATEGORY_CACHE
#endif
#ifndef ABI_MAJOR_VALUE
#define ABI_MAJOR_VALUE IOF_ABI_MAJOR
#endif
#ifndef ABI_MINOR_VALUE
#define ABI_MINOR_VALUE IOF_ABI_MINOR
#endif
#ifndef STRUCT_SIZE_VALUE
#define STRUCT_SIZE_VALUE sizeof(struct iof_plugin)
#endif
#ifndef THREAD_MODEL
#define THREAD_MODEL IOF_THREADS_PARALLEL
#endif

/* NULL, but not provably so to the compiler, which would otherwise drop the store. */
static volatile int *null_pointer(void)
{
    return (volatile int *)getenv("IOFILTER_TEST_VARIABLE_THAT_IS_NEVER_SET");
}

#ifdef CONSTRUCTOR_SEGFAULTS
__attribute__((constructor)) static void crash_on_load(void)
{
    *null_pointer() = 1;
}
#endif

/* A handler that keeps the thread it runs on forever. */
static void park_forever(int signal)
{
    (void)signal;
    for (;;)
        pause();
}

/* Sends every thread of this process called `name` a signal whose handler never
 * returns; how many it reached. */
static int freeze_thread_named(const char *name)
{
    struct sigaction parking = {.sa_handler = park_forever};
    sigaction(SIGUSR2, &parking, NULL);
    DIR *tasks = opendir("/proc/self/task");
    if (!tasks)
        return -1;
    int reached = 0;
    struct dirent *entry;
    while ((entry = readdir(tasks))) {
        char path[300], comm[64] = {0};
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", entry->d_name);
        FILE *file = fopen(path, "r");
        if (!file)
            continue;
        if (fgets(comm, sizeof comm, file) && strncmp(comm, name, strlen(name)) == 0 &&
            syscall(SYS_tgkill, getpid(), atoi(entry->d_name), SIGUSR2) == 0)
            reached++;
        fclose(file);
    }
    closedir(tasks);
    return reached;
}

enum behaviour { PASS, DEFER, SEGV_ON_WRITE, EXEC_ON_OPEN, HANG_ON_READ, FAIL_WRITES, INVERT, OPEN_OUTSIDE, REFUSE_OPEN, REFUSE_ATTACH,
                 MKNOD_ON_OPEN, SIGNAL_PARENT_ON_OPEN, NAMESPACE_ON_OPEN, FREEZE_ON_READ, FORK_ON_OPEN,
                 BREAK_LISTENER_ON_OPEN, ALLOCATE_ON_READ, KILL_EVERYTHING_ON_OPEN, CONNECT_ON_OPEN, SYSV_ON_OPEN,
                 SHRINK_HEARTBEAT_ON_OPEN, CONNECT_TCP_ON_OPEN, PTRACE_ON_OPEN, REPORT_ON_OPEN, OPEN_TARGET_ON_OPEN,
                 THREADS_ON_OPEN, VETO_SNAPSHOT, VETO_GROW, VETO_REVERT, VETO_UPGRADE, SLOW_CLOSE, FREEZE_WATCHDOG_ON_READ, HOLD_MEMORY_ON_READ, DEFER_ON_HOST, HOLD_WRITES };
/* The `behaviour` parameter's values, in the order of enum behaviour. */
static const char *const behaviours[] = {"pass", "defer", "segv-on-write", "exec-on-open",
                                         "hang-on-read", "fail-writes", "invert", "open-outside", "refuse-open",
                                         "refuse-attach", "mknod-on-open", "signal-parent-on-open",
                                         "namespace-on-open", "freeze-on-read", "fork-on-open",
                                         "break-listener-on-open", "allocate-on-read", "kill-everything-on-open",
                                         "connect-on-open", "sysv-on-open", "shrink-heartbeat-on-open",
                                         "connect-tcp-on-open", "ptrace-on-open", "report-on-open",
                                         "open-target-on-open", "threads-on-open", "veto-snapshot", "veto-grow", "veto-revert",
                                         "veto-upgrade", "slow-close", "freeze-watchdog-on-read",
                                         "hold-memory-on-read", "defer-on-host", "hold-writes", NULL};

static const struct iof_host_services *host;

struct instance {
    iof_host_disk *disk;
    enum behaviour behaviour;
    char sidecar[4096];
    uint64_t size;
};

static void *wait_for_gate(void *fd)
{
    char byte;
    while (read((int)(intptr_t)fd, &byte, 1) > 0)
        ;
    return NULL;
}

/* --- a tiny queue for deferred decisions, drained by one thread ------------------ */
struct pending {
    struct iof_request *req;
    struct pending *next;
};
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_ready = PTHREAD_COND_INITIALIZER;
static struct pending *queue_head, *queue_tail;
static int resumer_started;

static void *resumer(void *unused)
{
    (void)unused;
    for (;;) {
        pthread_mutex_lock(&queue_lock);
        while (!queue_head)
            pthread_cond_wait(&queue_ready, &queue_lock);
        struct pending *item = queue_head;
        queue_head = item->next;
        if (!queue_head)
            queue_tail = NULL;
        pthread_mutex_unlock(&queue_lock);
        host->resume(item->req, IOF_PASS, 0);
        free(item);
    }
    return NULL;
}

#if IOF_ABI_MINOR >= 7
static void resume_passing(struct iof_request *req, void *unused)
{
    (void)unused;
    host->resume(req, IOF_PASS, 0);
}
#endif

static enum iof_disposition defer_to_resumer(struct iof_request *req);

/* Defers to the host (defer_call) where the host offers it. */
static enum iof_disposition defer_on_host(struct iof_request *req)
{
#if IOF_ABI_MINOR >= 7
    if (host->abi_minor >= 7 && host->defer_call && host->defer_call(req, resume_passing, NULL) == 0)
        return IOF_DEFER;
#endif
    return defer_to_resumer(req);
}

static enum iof_disposition defer_to_resumer(struct iof_request *req)
{
    struct pending *item = malloc(sizeof *item);
    if (!item) {
        req->error = ENOMEM;
        return IOF_FAIL;
    }
    item->req = req;
    item->next = NULL;
    pthread_mutex_lock(&queue_lock);
    if (!resumer_started) {
        pthread_t thread;
        pthread_create(&thread, NULL, resumer, NULL);
        pthread_detach(thread);
        resumer_started = 1;
    }
    if (queue_tail)
        queue_tail->next = item;
    else
        queue_head = item;
    queue_tail = item;
    pthread_cond_signal(&queue_ready);
    pthread_mutex_unlock(&queue_lock);
    return IOF_DEFER;
}

/* --- callbacks -------------------------------------------------------------------- */

static int tf_load(const struct iof_host_services *services)
{
    host = services;
    return 0;
}

/* Attach leaves a mark in the sidecar directory, so a test can tell that it ran. */
static int tf_attach(iof_host_disk *disk, const struct iof_disk_info *info)
{
    const char *behaviour = host->param(disk, "behaviour");
    if (behaviour && strcmp(behaviour, "refuse-attach") == 0)
        return EACCES;
    char path[4096];
    snprintf(path, sizeof path, "%s/attached", info->sidecar_dir);
    FILE *mark = fopen(path, "w");
    if (mark)
        fclose(mark);
    return 0;
}

#ifdef WITH_DAEMON
static void remember_disk(iof_host_disk *disk, const char *name);
static void forget_disk(iof_host_disk *disk);
#endif

static int tf_open(iof_host_disk *disk, const struct iof_disk_info *info, void **out)
{
    struct instance *inst = calloc(1, sizeof *inst);
    inst->disk = disk;
    if (info->sidecar_dir) snprintf(inst->sidecar, sizeof inst->sidecar, "%s", info->sidecar_dir);
    inst->size = info->size;
    const char *b = host->param(disk, "behaviour");
    for (size_t i = 0; b && behaviours[i]; i++)
        if (strcmp(b, behaviours[i]) == 0)
            inst->behaviour = (enum behaviour)i;
    char line[256];
    if (inst->behaviour == MKNOD_ON_OPEN) {
        /* A character device like /dev/null: with it, a filter would reach hardware. */
        char path[4096];
        snprintf(path, sizeof path, "%s/device", info->sidecar_dir);
        if (mknod(path, S_IFCHR | 0600, makedev(1, 3)) == 0)
            snprintf(line, sizeof line, "mknod succeeded");
        else
            snprintf(line, sizeof line, "mknod refused: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == SIGNAL_PARENT_ON_OPEN) {
        /* SIGWINCH: harmless if it ever arrived (ignored by default). */
        const char *marker = host->param(disk, "marker");
        pid_t supervisor = marker && atoi(marker) > 0 ? (pid_t)atoi(marker) : getppid();
        if (kill(supervisor, SIGWINCH) == 0)
            snprintf(line, sizeof line, "signal to the parent delivered");
        else
            snprintf(line, sizeof line, "signal to the parent refused: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == NAMESPACE_ON_OPEN) {
        long child = syscall(SYS_clone, (unsigned long)(CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD), NULL, NULL, NULL, NULL);
        if (child == 0)
            _exit(0);
        if (child > 0) {
            waitpid((pid_t)child, NULL, 0);
            snprintf(line, sizeof line, "new namespace made");
        } else {
            snprintf(line, sizeof line, "new namespace refused: %s", strerror(errno));
        }
        host->log(disk, IOF_LOG_WARNING, line);
        if (unshare(CLONE_NEWNET) == 0)
            snprintf(line, sizeof line, "unshare succeeded");
        else
            snprintf(line, sizeof line, "unshare refused: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == FORK_ON_OPEN) {
        /* A child would outlive the worker, fork in a loop, or signal from elsewhere. */
        pid_t child = fork();
        if (child == 0) {
            for (;;)
                pause();
        }
        if (child > 0) {
            kill(child, SIGKILL);
            waitpid(child, NULL, 0);
            snprintf(line, sizeof line, "fork succeeded");
        } else {
            snprintf(line, sizeof line, "fork refused: %s", strerror(errno));
        }
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == BREAK_LISTENER_ON_OPEN) {
        /* fd 3 is the first listening socket the host hands a worker. */
        const char *what[] = {"shutdown", "dup2", "close"};
        int rc[3];
        rc[0] = shutdown(3, SHUT_RDWR) == 0 ? 0 : errno;
        rc[1] = dup2(0, 3) >= 0 ? 0 : errno;
        rc[2] = close(3) == 0 ? 0 : errno;
        for (int i = 0; i < 3; i++) {
            if (rc[i] == 0)
                snprintf(line, sizeof line, "%s of the listening socket succeeded", what[i]);
            else
                snprintf(line, sizeof line, "%s of the listening socket refused: %s", what[i], strerror(rc[i]));
            host->log(disk, IOF_LOG_WARNING, line);
        }
    }
    if (inst->behaviour == CONNECT_ON_OPEN) {
        /* `marker` names a unix socket: the host's control socket, in the tests. */
        const char *target = host->param(disk, "marker");
        struct sockaddr_un address = {.sun_family = AF_UNIX};
        snprintf(address.sun_path, sizeof address.sun_path, "%s", target ? target : "");
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&address, sizeof address) == 0)
            snprintf(line, sizeof line, "connect to the socket succeeded");
        else
            snprintf(line, sizeof line, "connect to the socket refused: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == CONNECT_TCP_ON_OPEN) {
        /* A TCP listener of the host's (the test's) on loopback. */
        const char *port = host->param(disk, "marker");
        struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port ? port : "0")),
                                      .sin_addr = {htonl(INADDR_LOOPBACK)}};
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&address, sizeof address) == 0)
            snprintf(line, sizeof line, "tcp connect succeeded");
        else
            snprintf(line, sizeof line, "tcp connect refused: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == PTRACE_ON_OPEN) {
        if (ptrace(PTRACE_ATTACH, getppid(), NULL, NULL) == 0)
            snprintf(line, sizeof line, "ptrace succeeded");
        else
            snprintf(line, sizeof line, "ptrace refused: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == REPORT_ON_OPEN) {
        char capabilities[32] = "?", text[4096];
        FILE *status = fopen("/proc/self/status", "r");
        while (status && fgets(text, sizeof text, status))
            if (strncmp(text, "CapEff:", 7) == 0)
                sscanf(text + 7, "%31s", capabilities);
        if (status)
            fclose(status);
        int processes = 0, interfaces = -2; /* /proc/net/dev has two header lines */
        DIR *proc = opendir("/proc");
        for (struct dirent *entry; proc && (entry = readdir(proc));)
            if (entry->d_name[0] >= '0' && entry->d_name[0] <= '9')
                processes++;
        if (proc)
            closedir(proc);
        FILE *dev = fopen("/proc/net/dev", "r");
        while (dev && fgets(text, sizeof text, dev))
            interfaces++;
        if (dev)
            fclose(dev);
        const char *marker = host->param(disk, "marker");
        struct stat info;
        snprintf(line, sizeof line, "identity uid=%u caps=%s processes=%d interfaces=%d marker=%s", (unsigned)getuid(),
                 capabilities, processes, interfaces, marker && stat(marker, &info) == 0 ? "visible" : "hidden");
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == THREADS_ON_OPEN) {
        /* Each thread waits for the pipe to close, then ends. Bounded at 4096. */
        int gate[2];
        int started = 0;
        if (pipe(gate) == 0) {
            pthread_t thread;
            while (started < 4096 && pthread_create(&thread, NULL, wait_for_gate, (void *)(intptr_t)gate[0]) == 0) {
                pthread_detach(thread);
                started++;
            }
            close(gate[1]);
        }
        snprintf(line, sizeof line, started < 4096 ? "thread creation refused after %d threads" : "threads never refused (%d)",
                 started);
        host->log(disk, IOF_LOG_WARNING, line);
    }
#if IOF_ABI_MINOR >= 1
    if (inst->behaviour == OPEN_TARGET_ON_OPEN) {
        const char *target = host->param(disk, "target");
        const char *marker = host->param(disk, "marker");
        if (host->struct_size < offsetof(struct iof_host_services, open_target) + sizeof host->open_target) {
            host->log(disk, IOF_LOG_WARNING, "the host has no open_target");
        } else {
            int fd = host->open_target(disk, target);
            if (fd >= 0 && pwrite(fd, "brokered", 8, 0) == 8)
                snprintf(line, sizeof line, "open_target of the target succeeded");
            else
                snprintf(line, sizeof line, "open_target of the target failed: %s", strerror(fd < 0 ? -fd : errno));
            if (fd >= 0)
                close(fd);
            host->log(disk, IOF_LOG_WARNING, line);
            fd = host->open_target(disk, marker);
            snprintf(line, sizeof line, "open_target of the marker %s", fd >= 0 ? "succeeded" : strerror(-fd));
            if (fd >= 0)
                close(fd);
            host->log(disk, IOF_LOG_WARNING, line);
        }
        int fd = open(target, O_RDWR | O_CREAT, 0600);
        snprintf(line, sizeof line, "direct open of the target %s", fd >= 0 ? "succeeded" : strerror(errno));
        if (fd >= 0)
            close(fd);
        host->log(disk, IOF_LOG_WARNING, line);
    }
#endif
    if (inst->behaviour == SYSV_ON_OPEN) {
        /* A SysV shared memory segment the test made outside the worker, by its key. */
        int id = shmget((key_t)0x10f17e57, 0, 0);
        if (id >= 0)
            snprintf(line, sizeof line, "the host's shared memory is reachable");
        else
            snprintf(line, sizeof line, "the host's shared memory is out of reach: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == SHRINK_HEARTBEAT_ON_OPEN) {
        /* With one disk a worker inherits: 3 the listening socket, 4 the control
         * channel, 5 the heartbeat page it shares with its supervisor. */
        if (ftruncate(5, 0) == 0)
            snprintf(line, sizeof line, "shrinking the heartbeat succeeded");
        else
            snprintf(line, sizeof line, "shrinking the heartbeat refused: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == KILL_EVERYTHING_ON_OPEN) {
        /* Every process this one may signal. Only ever run inside a pid namespace a test
         * made: if containment failed, it would end every process it can see. */
        if (kill(-1, SIGKILL) == 0)
            snprintf(line, sizeof line, "kill(-1) returned 0");
        else
            snprintf(line, sizeof line, "kill(-1) failed: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == REFUSE_OPEN) {
        free(inst);
        return EACCES;
    }
    if (inst->behaviour == EXEC_ON_OPEN) {
        const char *marker = host->param(disk, "marker");
        char command[512];
        snprintf(command, sizeof command, "touch '%s'", marker ? marker : "/tmp/iofilter-exec-marker");
        char *const argv[] = {"/bin/sh", "-c", command, NULL};
        char *const envp[] = {NULL};
        execve("/bin/sh", argv, envp);
        char line[128];
        snprintf(line, sizeof line, "execve refused: %s", strerror(errno));
        host->log(disk, IOF_LOG_WARNING, line);
    }
    if (inst->behaviour == OPEN_OUTSIDE) {
        const char *marker = host->param(disk, "marker");
        FILE *file = fopen(marker, "w");
        char line[256];
        snprintf(line, sizeof line, "open outside refused: %s", file ? "no, it was allowed" : strerror(errno));
        if (file)
            fclose(file);
        host->log(disk, IOF_LOG_WARNING, line);
    }
#ifdef WITH_DAEMON
    remember_disk(disk, info->disk_name);
#endif
    *out = inst;
    return 0;
}

static void tf_close(void *instance)
{
    struct instance *closing = instance;
    if (closing->behaviour == SLOW_CLOSE) {
        /* Says so in its sidecar, then takes its time: a test kills a worker here. */
        char path[4200];
        snprintf(path, sizeof path, "%s/closing", closing->sidecar);
        FILE *file = fopen(path, "w");
        if (file)
            fclose(file);
        sleep(3);
    }
#ifdef WITH_DAEMON
    forget_disk(((struct instance *)instance)->disk);
#endif
    free(instance);
}

static int tf_event(void *instance, const struct iof_disk_event *event)
{
    struct instance *inst = instance;
    char path[4200], line[512];
    snprintf(path, sizeof path, "%s/events.log", inst->sidecar);
    if (event->type == IOF_EVENT_SNAPSHOT)
        snprintf(line, sizeof line, "snapshot\n");
    else if (event->type == IOF_EVENT_CLONE)
        snprintf(line, sizeof line, "clone %s\n", event->target_name ? event->target_name : "?");
#if IOF_ABI_MINOR >= 5
    else if (event->type == IOF_EVENT_REVERT)
        snprintf(line, sizeof line, "revert %s\n", event->target_name ? event->target_name : "?");
#endif
#if IOF_ABI_MINOR >= 6
    else if (event->type == IOF_EVENT_UPGRADE)
        snprintf(line, sizeof line, "upgrade %s %s\n", event->from_version ? event->from_version : "?",
                 event->to_version ? event->to_version : "detached");
#endif
    else
        snprintf(line, sizeof line, "grow %llu\n", (unsigned long long)event->new_size);
    FILE *log = fopen(path, "a");
    if (log) {
        fputs(line, log);
        fclose(log);
    }
    if (inst->behaviour == VETO_SNAPSHOT && event->type == IOF_EVENT_SNAPSHOT) return EBUSY;
    if (inst->behaviour == VETO_GROW && event->type == IOF_EVENT_GROW) return ENOSPC;
#if IOF_ABI_MINOR >= 5
    if (inst->behaviour == VETO_REVERT && event->type == IOF_EVENT_REVERT) return EBUSY;
#endif
#if IOF_ABI_MINOR >= 6
    if (inst->behaviour == VETO_UPGRADE && event->type == IOF_EVENT_UPGRADE) return EBUSY;
#endif
    return 0;
}

static void invert(struct iof_request *req)
{
    unsigned char *bytes = req->buffer;
    for (uint64_t i = 0; i < req->length; i++)
        bytes[i] ^= 0xff;
}

static enum iof_disposition tf_start(void *instance, struct iof_request *req, void **priv)
{
    struct instance *inst = instance;
    *priv = (void *)(uintptr_t)0x5eed; /* checked in done: the slot must come back intact */
    switch (inst->behaviour) {
    case DEFER:
        return defer_to_resumer(req);
    case DEFER_ON_HOST:
        return defer_on_host(req);
    case SEGV_ON_WRITE:
        if (req->op == IOF_OP_WRITE)
            *null_pointer() = 1;
        return IOF_PASS;
    case HOLD_MEMORY_ON_READ:
        /* Allocates, touches and keeps `marker` MiB (once): memory in use, not a leak
         * without bound. */
        if (req->op == IOF_OP_READ && req->offset >= (1u << 20)) {
            static char *held;
            if (!held) {
                const char *marker = host->param(inst->disk, "marker");
                size_t mib = marker && atoi(marker) > 0 ? (size_t)atoi(marker) : 200;
                held = malloc(mib << 20);
                if (held)
                    memset(held, 0x5a, mib << 20);
                char line[96];
                snprintf(line, sizeof line, "holding %zu MiB: %s", mib, held ? "done" : "refused");
                host->log(inst->disk, IOF_LOG_WARNING, line);
            }
        }
        return IOF_PASS;
    case ALLOCATE_ON_READ:
        if (req->op == IOF_OP_READ && req->offset >= (1u << 20)) {
            /* Allocates and touches 64 MiB at a time until refused. Bounded at 4 GiB so
             * that a host whose limit failed cannot be hurt by this test. */
            enum { chunk = 64 << 20, most = 64 };
            void *chunks[most];
            int count = 0;
            while (count < most && (chunks[count] = malloc(chunk)) != NULL) {
                memset(chunks[count], 0x5a, chunk);
                count++;
            }
            char line[128];
            if (count < most)
                snprintf(line, sizeof line, "allocation refused after %d MiB", count * 64);
            else
                snprintf(line, sizeof line, "allocation never refused (%d MiB)", count * 64);
            host->log(NULL, IOF_LOG_WARNING, line);
            while (count > 0)
                free(chunks[--count]);
            req->error = ENOMEM;
            return IOF_FAIL;
        }
        return IOF_PASS;
    case FREEZE_ON_READ:
        /* Stops the whole worker, its watchdog thread included. */
        if (req->op == IOF_OP_READ && req->offset >= (1u << 20)) {
            raise(SIGSTOP);
            host->log(inst->disk, IOF_LOG_WARNING, "stopping the worker had no effect");
        }
        return IOF_PASS;
    case FREEZE_WATCHDOG_ON_READ:
        /* Parks the worker's own watchdog thread in a signal handler that never returns,
         * then hangs the request: only the supervisor can end this. */
        if (req->op == IOF_OP_READ && req->offset >= (1u << 20)) {
            int frozen = freeze_thread_named("watchdog");
            host->log(inst->disk, IOF_LOG_WARNING, frozen > 0 ? "froze the watchdog thread" : "found no watchdog thread to freeze");
            for (;;)
                pause();
        }
        return IOF_PASS;
    case HOLD_WRITES:
        if (req->op == IOF_OP_WRITE) {
            char path[4200];
            snprintf(path, sizeof path, "%s/hold", inst->sidecar);
            int logged = 0;
            while (access(path, F_OK) == 0) {
                if (!logged++)
                    host->log(inst->disk, IOF_LOG_WARNING, "holding a write");
                usleep(10000);
            }
        }
        return IOF_PASS;
    case HANG_ON_READ:
        if (req->op == IOF_OP_READ && req->offset >= (1u << 20))
            for (;;)
                pause();
        return IOF_PASS;
    case FAIL_WRITES:
        if (req->op == IOF_OP_WRITE) {
            req->error = ENOSPC;
            return IOF_FAIL;
        }
        return IOF_PASS;
    case INVERT:
        if (req->op == IOF_OP_WRITE)
            invert(req);
        return IOF_PASS;
    default:
        return IOF_PASS;
    }
}

static enum iof_disposition tf_done(void *instance, struct iof_request *req, void *priv)
{
    struct instance *inst = instance;
    if (priv != (void *)(uintptr_t)0x5eed) {
        host->log(inst->disk, IOF_LOG_ERROR, "request_private slot was not preserved");
        req->error = EIO;
        return IOF_FAIL;
    }
    if (inst->behaviour == INVERT && req->error == 0 && (req->op == IOF_OP_READ || req->op == IOF_OP_WRITE))
        invert(req); /* reads: decode; writes: give the caller its buffer back as it was */
    if (inst->behaviour == DEFER)
        return defer_to_resumer(req);
    if (inst->behaviour == DEFER_ON_HOST)
        return defer_on_host(req);
    return IOF_PASS;
}

/* --- health and lag, read from the sidecar (see the top) -------------------------- */

static int read_sidecar(struct instance *inst, const char *name, char *text, size_t size)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", inst->sidecar, name);
    FILE *file = fopen(path, "r");
    if (!file) return -1;
    size_t n = fread(text, 1, size - 1, file);
    fclose(file);
    text[n] = 0;
    while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == ' ')) text[--n] = 0;
    return 0;
}

#if IOF_ABI_MINOR >= 5
static int add_changed(void *arg, uint64_t offset, uint64_t length, int changed)
{
    (void)offset;
    if (changed) *(uint64_t *)arg += length;
    return 0;
}
#endif

static void tf_stats(void *instance, iof_stat_emitter emit, void *emit_ctx)
{
    char text[128];
    double lag, rpo;
    emit(emit_ctx, "opened", 1);
    if (read_sidecar(instance, "lag", text, sizeof text) == 0 && sscanf(text, "%lf %lf", &lag, &rpo) == 2) {
        emit(emit_ctx, "lag_seconds", lag);
        emit(emit_ctx, "rpo_seconds", rpo);
    }
#if IOF_ABI_MINOR >= 5
    /* Changed-block tracking through the ABI: how many checkpoints the disk has, and
     * how much changed since the one the sidecar file `tracking` names (-errno if the
     * host refuses). */
    struct instance *inst = instance;
    if (host->struct_size >= offsetof(struct iof_host_services, changed_extents) + sizeof host->changed_extents) {
        char name[128];
        uint32_t count = 0;
        while (host->checkpoint_name(inst->disk, count, name, sizeof name) == 0) count++;
        emit(emit_ctx, "checkpoints", count);
        if (read_sidecar(instance, "tracking", text, sizeof text) == 0) {
            uint64_t changed = 0;
            int rc = host->changed_extents(inst->disk, text, 0, inst->size, add_changed, &changed);
            emit(emit_ctx, "changed_bytes", rc == 0 ? (double)changed : -(double)rc);
        }
    }
#endif
}

#if IOF_ABI_MINOR >= 4
static enum iof_health tf_health(void *instance, char *reason, size_t reason_size)
{
    char text[1024];
    if (read_sidecar(instance, "health", text, sizeof text) != 0) return IOF_HEALTH_OK;
    const char *space = strchr(text, ' ');
    snprintf(reason, reason_size, "%s", space ? space + 1 : "");
    if (strncmp(text, "degraded", 8) == 0) return IOF_HEALTH_DEGRADED;
    if (strncmp(text, "failed", 6) == 0) return IOF_HEALTH_FAILED;
    if (strncmp(text, "ok", 2) == 0) return IOF_HEALTH_OK;
    return (enum iof_health)atoi(text);
}
#endif

/* --- descriptor ------------------------------------------------------------------- */

#ifdef BAD_ENUM_SCHEMA
static const char *const no_values[] = {NULL};
#endif

static const struct iof_param_spec params[] = {
    {sizeof(struct iof_param_spec), "behaviour", "what the test filter does", IOF_PARAM_ENUM, 0, "pass", 0, 0,
#ifdef BAD_ENUM_SCHEMA
     no_values},
#else
     behaviours},
#endif
    {sizeof(struct iof_param_spec), "marker", "file exec-on-open tries to create", IOF_PARAM_STRING, 0,
     "/tmp/iofilter-exec-marker", 0, 0, NULL},
#ifdef BAD_RANGE_SCHEMA
    {sizeof(struct iof_param_spec), "depth", "a range with min above max", IOF_PARAM_INT, 0, "5", 10, 1, NULL},
#elif defined(BAD_DEFAULT_SCHEMA)
    {sizeof(struct iof_param_spec), "depth", "a default outside its range", IOF_PARAM_INT, 0, "99", 1, 10, NULL},
#else
    {sizeof(struct iof_param_spec), "depth", "queue depth", IOF_PARAM_INT, 0, "4", 1, 64, NULL},
#endif
    {sizeof(struct iof_param_spec), "size", "a size", IOF_PARAM_SIZE, 0, "1M", 4096, 1LL << 40, NULL},
    {sizeof(struct iof_param_spec), "target", "a file or NBD URI the host opens for open-target-on-open",
     IOF_PARAM_STRING, IOF_PARAM_PATH, "", 0, 0, NULL},
};

static int32_t add(int32_t a, int32_t b) { return a + b; }
static const enum iof_value_type two_ints[] = {IOF_VALUE_INT32, IOF_VALUE_INT32};

#ifdef WITH_DAEMON
/* --- the partner daemon ------------------------------------------------------------ */

static long daemon_starts;

static int read_line(int fd, char *line, size_t size)
{
    size_t used = 0;
    while (used + 1 < size) {
        ssize_t n = read(fd, line + used, 1);
        if (n <= 0) return -1;
        if (line[used] == '\n') break;
        used++;
    }
    line[used] = 0;
    return (int)used;
}

static void write_all(int fd, const char *text)
{
    size_t left = strlen(text);
    while (left > 0) {
        ssize_t n = write(fd, text, left);
        if (n <= 0) return;
        text += n;
        left -= (size_t)n;
    }
}

static void *echo_channel(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char line[1024], reply[1200];
    while (read_line(fd, line, sizeof line) >= 0) {
        snprintf(reply, sizeof reply, "echo %ld %s\n", daemon_starts, line);
        write_all(fd, reply);
    }
    close(fd);
    return NULL;
}

static void *answer_peers(void *arg)
{
    int listener = (int)(intptr_t)arg;
    for (;;) {
        int peer = accept(listener, NULL, NULL);
        if (peer < 0) continue;
        char reply[64];
        snprintf(reply, sizeof reply, "peer %ld\n", daemon_starts);
        write_all(peer, reply);
        close(peer);
    }
    return NULL;
}

static int tf_daemon_main(const struct iof_host_services *services, int listen_fd)
{
    FILE *counter = fopen("starts", "r");
    if (counter) {
        if (fscanf(counter, "%ld", &daemon_starts) != 1) daemon_starts = 0;
        fclose(counter);
    }
    daemon_starts++;
    counter = fopen("starts", "w");
    if (counter) {
        fprintf(counter, "%ld\n", daemon_starts);
        fclose(counter);
    }
    int probe = socket(AF_INET, SOCK_STREAM, 0);
    char line[160];
    snprintf(line, sizeof line, "daemon start %ld; socket(2): %s", daemon_starts, probe < 0 ? strerror(errno) : "allowed");
    if (probe >= 0) close(probe);
    services->log(NULL, IOF_LOG_WARNING, line);
#if IOF_ABI_MINOR >= 3
    if (services->struct_size > offsetof(struct iof_host_services, peer_listener)) {
        int peers = services->peer_listener();
        snprintf(line, sizeof line, "daemon peer listener: %d", peers);
        services->log(NULL, IOF_LOG_WARNING, line);
        /* Not a replication plug-in (unless built as one): the host keeps no replica for it. */
        int replica = services->open_replica("probe", 1 << 20);
        snprintf(line, sizeof line, "daemon open_replica: %s", replica < 0 ? strerror(-replica) : "allowed");
        if (replica >= 0) close(replica);
        services->log(NULL, IOF_LOG_WARNING, line);
        if (peers >= 0) {
            pthread_t thread;
            pthread_create(&thread, NULL, answer_peers, (void *)(intptr_t)peers);
            pthread_detach(thread);
        }
    }
#endif
    for (;;) {
        int channel = accept(listen_fd, NULL, NULL);
        if (channel < 0) continue;
        pthread_t thread;
        pthread_create(&thread, NULL, echo_channel, (void *)(intptr_t)channel);
        pthread_detach(thread);
    }
    return 0;
}

/* The open instances, for daemon_echo. */
static pthread_mutex_t instances_lock = PTHREAD_MUTEX_INITIALIZER;
static iof_host_disk *open_disks[64];
static char open_names[64][128];

static void remember_disk(iof_host_disk *disk, const char *name)
{
    pthread_mutex_lock(&instances_lock);
    for (int i = 0; i < 64; i++)
        if (!open_disks[i]) {
            open_disks[i] = disk;
            snprintf(open_names[i], sizeof open_names[i], "%s", name);
            break;
        }
    pthread_mutex_unlock(&instances_lock);
}

static void forget_disk(iof_host_disk *disk)
{
    pthread_mutex_lock(&instances_lock);
    for (int i = 0; i < 64; i++)
        if (open_disks[i] == disk) open_disks[i] = NULL;
    pthread_mutex_unlock(&instances_lock);
}

static const char *daemon_echo(const char *text)
{
    static char result[4096];
    result[0] = 0;
    pthread_mutex_lock(&instances_lock);
    for (int i = 0; i < 64; i++) {
        if (!open_disks[i]) continue;
        char line[1200], reply[1200];
        int fd = host->daemon_channel(open_disks[i]);
        if (fd < 0) {
            snprintf(reply, sizeof reply, "down");
        } else {
            snprintf(line, sizeof line, "%s %s\n", open_names[i], text);
            write_all(fd, line);
            if (read_line(fd, reply, sizeof reply) < 0) snprintf(reply, sizeof reply, "closed");
        }
        size_t used = strlen(result);
        snprintf(result + used, sizeof result - used, "%s=%s;", open_names[i], reply);
    }
    pthread_mutex_unlock(&instances_lock);
    return result;
}
static const enum iof_value_type one_string[] = {IOF_VALUE_STRING};
#endif

static const struct iof_mgmt_op ops[] = {
    {sizeof(struct iof_mgmt_op), "add", "adds two numbers", (void (*)(void))add, IOF_VALUE_INT32, 2, two_ints, NULL},
#ifdef WITH_DAEMON
    {sizeof(struct iof_mgmt_op), "daemon_echo", "echoes text through the daemon over every instance's channel",
     (void (*)(void))daemon_echo, IOF_VALUE_STRING, 1, one_string, NULL},
#endif
};

static const struct iof_plugin descriptor = {
    .struct_size = STRUCT_SIZE_VALUE,
    .abi_major = ABI_MAJOR_VALUE,
    .abi_minor = ABI_MINOR_VALUE,
    .name = PLUGIN_NAME,
    .vendor = "Test Vendor",
    .version = PLUGIN_VERSION,
    .description = "configurable test filter",
    .category = CATEGORY,
    .thread_model = THREAD_MODEL,
    .param_count = sizeof params / sizeof params[0],
    .params = params,
    .mgmt_op_count = sizeof ops / sizeof ops[0],
    .mgmt_ops = ops,
    .load = tf_load,
    .attach = tf_attach,
    .open = tf_open,
    .close = tf_close,
#ifndef NO_START
    .start = tf_start,
#endif
    .done = tf_done,
    .event = tf_event,
    .stats = tf_stats,
#ifdef WITH_DAEMON
    .daemon_main = tf_daemon_main,
#if defined(DAEMON_LISTENS) && IOF_ABI_MINOR >= 3
    .daemon_flags = IOF_DAEMON_LISTENS,
#endif
#endif
#if IOF_ABI_MINOR >= 4
    .health = tf_health,
#endif
};

#ifndef NO_ENTRY
IOF_EXPORT const struct iof_plugin *iof_plugin_entry(void)
{
#if defined(ENTRY_RETURNS_NULL)
    return NULL;
#elif defined(ENTRY_ABORTS)
    abort();
#elif defined(ENTRY_HANGS)
    for (;;)
        pause();
#else
    return &descriptor;
#endif
}
#else
IOF_EXPORT int some_other_symbol(void) { return descriptor.category; }
#endif
