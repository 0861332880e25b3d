/*
 * iofilter.h — the swift-iofilter plug-in ABI, version 1.5.
 *
 * A filter plug-in is a shared object that exports one function,
 *
 *     const struct iof_plugin *iof_plugin_entry(void);
 *
 * which returns a descriptor that lives as long as the object is loaded. The host
 * (a sandboxed worker process) reads the descriptor, checks it, and from then on
 * calls the plug-in only through the function pointers in it. Everything a plug-in
 * may ask of the host arrives in a struct iof_host_services.
 *
 * Build a C plug-in with nothing but this header:
 *
 *     cc -shared -fPIC -Iinclude -o myfilter.so myfilter.c
 *
 * Compatibility rules
 *   - Every struct begins with `struct_size`, set by whoever fills the struct to
 *     sizeof() as *it* was compiled. Readers never touch fields beyond struct_size;
 *     fields added in later minor versions are appended at the end.
 *   - The descriptor carries abi_major/abi_minor. The host refuses a different major
 *     and accepts any minor up to its own.
 *   - Strings are NUL-terminated UTF-8 and owned by the plug-in unless said otherwise.
 *
 * Where a request goes
 *   A request travels from the consumer (a guest, qemu-img, a backup tool) down the
 *   chain to the disk. Filters sit in fixed category order, one per category at most:
 *
 *       consumer -> inspection -> replication -> encryption -> cache -> qos -> disk
 *
 *   Each filter's `start` decides the request's disposition: pass it down, complete it
 *   itself, fail it, or defer that decision. On the way back up, each filter that
 *   passed the request sees the result in `done`, the one nearest the disk first.
 *
 * Plain C99; no Swift is needed to build or use a plug-in.
 */
#ifndef IOFILTER_H
#define IOFILTER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IOF_ABI_MAJOR 1
#define IOF_ABI_MINOR 7

/* The name of the one symbol a plug-in exports. */
#define IOF_PLUGIN_ENTRY_SYMBOL "iof_plugin_entry"

#if defined(__GNUC__) || defined(__clang__)
#define IOF_EXPORT __attribute__((visibility("default")))
#else
#define IOF_EXPORT
#endif

/* ------------------------------------------------------------------------------ */
/* Enumerations                                                                     */
/* ------------------------------------------------------------------------------ */

/* A filter's category fixes its place in the chain; a disk has at most one filter of
 * each. Values are the order, consumer side first. */
enum iof_category {
    IOF_CATEGORY_INSPECTION  = 1, /* sees requests as the consumer issued them       */
    IOF_CATEGORY_REPLICATION = 2, /* sees every write before a cache can absorb it   */
    IOF_CATEGORY_ENCRYPTION  = 3, /* above the cache: cache and disk hold ciphertext */
    IOF_CATEGORY_CACHE       = 4,
    IOF_CATEGORY_QOS         = 5  /* storage I/O control, nearest the disk           */
};

/* What `start` (and `done`) decides for a request. */
enum iof_disposition {
    IOF_PASS     = 0, /* start: send it to the next layer down. done: let the result go up.  */
    IOF_COMPLETE = 1, /* start: the filter finished it (e.g. a cache hit filled the buffer).  */
    IOF_FAIL     = 2, /* fail it with req->error (a positive errno; EIO if left at 0).        */
    IOF_DEFER    = 3  /* decide later: call host->resume() exactly once, from any thread.     */
};

enum iof_op {
    IOF_OP_READ         = 0, /* fill buffer[0..length) from the disk                         */
    IOF_OP_WRITE        = 1, /* write buffer[0..length) to the disk                          */
    IOF_OP_FLUSH        = 2, /* make every completed write durable; offset/length are 0      */
    IOF_OP_TRIM         = 3, /* the range's contents may be discarded (a hint)               */
    IOF_OP_WRITE_ZEROES = 4, /* the range must read back as zeroes                           */
    /* --- ABI 1.2. A filter sees these only if its descriptor declares them
     * (IOF_PLUGIN_BLOCK_STATUS, IOF_PLUGIN_CACHE); the host passes them by every other
     * filter (see IOF_PLUGIN_BLOCK_STATUS for the exception). --------------------- */
    IOF_OP_BLOCK_STATUS = 5, /* what [offset, offset+length) holds: the disk answers with
                                extents (host->extent, host->set_extent); buffer is NULL   */
    IOF_OP_CACHE        = 6  /* a hint: the consumer will read the range soon (prefetch)    */
};

/* Request flags (iof_request.flags). */
#define IOF_REQ_FUA     (1u << 0) /* write/trim/write-zeroes: durable before completion   */
#define IOF_REQ_NO_HOLE (1u << 1) /* write-zeroes: allocate, do not punch a hole          */
/* ABI 1.2. write-zeroes: fail at once with ENOTSUP unless the zeroes can be had
 * without writing them (a hole punched, a range zeroed in metadata); the consumer
 * then writes them itself. Filters built for 1.1 see it and may ignore it. */
#define IOF_REQ_FAST_ZERO (1u << 2)

/* ABI 1.2. What an extent of IOF_OP_BLOCK_STATUS is (NBD's base:allocation). */
#define IOF_EXTENT_HOLE (1u << 0) /* not allocated                                        */
#define IOF_EXTENT_ZERO (1u << 1) /* reads as zeroes                                      */

/* How the host may call one filter instance concurrently. */
enum iof_thread_model {
    IOF_THREADS_SERIALIZE_ALL      = 0, /* one call at a time across every disk of the plug-in */
    IOF_THREADS_SERIALIZE_PER_DISK = 1, /* one call at a time per disk (per instance)           */
    IOF_THREADS_PARALLEL           = 2  /* any number of calls at once, from any threads        */
};

/* ABI 1.4. What a filter instance says of itself (iof_plugin.health). The host shows
 * it to operators (CLI, API, console, /metrics), derives the disk's and the VM's health
 * from it, and records an event with a severity each time it changes. */
enum iof_health {
    IOF_HEALTH_OK       = 0, /* doing what its policy asks                                   */
    IOF_HEALTH_DEGRADED = 1, /* serving, but not as asked: a replica behind its RPO or out of
                                reach, a cache bypassed, a key about to expire              */
    IOF_HEALTH_FAILED   = 2  /* not doing its job: requests fail, or protection is lost      */
};

enum iof_log_level {
    IOF_LOG_ERROR = 0,
    IOF_LOG_WARNING = 1,
    IOF_LOG_INFO = 2,
    IOF_LOG_DEBUG = 3
};

/* ------------------------------------------------------------------------------ */
/* Capabilities: the typed parameters a policy may set                              */
/* ------------------------------------------------------------------------------ */

enum iof_param_type {
    IOF_PARAM_BOOL   = 1, /* "true" / "false"                                            */
    IOF_PARAM_INT    = 2, /* signed 64-bit, checked against [min, max]                   */
    IOF_PARAM_SIZE   = 3, /* bytes; accepts suffixes K M G T (powers of 1024); [min, max] */
    IOF_PARAM_STRING = 4, /* any text                                                    */
    IOF_PARAM_ENUM   = 5  /* one of enum_values                                          */
};

#define IOF_PARAM_REQUIRED (1u << 0) /* a policy must set it; default_value is ignored */
/* The value names a file the filter opens itself (a replica, a cache device). The
 * worker's sandbox lets it read and write that file (or, if it does not exist yet, its
 * directory). A value that is a URI ("scheme://…") is left alone. STRING only. */
#define IOF_PARAM_PATH (1u << 1)

struct iof_param_spec {
    uint32_t struct_size;
    const char *name;          /* [a-z][a-z0-9_-]*, unique in the plug-in                   */
    const char *description;   /* one line, shown to operators                             */
    enum iof_param_type type;
    uint32_t flags;            /* IOF_PARAM_REQUIRED                                        */
    const char *default_value; /* text form, as a policy would write it; NULL if required   */
    int64_t min;               /* INT and SIZE: inclusive bounds; min <= max                */
    int64_t max;
    const char *const *enum_values; /* ENUM: NULL-terminated list, at least one value       */
};

/* ------------------------------------------------------------------------------ */
/* Management operations (called by operators through libffi)                       */
/* ------------------------------------------------------------------------------ */

/* Types a management operation may take and return. The host converts command-line
 * or API arguments to these and refuses wrong counts or types before the call. */
enum iof_value_type {
    IOF_VALUE_VOID   = 0, /* return type only                                          */
    IOF_VALUE_INT32  = 1, /* int32_t                                                   */
    IOF_VALUE_INT64  = 2, /* int64_t                                                   */
    IOF_VALUE_UINT32 = 3, /* uint32_t                                                  */
    IOF_VALUE_UINT64 = 4, /* uint64_t                                                  */
    IOF_VALUE_DOUBLE = 5, /* double                                                    */
    IOF_VALUE_BOOL   = 6, /* int: 0 or 1                                               */
    IOF_VALUE_STRING = 7  /* const char *; a returned string stays owned by the plug-in
                             and must stay valid until the next call on the same thread */
};

#define IOF_MGMT_MAX_ARGS 16

struct iof_mgmt_op {
    uint32_t struct_size;
    const char *name;                      /* [a-z][a-z0-9_-]*, unique in the plug-in     */
    const char *description;
    void (*function)(void);                /* the real C function, cast to this type      */
    enum iof_value_type return_type;
    uint32_t arg_count;                    /* at most IOF_MGMT_MAX_ARGS                   */
    const enum iof_value_type *arg_types;  /* arg_count entries, none IOF_VALUE_VOID      */
    const char *const *arg_names;          /* arg_count entries, for help text; may be NULL */
};

/* ------------------------------------------------------------------------------ */
/* Requests                                                                         */
/* ------------------------------------------------------------------------------ */

struct iof_request {
    uint32_t struct_size;
    enum iof_op op;
    uint32_t flags;      /* IOF_REQ_*                                                      */
    int32_t error;       /* 0, or a positive errno once failed                             */
    uint64_t offset;     /* bytes from the start of the disk                               */
    uint64_t length;     /* bytes; 0 for FLUSH                                             */
    void *buffer;        /* READ: to fill; WRITE: the data. NULL for other ops.
                            A filter may change the bytes (encryption), nothing else: the
                            host checks op, flags, offset, length and buffer after every
                            start and done, and fails a request that was changed with EIO
                            (the log names the filter). */
    uint64_t id;         /* unique among requests in flight on this disk, for logs         */
    const void *host_private; /* the host's; never touch                                   */
};

/* A disk as a filter sees it when it is opened or attached. */
struct iof_disk_info {
    uint32_t struct_size;
    const char *disk_name;   /* the disk's name within its VM                               */
    const char *vm_name;     /* the VM (worker) the disk belongs to                         */
    uint64_t size;           /* bytes                                                      */
    int read_only;           /* non-zero: the consumer may not write                       */
    const char *sidecar_dir; /* a directory only this filter on this disk uses; survives
                                restarts; created on attach and deleted on detach          */
};

enum iof_disk_event_type {
    /* A point-in-time snapshot `target_name` is being taken. The host holds the disk's
     * consumers' requests back (none is in flight) while every filter hears of it:
     * flush what you hold that the disk below lacks (a write-back cache destages
     * through submit_below). The snapshot is the disk as consumers see it the moment
     * the last filter returns; a veto cancels it. */
    IOF_EVENT_SNAPSHOT = 1,
    IOF_EVENT_CLONE    = 2, /* the disk is being cloned to `target_name`                  */
    IOF_EVENT_GROW     = 3, /* the disk grew to `new_size`                                */
    /* ABI 1.5. The disk's contents are about to be replaced by those of the snapshot
     * `target_name` (its VM is stopped). Forget what you hold of the old contents: a
     * cache drops its blocks (dirty ones too: they belong to the contents being
     * replaced), a replication filter plans a full resync. Every block is then written
     * through the chain, so you see the new contents as writes. A veto leaves the disk
     * as it was. Plug-ins built for older minors never receive it. */
    IOF_EVENT_REVERT   = 4,
    /* ABI 1.6. A live change of the running VM's chain: a newer (or older) version of a
     * plug-in, other parameters, a filter attached or detached. Its clients stay
     * connected: once every filter agreed, this worker stops taking their requests,
     * answers those it took, closes its filters (`close`, as at a stop) and hands the
     * clients to a new worker, which opens the new chain (`open`) and goes on. This
     * filter is `from_version` now; `to_version` takes over from it (the same for a
     * change of parameters or of the filters around it; NULL when it is detached, and
     * `detach` follows its `close`). Keep what the new instance needs where it finds it
     * (a replication journal, a cache's blocks and map: the sidecar directory stays); a
     * veto refuses the whole change and nothing changes. Plug-ins built for older
     * minors never receive it: they are closed and opened again as at a restart.
     * A restart of the host itself is no event at all: the worker (and a partner
     * daemon) serves on and the next host adopts it; your filter is neither closed
     * nor opened, and only a daemon channel or target your filter asks for while no
     * host runs fails (retry it, as after a daemon restart). */
    IOF_EVENT_UPGRADE  = 5
};

struct iof_disk_event {
    uint32_t struct_size;
    enum iof_disk_event_type type;
    uint64_t new_size;        /* GROW                                                       */
    const char *target_name;  /* CLONE: the new disk; SNAPSHOT: the snapshot; REVERT: the
                                 snapshot the disk reverts to                               */
    /* ABI 1.6 (read them only if struct_size covers them). UPGRADE: */
    const char *from_version; /* this filter's plug-in version                              */
    const char *to_version;   /* the version taking over; NULL: the filter is detached      */
};

/* ------------------------------------------------------------------------------ */
/* Services the host gives to the plug-in                                           */
/* ------------------------------------------------------------------------------ */

/* The opaque handle the host passes with every per-disk call; hand it back to the
 * services below. */
typedef struct iof_host_disk iof_host_disk;

/* Completion callback for iof_host_services.submit_below. `error` is 0 or an errno. */
typedef void (*iof_io_callback)(void *arg, int error);
typedef void (*iof_timer_callback)(void *arg);
/* Receives one statistic; called from inside the plug-in's `stats` callback. */
typedef void (*iof_stat_emitter)(void *emit_ctx, const char *key, double value);
/* ABI 1.7. What the host calls, on one of its threads, for a request a filter deferred
 * with defer_call. */
typedef void (*iof_deferred_call)(struct iof_request *req, void *arg);

/* ABI 1.5. Receives one run of a changed_extents answer: `changed` is 1 if the run
 * changed since the checkpoint. Return 0 to go on, non-zero to stop early. */
typedef int (*iof_change_emitter)(void *arg, uint64_t offset, uint64_t length, int changed);

struct iof_host_services {
    uint32_t struct_size;
    uint16_t abi_major;
    uint16_t abi_minor;

    /* Log a line; the host adds the plug-in's name, the disk, and the time. `disk` may
     * be NULL for messages not about one disk. */
    void (*log)(iof_host_disk *disk, enum iof_log_level level, const char *message);

    /* A policy parameter's value in text form (the default if the policy did not set
     * it), or NULL for an unknown key. Valid while the disk is open. */
    const char *(*param)(iof_host_disk *disk, const char *key);

    /* Finish a decision that `start` or `done` deferred. `disposition` is what the call
     * would have returned (never IOF_DEFER; anything else fails the request with EIO);
     * for IOF_FAIL pass a positive errno (EIO if not).
     * Call exactly once per deferral, from any thread, even before `start` returns.
     * The host may carry the request on inside this call (down to the disk and up
     * through `done` callbacks, yours included): do not hold a lock of your own that
     * `done` takes while calling it. Exception: called from inside a callback of a
     * filter whose thread model serializes calls (SERIALIZE_ALL, SERIALIZE_PER_DISK),
     * the host carries the request on after that callback has returned, so resuming
     * one request while handling another never deadlocks on the host's serialization.
     * The host refuses, logs against the filter and otherwise ignores a resume of a
     * pointer that is no request in flight, of a request that is not waiting for a
     * decision (resumed already, or never deferred), and a resume from a callback that
     * then does not return IOF_DEFER. A second resume that arrives after the request
     * has moved on to another deferral cannot be told from a resume of that one: the
     * rule "exactly once" is the filter's to keep. */
    void (*resume)(struct iof_request *req, enum iof_disposition disposition, int error);

    /* Issue I/O of the filter's own to the layers below it (e.g. a write-back cache
     * destaging, a replication filter reading the disk for its initial sync). Returns 0
     * if submitted — `callback` then runs exactly once, on any thread — or an errno.
     * `buffer` must stay valid until the callback. */
    int (*submit_below)(iof_host_disk *disk, enum iof_op op, uint32_t flags,
                        uint64_t offset, uint64_t length, void *buffer,
                        iof_io_callback callback, void *arg);

    /* Run `callback` after `delay_ns`, then every `interval_ns` if non-zero, on a host
     * thread. Returns a timer id (never 0), or 0 on failure. Timers of a disk stop at
     * close; cancel_timer waits for a running callback to return. */
    uint64_t (*start_timer)(iof_host_disk *disk, uint64_t delay_ns, uint64_t interval_ns,
                            iof_timer_callback callback, void *arg);
    void (*cancel_timer)(iof_host_disk *disk, uint64_t timer_id);

    /* A connected stream socket to this plug-in's partner daemon (its `daemon_main`),
     * or -1 if the plug-in declares none or the daemon is not running (it is being
     * restarted, or failed): the filter decides itself whether to pass, fail or defer
     * until it is back. The host connects it (the worker has no path or network of its
     * own); the daemon accepts it on its `listen_fd`. What passes on it is the plug-in's
     * own protocol; the host never reads it.
     * The fd belongs to the host: each call returns the disk's channel, the same one as
     * long as it lives; once the daemon has closed it (a restart) the next call gives a
     * fresh one. Do not close it, and call again rather than keep the number. */
    int (*daemon_channel)(iof_host_disk *disk);

    /* --- ABI 1.1; check struct_size (or abi_minor >= 1) before calling ------------- */

    /* Open a target the policy named for this filter: the value of one of its
     * IOF_PARAM_PATH parameters, exactly as given. A file path is opened read-write
     * (created 0600 if missing; a regular file or a block device); an NBD URI gives a
     * stream socket connected to that server, before the NBD handshake. Returns an fd
     * the filter owns (it closes it), or a negative errno: -EACCES for a target the
     * policy did not name.
     * This is the only way a filter reaches a file outside its sidecar directory or
     * anything on the network: a sandboxed worker has no path to the host's files and
     * no network of its own; the host opens the target and hands the fd over. `disk` may
     * be NULL (from a thread of the plug-in's own): then any target named for a filter
     * of this worker is allowed. */
    int (*open_target)(iof_host_disk *disk, const char *spec);

    /* --- ABI 1.2; check struct_size (or abi_minor >= 2) before calling ------------- */

    /* The extents of an IOF_OP_BLOCK_STATUS request, in `done` after the layers below
     * answered (or in `start`, before completing it yourself: the range then starts as
     * one extent of data). Extents are contiguous from req->offset and may cover less
     * than req->length (the layers below may answer only a prefix).
     * extent() returns 0 and fills the outputs, or ERANGE past the last. */
    uint32_t (*extent_count)(struct iof_request *req);
    int (*extent)(struct iof_request *req, uint32_t index, uint64_t *offset, uint64_t *length,
                  uint32_t *flags);
    /* Make [offset, offset+length) one extent with IOF_EXTENT_* `flags`, splitting and
     * merging neighbours; clipped to what the extents cover. A cache marks what it holds
     * as data (flags 0); an encryption filter marks holes as data unless it knows that
     * zeroes below read as zeroes above. Returns 0, or EINVAL. */
    int (*set_extent)(struct iof_request *req, uint64_t offset, uint64_t length, uint32_t flags);

    /* --- ABI 1.3; check struct_size (or abi_minor >= 3) before calling ------------- */

    /* For a partner daemon only: in a worker peer_listener gives -1 and open_replica
     * -EPERM.
     *
     * The socket on which the daemon accepts its peers on other hosts: a listening TCP
     * socket the host opened at the address the operator allowed for this plug-in
     * (`iofilter plugin daemon-listen NAME HOST:PORT`), or -1 if none is allowed or the
     * plug-in does not declare IOF_DAEMON_LISTENS. The fd belongs to the host. A daemon
     * has no other network: outgoing connections to peers go through open_target, with
     * a NULL disk and an `iofilter://HOST:PORT/…` target that a policy using this
     * plug-in names. */
    int (*peer_listener)(void);
    /* Open, creating it the first time with `size` bytes, the disk `name` of this host
     * as a replica this plug-in keeps: the host lists it (`iofilter disk list`), keeps
     * it read-only to VMs while it is a replica, and hands the daemon a read-write fd to
     * it (the daemon closes it). Returns the fd or a negative errno: -EEXIST if `name` is
     * a disk that is not this plug-in's replica (a promoted one included), -EINVAL for a
     * name the host does not accept, -EPERM for a plug-in of another category than
     * replication. */
    int (*open_replica)(const char *name, uint64_t size);

    /* --- ABI 1.5; check struct_size (or abi_minor >= 5) before calling ------------- */

    /* Changed-block tracking. An operator makes named checkpoints of a disk
     * (`iofilter disk checkpoint create DISK NAME`); from then on the host records, per
     * granule (64 KiB by default), which parts of the disk its consumers changed, as
     * they enter the chain (before any filter: what a cache holds dirty counts). The
     * record survives worker and host restarts. Backup tools read it over NBD as
     * `qemu:dirty-bitmap:NAME`; a replication or data-capture filter reads it here, for
     * example to resync only what changed while its replica was away.
     *
     * checkpoint_name: the name of the disk's checkpoint `index` (0 is the oldest),
     * copied NUL-terminated into `name`. Returns 0, ERANGE past the last, ENOSPC if
     * `size` is too small.
     * changed_extents: calls `emit` with runs of [offset, offset+length), contiguous
     * from `offset` and clipped to the disk, each changed since checkpoint `name` or
     * not, until the range is covered or `emit` returns non-zero. Runs are whole
     * granules (the first and last clipped to the range). Returns 0, ENOENT for no such
     * checkpoint, ESTALE for one that may have missed changes (the machine went down
     * while it was tracked: treat everything as changed), EINVAL for a bad range.
     * Both may be called from any thread while the disk is open; a checkpoint made or
     * deleted meanwhile is seen by the next call. */
    int (*checkpoint_name)(iof_host_disk *disk, uint32_t index, char *name, size_t size);
    int (*changed_extents)(iof_host_disk *disk, const char *checkpoint, uint64_t offset,
                           uint64_t length, iof_change_emitter emit, void *arg);

    /* --- ABI 1.7; check struct_size (or abi_minor >= 7) before calling ------------- */

    /* Defer without a thread of your own: the host calls `call(req, arg)` soon, on a
     * host thread, and there you decide as after any deferral: `resume` the request, at
     * once or later. Use it in `start` or `done`, then return IOF_DEFER. Deferred from
     * a callback, the call runs on the thread that ran it, once your callback has
     * returned and the host holds no lock for you (never inside it); deferred from a
     * thread of yours, on one of the worker's completion executors. Either way a chain
     * of filters deferring like this costs no thread hop, where a thread per filter
     * costs two per filter. Returns 0, or an errno (nothing was queued: decide
     * yourself). `call` must not block: it holds up every other request. */
    int (*defer_call)(struct iof_request *req, iof_deferred_call call, void *arg);
};

/* ------------------------------------------------------------------------------ */
/* The descriptor                                                                   */
/* ------------------------------------------------------------------------------ */

/* Descriptor flags. */
#define IOF_PLUGIN_NO_MULTI_CONN (1u << 0) /* the filter keeps per-connection state: the
                                              host must not advertise multi-conn        */
/* ABI 1.2. The filter handles IOF_OP_BLOCK_STATUS in start/done. Without it the host
 * passes block status by the filter unchanged, except for an encryption or cache
 * filter, whose contents are not what lies below: there the host reports the whole
 * range as data, so that no consumer skips what the filter holds or transforms. */
#define IOF_PLUGIN_BLOCK_STATUS (1u << 1)
/* ABI 1.2. The filter handles IOF_OP_CACHE (a cache can prefetch); without it the host
 * passes the hint by. */
#define IOF_PLUGIN_CACHE (1u << 2)

struct iof_plugin {
    uint32_t struct_size;   /* sizeof(struct iof_plugin) as the plug-in was built          */
    uint16_t abi_major;     /* IOF_ABI_MAJOR                                               */
    uint16_t abi_minor;     /* IOF_ABI_MINOR                                               */

    const char *name;        /* reverse-DNS, e.g. "com.example.replicator"                 */
    const char *vendor;      /* e.g. "Example Corp"                                        */
    const char *version;     /* semantic version, e.g. "1.2.0"                             */
    const char *description; /* one line                                                  */
    enum iof_category category;
    enum iof_thread_model thread_model;
    uint32_t flags;          /* IOF_PLUGIN_*                                               */

    uint32_t param_count;
    const struct iof_param_spec *params;
    uint32_t mgmt_op_count;
    const struct iof_mgmt_op *mgmt_ops;

    /* Optional. Once per process, before anything else. Keep `host`; it outlives the
     * plug-in. Non-zero (an errno) refuses the load. */
    int (*load)(const struct iof_host_services *host);
    /* Optional. Once per process, after every disk is closed. */
    void (*unload)(void);

    /* Optional. A policy adds the filter to a disk (attach) or removes it (detach).
     * Create or delete sidecar state here; detach must leave the disk consistent
     * (a write-back cache destages first). Non-zero (an errno) refuses. */
    int (*attach)(iof_host_disk *disk, const struct iof_disk_info *info);
    int (*detach)(iof_host_disk *disk, const struct iof_disk_info *info);

    /* Required. A worker opens the disk: make the per-disk instance and store it in
     * *instance. Non-zero (an errno) fails the open. */
    int (*open)(iof_host_disk *disk, const struct iof_disk_info *info, void **instance);
    /* Required. No requests are in flight; free the instance. */
    void (*close)(void *instance);

    /* Required. A request on its way down. `request_private` is a pointer-sized slot
     * that belongs to this filter for this request until `done` returns. */
    enum iof_disposition (*start)(void *instance, struct iof_request *req,
                                  void **request_private);
    /* Optional. The result on the way up, for requests this filter passed; req->error
     * holds it. Return IOF_PASS, IOF_FAIL (after setting req->error) or IOF_DEFER. */
    enum iof_disposition (*done)(void *instance, struct iof_request *req,
                                 void *request_private);

    /* Optional. Snapshot, clone, grow, before the host carries them out: delivered to
     * every filter of the disk, consumer side first, by the VM's running worker or by a
     * worker the host starts for it when no VM runs. For a snapshot no consumer's
     * request is in flight during the call (flush what the snapshot must hold). Non-zero
     * (an errno) vetoes the event: the operation fails naming the filter, nothing
     * changes, and the filters after this one never hear of it. A grow no longer
     * detaches and re-attaches the filters. */
    int (*event)(void *instance, const struct iof_disk_event *event);

    /* Optional. Report statistics as key/value pairs through `emit`: gauges and counters
     * the host shows and exports to /metrics. Two keys have a meaning to the host: a
     * filter that reports both `lag_seconds` and `rpo_seconds` (a replication filter's
     * lag and its recovery point objective) is degraded while the lag is past the RPO,
     * whatever `health` says, and crossing it either way is an event. */
    void (*stats)(void *instance, iof_stat_emitter emit, void *emit_ctx);

    /* Optional. The partner daemon's main function, run by the host in its own
     * sandboxed process (the same confinement as a worker), one per host for each
     * installed plug-in version (and by `iofilter serve` for its filters). `listen_fd`
     * accepts the filters' channels (host->daemon_channel). The daemon runs in its own
     * state directory (the current directory, kept across restarts); host->param(NULL,
     * "listen") gives the address it may accept peers on, if any. `load` is called
     * first, as in a worker. Return to exit: the host restarts it with backoff, as it
     * does when it crashes. */
    int (*daemon_main)(const struct iof_host_services *host, int listen_fd);

    /* --- ABI 1.3 ------------------------------------------------------------------- */

    /* IOF_DAEMON_*: what the daemon asks of the host besides its channels. */
    uint32_t daemon_flags;

    /* --- ABI 1.4 ------------------------------------------------------------------- */

    /* Optional. How this instance is doing: return an enum iof_health and, unless OK,
     * write a one-line reason for operators into `reason` (`reason_size` bytes, at least
     * 256; NUL-terminate it; the host cuts what does not fit). The host asks when it
     * samples the disk's figures (about every 10 s, at most once a second while someone
     * watches), under the filter's thread model like `stats`: answer from state you
     * keep, never wait for I/O or the network here. A filter without it (or built for
     * an older minor) is OK for as long as its worker answers; a value outside the
     * enum counts as FAILED. */
    enum iof_health (*health)(void *instance, char *reason, size_t reason_size);
};

/* ABI 1.3. The daemon listens for peers on other hosts: the host opens a TCP listening
 * socket where the operator allows it and hands it over (host->peer_listener). */
#define IOF_DAEMON_LISTENS (1u << 0)

/* Every plug-in defines this, with IOF_EXPORT. */
typedef const struct iof_plugin *(*iof_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* IOFILTER_H */
