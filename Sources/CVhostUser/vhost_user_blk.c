// The vhost-user-blk device: see include/CVhostUser.h for what it is and whom it trusts.
// Protocol: QEMU's docs/interop/vhost-user.rst; rings and requests: virtio 1.2 (2.7, 5.2).
#define _GNU_SOURCE
#include "CVhostUser.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

// MARK: - the protocol's numbers

enum {
    VU_GET_FEATURES = 1, VU_SET_FEATURES = 2, VU_SET_OWNER = 3, VU_RESET_OWNER = 4, VU_SET_MEM_TABLE = 5,
    VU_SET_LOG_BASE = 6, VU_SET_LOG_FD = 7, VU_SET_VRING_NUM = 8, VU_SET_VRING_ADDR = 9, VU_SET_VRING_BASE = 10,
    VU_GET_VRING_BASE = 11, VU_SET_VRING_KICK = 12, VU_SET_VRING_CALL = 13, VU_SET_VRING_ERR = 14,
    VU_GET_PROTOCOL_FEATURES = 15, VU_SET_PROTOCOL_FEATURES = 16, VU_GET_QUEUE_NUM = 17, VU_SET_VRING_ENABLE = 18,
    VU_GET_CONFIG = 24, VU_SET_CONFIG = 25, VU_GET_INFLIGHT_FD = 31, VU_SET_INFLIGHT_FD = 32,
};
#define VU_FLAG_VERSION 0x1u
#define VU_FLAG_REPLY (1u << 2)
#define VU_FLAG_NEED_REPLY (1u << 3)
#define VU_VRING_INDEX_MASK 0xffu
#define VU_VRING_NOFD (1u << 8)

#define PROTOCOL_F_MQ 0
#define PROTOCOL_F_REPLY_ACK 3
#define PROTOCOL_F_CONFIG 9
#define PROTOCOL_F_INFLIGHT_SHMFD 12
#define F_INDIRECT_DESC 28
#define F_EVENT_IDX 29
#define F_PROTOCOL_FEATURES 30
#define F_VERSION_1 32
#define BLK_F_SEG_MAX 2
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define BLK_F_MQ 12
#define BLK_F_DISCARD 13
#define BLK_F_WRITE_ZEROES 14

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define MAX_REGIONS 8
#define MAX_FDS 8

struct vu_region_wire { uint64_t guest_address, size, user_address, mmap_offset; };
struct vu_memory_wire { uint32_t count, padding; struct vu_region_wire regions[MAX_REGIONS]; };
struct vu_state_wire { uint32_t index, num; };
struct vu_config_wire { uint32_t offset, size, flags; uint8_t bytes[256]; };
struct vu_inflight_wire { uint64_t mmap_size, mmap_offset; uint16_t queues, queue_size; };

struct vhost_vring_addr_wire { uint32_t index, flags; uint64_t desc, used, avail, log; };

struct vu_header { uint32_t request, flags, size; } __attribute__((packed));
union vu_payload {
    uint64_t u64;
    struct vu_state_wire state;
    struct vhost_vring_addr_wire address;
    struct vu_memory_wire memory;
    struct vu_config_wire config;
    struct vu_inflight_wire inflight;
};

// The split ring in guest memory (virtio 1.2, 2.7).
struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vring_used_elem { uint32_t id, len; };

// Inflight tracking, shared with the front-end so that it survives us (vhost-user.rst,
// "Inflight I/O tracking").
struct inflight_desc { uint8_t inflight; uint8_t padding[5]; uint16_t next; uint64_t counter; };
struct inflight_queue { uint64_t features; uint16_t version, desc_num, last_batch_head, used_idx; struct inflight_desc desc[]; };

static size_t inflight_queue_bytes(uint16_t queue_size) {
    size_t bytes = sizeof(struct inflight_desc) * queue_size + sizeof(struct inflight_queue);
    return (bytes + 63) & ~(size_t)63;
}

// MARK: - the device

struct region {
    uint64_t guest_address, size, user_address;
    uint8_t *host;          // the region's first byte in our mapping
    void *mapping;          // what munmap takes
    size_t mapping_length;
};

struct queue {
    pthread_mutex_t lock;   // the used ring and inflight region: completions come from any thread
    uint16_t size;
    uint64_t desc_user, avail_user, used_user;
    bool addresses_set, started, broken;
    struct vring_desc *desc;
    uint16_t *avail;        // flags, idx, ring[size], used_event
    uint16_t *used_header;  // flags, idx
    struct vring_used_elem *used_ring;
    uint16_t last_avail, used_idx;
    /// The used index the guest was last signalled at (EVENT_IDX), once there is one.
    uint16_t signalled_used;
    bool signalled_used_valid;
    int kick, call;
    struct inflight_queue *inflight;
    uint64_t counter;
    uint16_t *resubmit;     // heads the previous back-end left in flight, oldest first
    uint16_t resubmit_count, resubmit_next;
};

struct iof_vu_device {
    iof_vu_disk disk;
    /// IOFILTER_VHOST_TRACE set: every message is written to stderr (the worker's log).
    bool tracing;
    iof_vu_callbacks callbacks;
    uint64_t features, protocol_features;
    struct region regions[MAX_REGIONS];
    uint32_t region_count;
    struct queue queues[IOF_VU_MAX_QUEUES];
    void *inflight_mapping;
    size_t inflight_length;
};

iof_vu_device *iof_vu_new(const iof_vu_disk *disk, iof_vu_callbacks callbacks) {
    iof_vu_device *device = calloc(1, sizeof *device);
    if (!device) return NULL;
    device->disk = *disk;
    if (device->disk.queues == 0) device->disk.queues = 1;
    if (device->disk.queues > IOF_VU_MAX_QUEUES) device->disk.queues = IOF_VU_MAX_QUEUES;
    device->callbacks = callbacks;
    device->tracing = getenv("IOFILTER_VHOST_TRACE") != NULL;
    for (int i = 0; i < IOF_VU_MAX_QUEUES; i++) {
        pthread_mutex_init(&device->queues[i].lock, NULL);
        device->queues[i].kick = device->queues[i].call = -1;
    }
    return device;
}

static void stop_queue(iof_vu_device *device, uint16_t index) {
    struct queue *q = &device->queues[index];
    if (q->started) device->callbacks.stop_queue(device->callbacks.context, index);
    q->started = false;
}

static void unmap_memory(iof_vu_device *device) {
    for (uint32_t i = 0; i < device->region_count; i++) munmap(device->regions[i].mapping, device->regions[i].mapping_length);
    device->region_count = 0;
}

static void unmap_inflight(iof_vu_device *device) {
    if (device->inflight_mapping) munmap(device->inflight_mapping, device->inflight_length);
    device->inflight_mapping = NULL;
    for (int i = 0; i < IOF_VU_MAX_QUEUES; i++) device->queues[i].inflight = NULL;
}

void iof_vu_free(iof_vu_device *device) {
    if (!device) return;
    for (uint16_t i = 0; i < IOF_VU_MAX_QUEUES; i++) {
        stop_queue(device, i);
        struct queue *q = &device->queues[i];
        if (q->kick >= 0) close(q->kick);
        if (q->call >= 0) close(q->call);
        free(q->resubmit);
        pthread_mutex_destroy(&q->lock);
    }
    unmap_memory(device);
    unmap_inflight(device);
    free(device);
}

// MARK: - guest memory

/// `length` bytes at `address`, a guest address (descriptors) or, with `user`, a
/// front-end one (rings); NULL if they are not all in one region. Overflow-safe: each
/// comparison is of a difference already known not to wrap.
static uint8_t *mapped_bytes(const iof_vu_device *device, uint64_t address, uint64_t length, bool user) {
    for (uint32_t i = 0; i < device->region_count; i++) {
        const struct region *r = &device->regions[i];
        uint64_t base = user ? r->user_address : r->guest_address;
        if (address >= base && address - base <= r->size && length <= r->size - (address - base)) return r->host + (address - base);
    }
    return NULL;
}

static uint8_t *guest_bytes(const iof_vu_device *device, uint64_t address, uint64_t length) {
    return mapped_bytes(device, address, length, false);
}

static uint8_t *user_bytes(const iof_vu_device *device, uint64_t address, uint64_t length) {
    return mapped_bytes(device, address, length, true);
}

static void close_fds(int *fds, int count) {
    for (int i = 0; i < count; i++) if (fds[i] >= 0) close(fds[i]);
}

/// Maps the regions of a SET_MEM_TABLE. The fds must hold what the regions claim: a
/// region past its file's end would be a SIGBUS waiting for the guest to touch it, and
/// a memfd that can still shrink could become one, so those are refused.
static int map_memory(iof_vu_device *device, const struct vu_memory_wire *table, int *fds, int fd_count, const char **problem) {
    if (table->count == 0 || table->count > MAX_REGIONS || (int)table->count != fd_count) {
        *problem = "a memory table needs one fd per region, 1 to 8 regions";
        return -EINVAL;
    }
    struct region regions[MAX_REGIONS];
    uint32_t mapped = 0;
    int error = 0;
    for (uint32_t i = 0; i < table->count; i++) {
        const struct vu_region_wire *wire = &table->regions[i];
        struct stat status;
        if (wire->size == 0 || wire->mmap_offset > UINT64_MAX - wire->size || fstat(fds[i], &status) != 0 ||
            (uint64_t)status.st_size < wire->mmap_offset + wire->size) {
            *problem = "a memory region is larger than the file it is in";
            error = -EINVAL;
            break;
        }
        int seals = fcntl(fds[i], F_GET_SEALS);
        if (seals >= 0 && !(seals & F_SEAL_SHRINK)) {
            *problem = "guest memory in a memfd that can shrink (use memory-backend-memfd with seal=on)";
            error = -EINVAL;
            break;
        }
        size_t length = (size_t)(wire->mmap_offset + wire->size);
        void *mapping = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fds[i], 0);
        if (mapping == MAP_FAILED) {
            *problem = "cannot map the guest's memory";
            error = -errno;
            break;
        }
        regions[mapped++] = (struct region){
            .guest_address = wire->guest_address, .size = wire->size, .user_address = wire->user_address,
            .host = (uint8_t *)mapping + wire->mmap_offset, .mapping = mapping, .mapping_length = length,
        };
    }
    close_fds(fds, fd_count);
    if (error) {
        for (uint32_t i = 0; i < mapped; i++) munmap(regions[i].mapping, regions[i].mapping_length);
        return error;
    }
    unmap_memory(device);
    memcpy(device->regions, regions, sizeof(struct region) * mapped);
    device->region_count = mapped;
    return 0;
}

// MARK: - queues

/// Finds the queue's rings in the current memory. False if they are not all mapped.
static bool locate_rings(iof_vu_device *device, struct queue *q) {
    if (!q->addresses_set || q->size == 0) return false;
    q->desc = (struct vring_desc *)user_bytes(device, q->desc_user, (uint64_t)q->size * sizeof(struct vring_desc));
    q->avail = (uint16_t *)user_bytes(device, q->avail_user, 6 + 2 * (uint64_t)q->size);
    q->used_header = (uint16_t *)user_bytes(device, q->used_user, 6 + 8 * (uint64_t)q->size);
    q->used_ring = q->used_header ? (struct vring_used_elem *)(q->used_header + 2) : NULL;
    return q->desc && q->avail && q->used_header;
}

static int compare_counters(const void *a, const void *b, void *inflight) {
    const struct inflight_queue *region = inflight;
    uint64_t x = region->desc[*(const uint16_t *)a].counter, y = region->desc[*(const uint16_t *)b].counter;
    return x < y ? -1 : x > y;
}

/// At a queue's start: take up what a previous back-end left in the inflight region
/// (the requests it took and never returned are submitted again, oldest first).
static void recover_inflight(struct queue *q) {
    struct inflight_queue *region = q->inflight;
    uint16_t used_idx = __atomic_load_n(&q->used_header[1], __ATOMIC_ACQUIRE);
    q->used_idx = used_idx;
    free(q->resubmit);
    q->resubmit = NULL;
    q->resubmit_count = q->resubmit_next = 0;
    if (!region) return;
    if (region->version == 0 || region->desc_num != q->size) {
        memset(region->desc, 0, sizeof(struct inflight_desc) * q->size);
        region->version = 1;
        region->desc_num = q->size;
        region->used_idx = used_idx;
        region->last_batch_head = 0;
        q->counter = 1;
        return;
    }
    // A batch returned to the used ring but not yet cleared here: clear it now.
    if (region->used_idx != used_idx) {
        uint16_t batch = used_idx - region->used_idx, head = region->last_batch_head;
        for (uint16_t i = 0; i < batch && head < q->size; i++) {
            region->desc[head].inflight = 0;
            head = region->desc[head].next;
        }
        region->used_idx = used_idx;
    }
    uint16_t in_flight = 0;
    uint64_t newest = 0;
    for (uint16_t i = 0; i < q->size; i++) {
        if (region->desc[i].inflight == 1) in_flight++;
        else region->desc[i].inflight = 0;
        if (region->desc[i].counter > newest) newest = region->desc[i].counter;
    }
    q->counter = newest + 1;
    // Requests are taken in order: what is neither used nor in flight is not taken yet.
    q->last_avail = used_idx + in_flight;
    if (in_flight == 0) return;
    q->resubmit = malloc(sizeof(uint16_t) * in_flight);
    if (!q->resubmit) return;
    for (uint16_t i = 0; i < q->size; i++) if (region->desc[i].inflight == 1) q->resubmit[q->resubmit_count++] = i;
    qsort_r(q->resubmit, q->resubmit_count, sizeof(uint16_t), compare_counters, region);
}

static void start_queue(iof_vu_device *device, uint16_t index) {
    struct queue *q = &device->queues[index];
    if (q->started || q->kick < 0 || !locate_rings(device, q)) return;
    q->broken = false;
    q->signalled_used_valid = false;
    recover_inflight(q);
    if (device->tracing)
        fprintf(stderr, "vhost-user: queue %u starts: size %u, next %u, available %u, used %u, %u to resubmit\n", index, q->size,
                q->last_avail, __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE), q->used_idx, q->resubmit_count);
    q->started = true;
    // A back-end killed between returning requests and signalling the guest left it
    // waiting for an interrupt that never came: one more is harmless, and ends that wait.
    if (q->call >= 0) {
        uint64_t one = 1;
        ssize_t ignored = write(q->call, &one, sizeof one);
        (void)ignored;
    }
    device->callbacks.start_queue(device->callbacks.context, index, q->kick, q->resubmit_count);
}

/// One descriptor of a chain, checked and translated.
struct piece { uint8_t *base; uint32_t length; bool writable; };

/// Copies `count` bytes from the pieces (skipping `skip` bytes of them) to `out`.
static bool gather(const struct piece *pieces, int n, uint64_t skip, void *out, uint32_t count) {
    uint8_t *to = out;
    for (int i = 0; i < n && count > 0; i++) {
        if (skip >= pieces[i].length) { skip -= pieces[i].length; continue; }
        uint32_t take = pieces[i].length - (uint32_t)skip;
        if (take > count) take = count;
        memcpy(to, pieces[i].base + skip, take);
        to += take;
        count -= take;
        skip = 0;
    }
    return count == 0;
}

/// The data segments of pieces[first..<end], less `skip` bytes at the front and `drop` at the back.
static bool segments(iof_vu_request *request, const struct piece *pieces, int first, int end, uint64_t skip, uint64_t drop) {
    uint64_t total = 0;
    for (int i = first; i < end; i++) total += pieces[i].length;
    if (total < skip + drop) return false;
    uint64_t wanted = total - skip - drop;
    if (wanted > IOF_VU_MAX_REQUEST_BYTES) { request->problem = "more data than a request may carry"; return false; }
    request->data_length = (uint32_t)wanted;
    request->segment_count = 0;
    for (int i = first; i < end && wanted > 0; i++) {
        if (skip >= pieces[i].length) { skip -= pieces[i].length; continue; }
        uint64_t take = pieces[i].length - skip;
        if (take > wanted) take = wanted;
        if (request->segment_count == IOF_VU_MAX_SEGMENTS) { request->problem = "more data segments than offered"; return false; }
        request->segments[request->segment_count++] = (iof_vu_segment){pieces[i].base + skip, (uint32_t)take};
        wanted -= take;
        skip = 0;
    }
    return true;
}

/// Reads the chain that starts at `head` into `request`: readable pieces (the header,
/// then a write's data or a range) before writable ones (a read's data, then the
/// status byte), each checked once against the queue and the guest's memory.
static void parse_chain(const iof_vu_device *device, const struct queue *q, uint16_t head, iof_vu_request *request) {
    struct piece pieces[IOF_VU_MAX_SEGMENTS + 4];
    int count = 0, readable = 0;
    request->head = head;
    request->type = UINT32_MAX;
    request->status = NULL;
    request->data_length = 0;
    request->segment_count = 0;
    request->problem = NULL;
    // A chain that breaks a rule is still followed to its end where it can be, so that
    // its status byte says IOERR: a driver that finds no status reads whatever its
    // byte held before, which may well say OK.
    const char *problem = NULL;
    // The chain is walked in the ring's table, or in the one indirect table its head
    // names (copied a descriptor at a time: the guest may change it meanwhile).
    const uint8_t *table = (const uint8_t *)q->desc;
    uint32_t table_size = q->size, index = head, hops = 0;
    bool in_indirect = false;
    while (true) {
        if (hops++ >= table_size) { request->problem = "a descriptor chain loops"; return; }
        if (count == (int)(sizeof pieces / sizeof pieces[0])) { request->problem = "a descriptor chain is too long"; return; }
        struct vring_desc desc;
        memcpy(&desc, table + (size_t)index * sizeof desc, sizeof desc);
        if (desc.flags & DESC_F_INDIRECT) {
            // Only a chain's first and only descriptor may name a table (virtio 1.2, 2.7.5.3.1).
            bool allowed = (__atomic_load_n(&device->features, __ATOMIC_RELAXED) & (1ull << F_INDIRECT_DESC)) && !in_indirect && count == 0 && !(desc.flags & DESC_F_NEXT);
            if (!allowed) { request->problem = "an indirect descriptor where none may be"; return; }
            if (desc.len == 0 || desc.len % sizeof desc || desc.len / sizeof desc > sizeof pieces / sizeof pieces[0]) {
                request->problem = "an indirect table of a length no request has";
                return;
            }
            if (!(table = guest_bytes(device, desc.addr, desc.len))) { request->problem = "an indirect table outside the guest's memory"; return; }
            table_size = desc.len / sizeof desc;
            index = hops = 0;
            in_indirect = true;
            continue;
        }
        uint8_t *base = desc.len ? guest_bytes(device, desc.addr, desc.len) : NULL;
        if (desc.len && !base && !problem) problem = "a descriptor outside the guest's memory";
        bool writable = desc.flags & DESC_F_WRITE;
        if (!writable && count > readable && !problem) problem = "a readable descriptor after a writable one";
        pieces[count++] = (struct piece){base, desc.len, writable};
        if (!writable && !problem) readable = count;
        if (!(desc.flags & DESC_F_NEXT)) break;
        index = desc.next;
        if (index >= table_size) { request->problem = "a descriptor's next is outside the table"; return; }
    }
    // The status byte: the chain's last byte, which must be writable. Without it
    // nothing can be said back.
    if (count > 0 && pieces[count - 1].writable && pieces[count - 1].base && pieces[count - 1].length > 0)
        request->status = pieces[count - 1].base + pieces[count - 1].length - 1;
    if (!request->status) { request->problem = problem ? problem : "no writable status byte"; return; }
    if (problem) { request->problem = problem; return; }
    struct { uint32_t type, reserved; uint64_t sector; } header;
    if (!gather(pieces, readable, 0, &header, sizeof header)) { request->problem = "a request header shorter than 16 bytes"; return; }
    request->sector = header.sector;
    switch (header.type) {
    case IOF_VIRTIO_BLK_T_IN:
    case IOF_VIRTIO_BLK_T_GET_ID:
        if (!segments(request, pieces, readable, count, 0, 1)) { if (!request->problem) request->problem = "bad data"; return; }
        break;
    case IOF_VIRTIO_BLK_T_OUT:
        if (!segments(request, pieces, 0, readable, sizeof header, 0)) { if (!request->problem) request->problem = "bad data"; return; }
        break;
    case IOF_VIRTIO_BLK_T_DISCARD:
    case IOF_VIRTIO_BLK_T_WRITE_ZEROES: {
        struct { uint64_t sector; uint32_t sectors, flags; } range;
        if (!gather(pieces, readable, sizeof header, &range, sizeof range)) { request->problem = "a range shorter than 16 bytes"; return; }
        request->range_sector = range.sector;
        request->range_sectors = range.sectors;
        request->range_flags = range.flags;
        break;
    }
    default:
        break;
    }
    request->type = header.type;
}

int iof_vu_next_head(iof_vu_device *device, uint16_t queue, uint16_t *head_out) {
    if (queue >= device->disk.queues) return -1;
    struct queue *q = &device->queues[queue];
    if (!q->started || q->broken) return -1;
    if (q->resubmit_next < q->resubmit_count) {
        *head_out = q->resubmit[q->resubmit_next++];
        return 1;
    }
    uint16_t available = __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE);
    uint16_t waiting = available - q->last_avail;
    if (waiting == 0) return 0;
    if (waiting > q->size) { q->broken = true; return -1; }
    uint16_t head = __atomic_load_n(&q->avail[2 + q->last_avail % q->size], __ATOMIC_RELAXED);
    if (head >= q->size) { q->broken = true; return -1; }
    q->last_avail++;
    if (q->inflight) {
        pthread_mutex_lock(&q->lock);
        q->inflight->desc[head].counter = q->counter++;
        q->inflight->desc[head].inflight = 1;
        pthread_mutex_unlock(&q->lock);
    }
    *head_out = head;
    return 1;
}

void iof_vu_read_request(iof_vu_device *device, uint16_t queue, uint16_t head, iof_vu_request *request) {
    request->queue = queue;
    parse_chain(device, &device->queues[queue], head, request);
}

static bool uses_event_index(const iof_vu_device *device) {
    return __atomic_load_n(&device->features, __ATOMIC_RELAXED) & (1ull << F_EVENT_IDX);
}

/// Whether the guest wants an interrupt for what was returned since the last one: with
/// EVENT_IDX, once the used index passed the `used_event` it published (virtio 1.2,
/// 2.7.10); without, unless it set NO_INTERRUPT. Call with the queue locked.
static bool guest_wants_signal(const iof_vu_device *device, struct queue *q) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  // the guest's fields are read after the used index is out
    if (!uses_event_index(device)) return !(__atomic_load_n(&q->avail[0], __ATOMIC_RELAXED) & AVAIL_F_NO_INTERRUPT);
    uint16_t used_event = __atomic_load_n(&q->avail[2 + q->size], __ATOMIC_RELAXED);
    uint16_t old = q->signalled_used, now = q->used_idx;
    bool valid = q->signalled_used_valid;
    q->signalled_used = now;
    q->signalled_used_valid = true;
    return !valid || (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
}

void iof_vu_notify(iof_vu_device *device, uint16_t queue) {
    if (queue >= device->disk.queues) return;
    struct queue *q = &device->queues[queue];
    pthread_mutex_lock(&q->lock);
    if (q->call >= 0 && q->started && guest_wants_signal(device, q)) {
        uint64_t one = 1;
        ssize_t ignored = write(q->call, &one, sizeof one);
        (void)ignored;  // a full eventfd already wakes the guest
    }
    pthread_mutex_unlock(&q->lock);
}

void iof_vu_complete_quietly(iof_vu_device *device, const iof_vu_request *request, uint8_t status, uint32_t written) {
    struct queue *q = &device->queues[request->queue];
    uint32_t used_length = 0;
    if (request->status) {
        *request->status = status;
        used_length = written + 1;
    }
    pthread_mutex_lock(&q->lock);
    uint16_t index = q->used_idx;
    q->used_ring[index % q->size] = (struct vring_used_elem){request->head, used_length};
    if (q->inflight) {
        q->inflight->desc[request->head].next = q->inflight->last_batch_head;
        q->inflight->last_batch_head = request->head;
    }
    q->used_idx = index + 1;
    __atomic_store_n(&q->used_header[1], q->used_idx, __ATOMIC_RELEASE);
    if (q->inflight) {
        q->inflight->desc[request->head].inflight = 0;
        q->inflight->used_idx = q->used_idx;
    }
    pthread_mutex_unlock(&q->lock);
}

void iof_vu_complete(iof_vu_device *device, const iof_vu_request *request, uint8_t status, uint32_t written) {
    iof_vu_complete_quietly(device, request, status, written);
    iof_vu_notify(device, request->queue);
}

/// Where the device publishes the avail index it wants a kick at (EVENT_IDX): just
/// after the used ring, inside what `locate_rings` checked.
static uint16_t *avail_event(struct queue *q) { return (uint16_t *)(q->used_ring + q->size); }

void iof_vu_suppress_kicks(iof_vu_device *device, uint16_t queue) {
    if (queue >= device->disk.queues) return;
    struct queue *q = &device->queues[queue];
    // With EVENT_IDX an avail_event the guest has passed already asks for no kick.
    if (!q->started || q->broken || uses_event_index(device)) return;
    __atomic_store_n(&q->used_header[0], USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
}

bool iof_vu_ready_to_sleep(iof_vu_device *device, uint16_t queue) {
    if (queue >= device->disk.queues) return true;
    struct queue *q = &device->queues[queue];
    if (!q->started || q->broken) return true;
    if (q->resubmit_next < q->resubmit_count) return false;
    if (uses_event_index(device))
        __atomic_store_n(avail_event(q), q->last_avail, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&q->used_header[0], 0, __ATOMIC_RELAXED);
    // The guest makes a request available, then reads our field to decide on a kick;
    // we wrote our field, now read its index: one of the two sees the other's write,
    // so no request is left without a kick.
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE) == q->last_avail;
}

void iof_vu_trace_queue(iof_vu_device *device, uint16_t queue, const char *when) {
    if (!device->tracing || queue >= device->disk.queues) return;
    struct queue *q = &device->queues[queue];
    if (!q->started) return;
    fprintf(stderr, "vhost-user: queue %u %s: available %u, next %u, used %u (ring %u), avail flags %#x, %u left to resubmit\n", queue,
            when, __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE), q->last_avail, q->used_idx,
            __atomic_load_n(&q->used_header[1], __ATOMIC_ACQUIRE), __atomic_load_n(&q->avail[0], __ATOMIC_ACQUIRE),
            q->resubmit_count - q->resubmit_next);
}

void iof_vu_drain_kick(int kick_fd) {
    uint64_t count;
    ssize_t ignored = read(kick_fd, &count, sizeof count);
    (void)ignored;
}

// MARK: - messages

/// No VIRTIO_BLK_F_SIZE_MAX: SeaBIOS computes size_max * seg_max / 512 in 16 bits and,
/// when that overflows to 0, reads nothing forever; a request's total is bounded here
/// instead (IOF_VU_MAX_REQUEST_BYTES).
static uint64_t offered_features(const iof_vu_device *device) {
    uint64_t features = 1ull << F_VERSION_1 | 1ull << F_PROTOCOL_FEATURES | 1ull << F_INDIRECT_DESC | 1ull << F_EVENT_IDX | 1ull << BLK_F_SEG_MAX |
                        1ull << BLK_F_BLK_SIZE | 1ull << BLK_F_FLUSH;
    if (device->disk.queues > 1) features |= 1ull << BLK_F_MQ;
    if (device->disk.read_only) features |= 1ull << BLK_F_RO;
    if (device->disk.can_discard) features |= 1ull << BLK_F_DISCARD;
    if (device->disk.can_write_zeroes) features |= 1ull << BLK_F_WRITE_ZEROES;
    return features;
}

static const uint64_t offered_protocol_features =
    1ull << PROTOCOL_F_MQ | 1ull << PROTOCOL_F_REPLY_ACK | 1ull << PROTOCOL_F_CONFIG | 1ull << PROTOCOL_F_INFLIGHT_SHMFD;

/// virtio-blk's configuration space (virtio 1.2, 5.2.4), as the guest reads it.
static size_t write_config(const iof_vu_device *device, uint8_t out[60]) {
    memset(out, 0, 60);
    uint64_t sectors = device->disk.size_bytes / 512;
    // A request's header and status take a descriptor each: with seg_max two less than
    // QEMU's default queue size (128), the longest request fits the ring even for a
    // driver without indirect descriptors. More would never fit: Linux then waits for
    // ring space forever (it warns once from virtqueue_add_split).
    uint32_t seg_max = IOF_VU_MAX_SEGMENTS - 2, block = device->disk.block_size ? device->disk.block_size : 512;
    uint16_t queues = device->disk.queues;
    uint32_t max_sectors = 32768, one = 1, alignment = block / 512;
    memcpy(out + 0, &sectors, 8);
    memcpy(out + 12, &seg_max, 4);
    memcpy(out + 20, &block, 4);
    memcpy(out + 34, &queues, 2);
    memcpy(out + 36, &max_sectors, 4);
    memcpy(out + 40, &one, 4);
    memcpy(out + 44, &alignment, 4);
    memcpy(out + 48, &max_sectors, 4);
    memcpy(out + 52, &one, 4);
    out[56] = 1;  // write-zeroes may unmap
    return 60;
}

static int read_fully(int fd, void *buffer, size_t length) {
    uint8_t *to = buffer;
    while (length > 0) {
        ssize_t n = recv(fd, to, length, 0);
        if (n == 0) return -ECONNRESET;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        to += n;
        length -= (size_t)n;
    }
    return 0;
}

static int send_reply(int fd, uint32_t request, const void *payload, uint32_t size) {
    struct { struct vu_header header; uint8_t payload[sizeof(union vu_payload)]; } __attribute__((packed)) message;
    message.header = (struct vu_header){request, VU_FLAG_VERSION | VU_FLAG_REPLY, size};
    memcpy(message.payload, payload, size);
    size_t total = sizeof message.header + size;
    const uint8_t *from = (const uint8_t *)&message;
    while (total > 0) {
        ssize_t n = send(fd, from, total, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        from += n;
        total -= (size_t)n;
    }
    return 0;
}

static int send_reply_with_fd(int fd, uint32_t request, const void *payload, uint32_t size, int passed) {
    struct vu_header header = {request, VU_FLAG_VERSION | VU_FLAG_REPLY, size};
    struct iovec parts[2] = {{&header, sizeof header}, {(void *)payload, size}};
    union { struct cmsghdr align; char bytes[CMSG_SPACE(sizeof(int))]; } control;
    struct msghdr message = {.msg_iov = parts, .msg_iovlen = 2, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &passed, sizeof(int));
    ssize_t n;
    do n = sendmsg(fd, &message, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    return (size_t)n == sizeof header + size ? 0 : -EIO;
}

/// A queue named by a message: its index, checked.
static struct queue *named_queue(iof_vu_device *device, uint32_t index, const char **problem) {
    if (index >= device->disk.queues) {
        *problem = "a message names a queue this device does not have";
        return NULL;
    }
    return &device->queues[index];
}

/// Gives the front-end a fresh inflight region for its queues (it keeps it across our
/// restarts and hands it to the next back-end with SET_INFLIGHT_FD).
static int make_inflight(iof_vu_device *device, const struct vu_inflight_wire *asked, struct vu_inflight_wire *answer, int *fd_out,
                         const char **problem) {
    if (asked->queues == 0 || asked->queues > IOF_VU_MAX_QUEUES || asked->queue_size == 0 || asked->queue_size > IOF_VU_MAX_QUEUE_SIZE) {
        *problem = "an inflight region for more queues or a larger queue than this device has";
        return -EINVAL;
    }
    size_t length = inflight_queue_bytes(asked->queue_size) * asked->queues;
    int fd = (int)syscall(SYS_memfd_create, "vhost-user-blk-inflight", 1u /* MFD_CLOEXEC */ | 2u /* MFD_ALLOW_SEALING */);
    if (fd < 0 || ftruncate(fd, (off_t)length) != 0) {
        if (fd >= 0) close(fd);
        *problem = "cannot make an inflight region";
        return -ENOMEM;
    }
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    *answer = (struct vu_inflight_wire){.mmap_size = length, .mmap_offset = 0, .queues = asked->queues, .queue_size = asked->queue_size};
    *fd_out = fd;
    return 0;
}

static int use_inflight(iof_vu_device *device, const struct vu_inflight_wire *given, int fd, const char **problem) {
    struct stat status;
    if (given->queues == 0 || given->queues > IOF_VU_MAX_QUEUES || given->queue_size == 0 || given->queue_size > IOF_VU_MAX_QUEUE_SIZE ||
        given->mmap_size < inflight_queue_bytes(given->queue_size) * given->queues || given->mmap_offset > UINT64_MAX - given->mmap_size ||
        fstat(fd, &status) != 0 || (uint64_t)status.st_size < given->mmap_offset + given->mmap_size) {
        *problem = "an inflight region smaller than its queues";
        return -EINVAL;
    }
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals >= 0 && !(seals & F_SEAL_SHRINK)) {
        *problem = "an inflight region that can shrink";
        return -EINVAL;
    }
    size_t length = (size_t)(given->mmap_offset + given->mmap_size);
    void *mapping = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mapping == MAP_FAILED) {
        *problem = "cannot map the inflight region";
        return -errno;
    }
    for (uint16_t i = 0; i < device->disk.queues; i++) stop_queue(device, i);
    unmap_inflight(device);
    device->inflight_mapping = mapping;
    device->inflight_length = length;
    uint8_t *base = (uint8_t *)mapping + given->mmap_offset;
    for (uint16_t i = 0; i < given->queues && i < device->disk.queues; i++) {
        device->queues[i].inflight = (struct inflight_queue *)(base + inflight_queue_bytes(given->queue_size) * i);
    }
    return 0;
}

int iof_vu_handle_message(iof_vu_device *device, int socket_fd, const char **problem) {
    struct vu_header header;
    int fds[MAX_FDS];
    int fd_count = 0;
    union { struct cmsghdr align; char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)]; } control;
    struct iovec part = {&header, sizeof header};
    struct msghdr message = {.msg_iov = &part, .msg_iovlen = 1, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes};
    ssize_t n;
    do n = recvmsg(socket_fd, &message, MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
    if (n == 0) return -ECONNRESET;
    if (n < 0) return -errno;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message); cmsg; cmsg = CMSG_NXTHDR(&message, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof fd);
            if (fd_count < MAX_FDS) fds[fd_count++] = fd; else close(fd);
        }
    }
    if (message.msg_flags & MSG_CTRUNC) {
        close_fds(fds, fd_count);
        *problem = "more fds than a message may carry";
        return -EPROTO;
    }
    if ((size_t)n < sizeof header) {
        int rc = read_fully(socket_fd, (uint8_t *)&header + n, sizeof header - (size_t)n);
        if (rc) { close_fds(fds, fd_count); return rc; }
    }
    union vu_payload payload;
    memset(&payload, 0, sizeof payload);
    if (header.size > sizeof payload) {
        close_fds(fds, fd_count);
        *problem = "a message larger than any this protocol has";
        return -EPROTO;
    }
    if (header.size) {
        int rc = read_fully(socket_fd, &payload, header.size);
        if (rc) { close_fds(fds, fd_count); return rc; }
    }

    int rc = 0;
    bool replied = false;
    if (device->tracing) fprintf(stderr, "vhost-user: request %u flags %#x size %u fds %d\n", header.request, header.flags, header.size, fd_count);
    uint32_t index = payload.state.index & VU_VRING_INDEX_MASK;
    struct queue *q;
    switch (header.request) {
    case VU_GET_FEATURES: {
        uint64_t features = offered_features(device);
        rc = send_reply(socket_fd, header.request, &features, sizeof features);
        replied = true;
        break;
    }
    case VU_SET_FEATURES:
        if (payload.u64 & ~offered_features(device)) { *problem = "features this device did not offer"; rc = -EINVAL; }
        else __atomic_store_n(&device->features, payload.u64, __ATOMIC_RELAXED);  // queue threads read it
        break;
    case VU_GET_PROTOCOL_FEATURES:
        rc = send_reply(socket_fd, header.request, &offered_protocol_features, sizeof offered_protocol_features);
        replied = true;
        break;
    case VU_SET_PROTOCOL_FEATURES:
        device->protocol_features = payload.u64 & offered_protocol_features;
        break;
    case VU_GET_QUEUE_NUM: {
        uint64_t queues = device->disk.queues;
        rc = send_reply(socket_fd, header.request, &queues, sizeof queues);
        replied = true;
        break;
    }
    case VU_SET_OWNER:
    case VU_RESET_OWNER:
        break;
    case VU_SET_MEM_TABLE: {
        bool was_started[IOF_VU_MAX_QUEUES];
        for (uint16_t i = 0; i < device->disk.queues; i++) {
            was_started[i] = device->queues[i].started;
            stop_queue(device, i);
        }
        rc = map_memory(device, &payload.memory, fds, fd_count, problem);
        fd_count = 0;
        for (uint16_t i = 0; i < device->disk.queues; i++) if (was_started[i]) start_queue(device, i);
        break;
    }
    case VU_SET_VRING_NUM:
        if (!(q = named_queue(device, payload.state.index, problem))) { rc = -EINVAL; break; }
        if (q->started || payload.state.num == 0 || payload.state.num > IOF_VU_MAX_QUEUE_SIZE) {
            *problem = "a queue size of 0 or more than 1024, or set while the queue runs";
            rc = -EINVAL;
            break;
        }
        q->size = (uint16_t)payload.state.num;
        break;
    case VU_SET_VRING_ADDR:
        if (!(q = named_queue(device, payload.address.index, problem))) { rc = -EINVAL; break; }
        if (q->started) { *problem = "ring addresses changed while the queue runs"; rc = -EINVAL; break; }
        q->desc_user = payload.address.desc;
        q->avail_user = payload.address.avail;
        q->used_user = payload.address.used;
        q->addresses_set = true;
        if (!locate_rings(device, q)) { *problem = "a ring outside the guest's memory"; rc = -EINVAL; }
        break;
    case VU_SET_VRING_BASE:
        if (!(q = named_queue(device, payload.state.index, problem))) { rc = -EINVAL; break; }
        if (q->started) { *problem = "a ring's base set while it runs"; rc = -EINVAL; break; }
        q->last_avail = (uint16_t)payload.state.num;
        break;
    case VU_GET_VRING_BASE: {
        if (!(q = named_queue(device, payload.state.index, problem))) { rc = -EINVAL; break; }
        stop_queue(device, (uint16_t)payload.state.index);
        if (q->kick >= 0) close(q->kick);
        q->kick = -1;
        struct vu_state_wire state = {payload.state.index, q->last_avail};
        rc = send_reply(socket_fd, header.request, &state, sizeof state);
        replied = true;
        break;
    }
    case VU_SET_VRING_KICK:
    case VU_SET_VRING_CALL:
    case VU_SET_VRING_ERR: {
        if (!(q = named_queue(device, index, problem))) { rc = -EINVAL; break; }
        bool no_fd = payload.u64 & VU_VRING_NOFD;
        if (no_fd != (fd_count == 0) || fd_count > 1) { *problem = "a ring's fd missing, or more than one"; rc = -EINVAL; break; }
        int fd = no_fd ? -1 : fds[0];
        fd_count = 0;
        if (header.request == VU_SET_VRING_ERR) {
            if (fd >= 0) close(fd);  // nothing is reported there
        } else if (header.request == VU_SET_VRING_CALL) {
            pthread_mutex_lock(&q->lock);
            int old = q->call;
            q->call = fd;
            pthread_mutex_unlock(&q->lock);
            if (old >= 0) close(old);
        } else {
            if (fd < 0) { *problem = "polling a ring without a kick fd is not offered"; rc = -EINVAL; break; }
            stop_queue(device, (uint16_t)index);
            if (q->kick >= 0) close(q->kick);
            q->kick = fd;
            start_queue(device, (uint16_t)index);
        }
        break;
    }
    case VU_SET_VRING_ENABLE:
        if (!named_queue(device, payload.state.index, problem)) rc = -EINVAL;
        break;
    case VU_GET_CONFIG: {
        uint8_t config[60];
        size_t length = write_config(device, config);
        struct vu_config_wire answer = payload.config;
        if (answer.size > sizeof answer.bytes || answer.offset > length || answer.size > length - answer.offset) {
            *problem = "a config read past virtio-blk's configuration space";
            rc = -EINVAL;
            break;
        }
        memcpy(answer.bytes, config + answer.offset, answer.size);
        rc = send_reply(socket_fd, header.request, &answer, (uint32_t)offsetof(struct vu_config_wire, bytes) + answer.size);
        replied = true;
        break;
    }
    case VU_SET_CONFIG:
        break;  // the write-back flag: flushes are honoured either way
    case VU_GET_INFLIGHT_FD: {
        struct vu_inflight_wire answer;
        int fd = -1;
        rc = make_inflight(device, &payload.inflight, &answer, &fd, problem);
        if (rc == 0) {
            rc = send_reply_with_fd(socket_fd, header.request, &answer, sizeof answer, fd);
            close(fd);
        }
        replied = rc == 0;
        break;
    }
    case VU_SET_INFLIGHT_FD:
        if (fd_count != 1) { *problem = "an inflight region without its fd"; rc = -EINVAL; break; }
        rc = use_inflight(device, &payload.inflight, fds[0], problem);
        close(fds[0]);
        fd_count = 0;
        break;
    default:
        // Not offered, so not expected; refused where the front-end waits for an answer.
        if (header.flags & VU_FLAG_NEED_REPLY) {
            uint64_t failure = 1;
            rc = send_reply(socket_fd, header.request, &failure, sizeof failure);
            replied = true;
        }
        break;
    }
    close_fds(fds, fd_count);
    if (!replied && (header.flags & VU_FLAG_NEED_REPLY) && (device->protocol_features & (1ull << PROTOCOL_F_REPLY_ACK))) {
        uint64_t result = rc == 0 ? 0 : 1;
        int sent = send_reply(socket_fd, header.request, &result, sizeof result);
        if (rc == 0) rc = sent;
    }
    return rc;
}
