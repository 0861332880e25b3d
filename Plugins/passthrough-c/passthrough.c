/*
 * passthrough-c — the smallest useful filter, in plain C.
 *
 * Category inspection: it passes every request down unchanged and counts requests and
 * bytes by operation. It shows the parts every plug-in has (descriptor, open/close,
 * start/done, stats) and one management operation with typed arguments, and it needs
 * nothing but the header:
 *
 *     cc -shared -fPIC -O2 -Iinclude -o passthrough-c.so Plugins/passthrough-c/passthrough.c
 */
#include <iofilter.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { OP_KINDS = 5 };
static const char *const op_names[OP_KINDS] = {"read", "write", "flush", "trim", "write_zeroes"};

/* Counters are per process: a worker serves one VM, so they describe that VM. */
static _Atomic uint64_t requests[OP_KINDS];
static _Atomic uint64_t bytes[OP_KINDS];
static _Atomic uint64_t failures;

static const struct iof_host_services *host;

struct instance {
    iof_host_disk *disk;
    int log_requests;
};

static int pt_load(const struct iof_host_services *services)
{
    host = services;
    return 0;
}

static int pt_open(iof_host_disk *disk, const struct iof_disk_info *info, void **out)
{
    struct instance *inst = calloc(1, sizeof *inst);
    if (!inst)
        return 12; /* ENOMEM */
    inst->disk = disk;
    const char *log_requests = host->param(disk, "log-requests");
    inst->log_requests = log_requests && strcmp(log_requests, "true") == 0;
    char line[256];
    snprintf(line, sizeof line, "opened %s (%llu bytes)", info->disk_name,
             (unsigned long long)info->size);
    host->log(disk, IOF_LOG_INFO, line);
    *out = inst;
    return 0;
}

static void pt_close(void *instance)
{
    free(instance);
}

static enum iof_disposition pt_start(void *instance, struct iof_request *req, void **priv)
{
    (void)priv;
    struct instance *inst = instance;
    if ((unsigned)req->op < OP_KINDS) {
        atomic_fetch_add_explicit(&requests[req->op], 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&bytes[req->op], req->length, memory_order_relaxed);
    }
    if (inst->log_requests) {
        char line[128];
        snprintf(line, sizeof line, "%s offset=%llu length=%llu",
                 (unsigned)req->op < OP_KINDS ? op_names[req->op] : "?",
                 (unsigned long long)req->offset, (unsigned long long)req->length);
        host->log(inst->disk, IOF_LOG_DEBUG, line);
    }
    return IOF_PASS;
}

static enum iof_disposition pt_done(void *instance, struct iof_request *req, void *priv)
{
    (void)instance;
    (void)priv;
    if (req->error)
        atomic_fetch_add_explicit(&failures, 1, memory_order_relaxed);
    return IOF_PASS;
}

static void pt_stats(void *instance, iof_stat_emitter emit, void *ctx)
{
    (void)instance;
    char key[64];
    for (int i = 0; i < OP_KINDS; i++) {
        snprintf(key, sizeof key, "%s_requests", op_names[i]);
        emit(ctx, key, (double)atomic_load(&requests[i]));
        snprintf(key, sizeof key, "%s_bytes", op_names[i]);
        emit(ctx, key, (double)atomic_load(&bytes[i]));
    }
    emit(ctx, "failures", (double)atomic_load(&failures));
}

/* ---- management operations -------------------------------------------------- */

/* get_counters() -> string: every counter, as "read=N write=N ...". */
static const char *get_counters(void)
{
    static _Thread_local char text[512];
    size_t used = 0;
    for (int i = 0; i < OP_KINDS && used < sizeof text; i++)
        used += (size_t)snprintf(text + used, sizeof text - used, "%s%s=%llu", i ? " " : "",
                                 op_names[i], (unsigned long long)atomic_load(&requests[i]));
    return text;
}

/* get_counter(op) -> uint64: requests of one kind, or 0 for an unknown name. */
static uint64_t get_counter(const char *op)
{
    for (int i = 0; i < OP_KINDS; i++)
        if (strcmp(op, op_names[i]) == 0)
            return atomic_load(&requests[i]);
    return 0;
}

/* reset_counters() -> int32: the number of requests the counters held. */
static int32_t reset_counters(void)
{
    uint64_t total = 0;
    for (int i = 0; i < OP_KINDS; i++) {
        total += atomic_exchange(&requests[i], 0);
        atomic_store(&bytes[i], 0);
    }
    atomic_store(&failures, 0);
    return (int32_t)total;
}

/* average_request_size(op, scale) -> double: bytes per request of one kind, times scale.
 * Mostly here to show arguments of several types going through libffi. */
static double average_request_size(const char *op, double scale)
{
    for (int i = 0; i < OP_KINDS; i++)
        if (strcmp(op, op_names[i]) == 0) {
            uint64_t n = atomic_load(&requests[i]);
            return n ? scale * (double)atomic_load(&bytes[i]) / (double)n : 0.0;
        }
    return 0.0;
}

static const enum iof_value_type one_string[] = {IOF_VALUE_STRING};
static const char *const op_arg_names[] = {"op"};
static const enum iof_value_type string_double[] = {IOF_VALUE_STRING, IOF_VALUE_DOUBLE};
static const char *const average_arg_names[] = {"op", "scale"};

static const struct iof_mgmt_op mgmt_ops[] = {
    {sizeof(struct iof_mgmt_op), "get_counters", "requests seen, by operation",
     (void (*)(void))get_counters, IOF_VALUE_STRING, 0, NULL, NULL},
    {sizeof(struct iof_mgmt_op), "get_counter", "requests seen of one operation",
     (void (*)(void))get_counter, IOF_VALUE_UINT64, 1, one_string, op_arg_names},
    {sizeof(struct iof_mgmt_op), "reset_counters", "zero the counters; returns the old total",
     (void (*)(void))reset_counters, IOF_VALUE_INT32, 0, NULL, NULL},
    {sizeof(struct iof_mgmt_op), "average_request_size", "mean bytes per request, scaled",
     (void (*)(void))average_request_size, IOF_VALUE_DOUBLE, 2, string_double, average_arg_names},
};

static const struct iof_param_spec params[] = {
    {sizeof(struct iof_param_spec), "log-requests", "log every request at debug level",
     IOF_PARAM_BOOL, 0, "false", 0, 0, NULL},
};

static const struct iof_plugin descriptor = {
    .struct_size = sizeof(struct iof_plugin),
    .abi_major = IOF_ABI_MAJOR,
    .abi_minor = IOF_ABI_MINOR,
    .name = "org.swift-iofilter.passthrough-c",
    .vendor = "swift-iofilter",
    .version = "1.0.0",
    .description = "Passes every request unchanged and counts them (C sample)",
    .category = IOF_CATEGORY_INSPECTION,
    .thread_model = IOF_THREADS_PARALLEL,
    .param_count = sizeof params / sizeof params[0],
    .params = params,
    .mgmt_op_count = sizeof mgmt_ops / sizeof mgmt_ops[0],
    .mgmt_ops = mgmt_ops,
    .load = pt_load,
    .open = pt_open,
    .close = pt_close,
    .start = pt_start,
    .done = pt_done,
    .stats = pt_stats,
};

IOF_EXPORT const struct iof_plugin *iof_plugin_entry(void)
{
    return &descriptor;
}
