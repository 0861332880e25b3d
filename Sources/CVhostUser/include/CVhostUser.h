// A vhost-user-blk device back-end: the vhost-user protocol on one connection (feature
// negotiation, the guest's memory table, split virtqueues, inflight tracking) and the
// virtio-blk request format. It knows nothing of filters: it hands out requests whose
// data lies in the guest's memory, already checked, and takes back their status.
//
// Why written here rather than linked: QEMU's libvhost-user is not packaged by Debian
// (it lives in QEMU's source tree only), is GPL-2.0-or-later where this project is
// Apache-2.0, and a device whose every guest-supplied index, address and length is
// checked before use is easier to prove in the few hundred lines below than in a
// general library written for trusted back-ends.
//
// Trust: the front-end (QEMU, or whatever connects) and the guest behind it are not
// trusted. Every ring index, descriptor, address and length is read once into local
// memory and checked against the queue size and the mapped memory; a request that
// breaks a rule completes with VIRTIO_BLK_S_IOERR when its status byte can be found,
// and a ring that cannot be followed at all is marked broken and served no more.
#ifndef IOF_VHOST_USER_H
#define IOF_VHOST_USER_H

#include <stdbool.h>
#include <stdint.h>

#define IOF_VU_MAX_QUEUES 16
#define IOF_VU_MAX_QUEUE_SIZE 1024
/// Data segments one request may have (Linux asks for seg_max; we offer this).
#define IOF_VU_MAX_SEGMENTS 128
/// The most data one request may carry: beyond it the request fails, whatever the guest says.
#define IOF_VU_MAX_REQUEST_BYTES (32u << 20)

// virtio-blk request types and statuses (virtio 1.2, 5.2.6).
#define IOF_VIRTIO_BLK_T_IN 0
#define IOF_VIRTIO_BLK_T_OUT 1
#define IOF_VIRTIO_BLK_T_FLUSH 4
#define IOF_VIRTIO_BLK_T_GET_ID 8
#define IOF_VIRTIO_BLK_T_DISCARD 11
#define IOF_VIRTIO_BLK_T_WRITE_ZEROES 13
#define IOF_VIRTIO_BLK_S_OK 0
#define IOF_VIRTIO_BLK_S_IOERR 1
#define IOF_VIRTIO_BLK_S_UNSUPP 2
#define IOF_VIRTIO_BLK_ID_BYTES 20

typedef struct iof_vu_device iof_vu_device;

/// One piece of a request's data, in the worker's mapping of guest memory.
typedef struct iof_vu_segment {
    uint8_t *base;
    uint32_t length;
} iof_vu_segment;

/// A request taken from a queue. `status` is where its status byte goes (nil if the
/// chain has no writable byte: then it can only be returned, with nothing written).
typedef struct iof_vu_request {
    uint16_t queue;
    uint16_t head;
    /// IOF_VIRTIO_BLK_T_*, or UINT32_MAX for a malformed request (complete it with IOERR).
    uint32_t type;
    uint64_t sector;
    /// For discard and write-zeroes: the one range (sectors) and its flags.
    uint64_t range_sector;
    uint32_t range_sectors;
    uint32_t range_flags;
    /// The data: device-readable for OUT, device-writable for IN and GET_ID.
    uint32_t data_length;
    uint32_t segment_count;
    iof_vu_segment segments[IOF_VU_MAX_SEGMENTS];
    uint8_t *status;
    /// Why a request is malformed, for the log (a static string).
    const char *problem;
} iof_vu_request;

/// What the device asks of its owner while it handles a message. Both are called on
/// the thread that calls `iof_vu_handle_message`.
typedef struct iof_vu_callbacks {
    void *context;
    /// A queue may now be served: its kick fd is `kick_fd` (owned by the device), and
    /// `resubmitted` requests a previous back-end left in flight come first.
    void (*start_queue)(void *context, uint16_t queue, int kick_fd, uint16_t resubmitted);
    /// A queue must stop: return only once no thread pops from it or completes on it.
    void (*stop_queue)(void *context, uint16_t queue);
} iof_vu_callbacks;

typedef struct iof_vu_disk {
    uint64_t size_bytes;
    uint32_t block_size;
    uint16_t queues;
    bool read_only;
    bool can_discard;
    bool can_write_zeroes;
    /// Up to 20 bytes, returned by GET_ID.
    char serial[IOF_VIRTIO_BLK_ID_BYTES + 1];
} iof_vu_disk;

iof_vu_device *iof_vu_new(const iof_vu_disk *disk, iof_vu_callbacks callbacks);
/// Stops every queue (through the callbacks), unmaps the guest's memory, closes fds.
void iof_vu_free(iof_vu_device *device);

/// Reads and answers one message from `socket_fd`. Returns 0, or a negative errno: the
/// connection ended (-ECONNRESET) or broke the protocol (the reason is in `*problem`):
/// close it.
int iof_vu_handle_message(iof_vu_device *device, int socket_fd, const char **problem);

/// The descriptor head of `queue`'s next request: 1 (in `*head`, below the queue's
/// size), 0 when there is none, -1 when the ring is broken (its indices make no sense;
/// the queue is served no more). The head is the request's until it is completed.
int iof_vu_next_head(iof_vu_device *device, uint16_t queue, uint16_t *head);
/// Reads and checks the request at `head` (from `iof_vu_next_head`) into `*request`.
void iof_vu_read_request(iof_vu_device *device, uint16_t queue, uint16_t head, iof_vu_request *request);
/// Returns a request to the guest with its status and the bytes the device wrote
/// (`written`, not counting the status byte); signals the guest unless it asked not to
/// be. Any thread; the request's queue is locked while its used ring changes.
void iof_vu_complete(iof_vu_device *device, const iof_vu_request *request, uint8_t status, uint32_t written);
/// The same without the signal: for a batch of completions followed by one `iof_vu_notify`.
void iof_vu_complete_quietly(iof_vu_device *device, const iof_vu_request *request, uint8_t status, uint32_t written);
/// Signals the guest if it wants to hear of what was returned since its last signal
/// (with EVENT_IDX: once the used index passed its `used_event`). Any thread.
void iof_vu_notify(iof_vu_device *device, uint16_t queue);

/// Kicks while the queue's thread drains the ring are wasted wakeups. The thread says
/// it drains (`iof_vu_suppress_kicks`: VRING_USED_F_NO_NOTIFY, or with EVENT_IDX an
/// avail_event left behind) and, before it sleeps, asks for kicks again:
/// `iof_vu_ready_to_sleep` returns false if requests arrived meanwhile (drain again).
/// The queue's thread only.
void iof_vu_suppress_kicks(iof_vu_device *device, uint16_t queue);
bool iof_vu_ready_to_sleep(iof_vu_device *device, uint16_t queue);
/// With IOFILTER_VHOST_TRACE: the queue's indices, to stderr.
void iof_vu_trace_queue(iof_vu_device *device, uint16_t queue, const char *when);
/// Consumes the kick eventfd's count (after poll says it is readable).
void iof_vu_drain_kick(int kick_fd);

#endif
