#!/usr/bin/python3
"""A vhost-user-blk front-end in a few hundred lines, for tests: it plays QEMU and a
guest driver at once, so a test can program the rings a real guest never would.

    vhost_user_client.py SOCKET good        write, read back, flush, get-id
    vhost_user_client.py SOCKET hostile     bogus descriptors, each answered IOERR,
                                            then a good request on the same queue
    vhost_user_client.py SOCKET break-ring  an avail index no ring can have; the queue
                                            must stop, the connection and worker live
    vhost_user_client.py SOCKET unsealed    guest memory in a memfd that can shrink
    vhost_user_client.py SOCKET hangup      disconnects in the middle of negotiating
    vhost_user_client.py SOCKET notifications   interrupts and kicks as the guest asks
                                            them, with VIRTIO_RING_F_EVENT_IDX and without

Prints one line per check ("ok NAME" or "FAIL NAME: why") and exits 1 on any FAIL.
"""
import fcntl
import mmap
import os
import select
import socket
import struct
import sys
import time

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

MEMORY = 16 << 20
GUEST_BASE = 0x100000       # guest physical address of the region
USER_BASE = 0x7f0000000000  # the "front-end's" address of it
QUEUE = 64
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000     # ring offsets in the region
HEADER, STATUS, TABLE, DATA = 0x4000, 0x5000, 0x6000, 0x10000

failures = 0


def check(name, ok, why=""):
    global failures
    print(("ok " if ok else "FAIL ") + name + ("" if ok else ": " + why), flush=True)
    if not ok:
        failures += 1


class Frontend:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def send(self, request, payload=b"", fds=(), need_reply=False):
        flags = 1 | (8 if need_reply else 0)
        message = struct.pack("<III", request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [message], list(fds))
        else:
            self.sock.sendall(message)

    def receive(self):
        header = self._exactly(12)
        request, flags, size = struct.unpack("<III", header)
        return request, self._exactly(size)

    def _exactly(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the back-end closed the connection")
            data += chunk
        return data

    def call(self, request, payload=b""):
        self.send(request, payload)
        return self.receive()[1]

    def negotiate(self, without=0):
        features = struct.unpack("<Q", self.call(GET_FEATURES))[0] & ~without
        self.send(SET_FEATURES, struct.pack("<Q", features))
        protocol = struct.unpack("<Q", self.call(GET_PROTOCOL_FEATURES))[0]
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol & (1 << 9 | 1 << 3)))
        config = self.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
        self.capacity = struct.unpack_from("<Q", config, 12)[0] * 512
        self.send(SET_OWNER)
        return features

    def map_memory(self, sealed=True):
        fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, MEMORY)
        if sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.memory = mmap.mmap(fd, MEMORY)
        table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GUEST_BASE, MEMORY, USER_BASE, 0) + bytes(32 * 7)
        self.send(SET_MEM_TABLE, table, [fd], need_reply=True)
        os.close(fd)
        return struct.unpack("<Q", self.receive()[1])[0]

    def start_queue(self):
        self.send(SET_VRING_NUM, struct.pack("<II", 0, QUEUE))
        self.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, USER_BASE + DESC, USER_BASE + USED, USER_BASE + AVAIL, 0))
        self.send(SET_VRING_BASE, struct.pack("<II", 0, 0))
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.kick_fd = os.eventfd(0)
        self.send(SET_VRING_CALL, struct.pack("<Q", 0), [self.call_fd])
        self.send(SET_VRING_KICK, struct.pack("<Q", 0), [self.kick_fd])
        self.send(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        self.avail_idx = 0
        self.used_seen = 0

    # The ring, as a guest driver writes it.
    def desc(self, index, address, length, flags, next_index=0):
        struct.pack_into("<QIHH", self.memory, DESC + 16 * index, address, length, flags, next_index)

    def table_entry(self, index, address, length, flags, next_index=0):
        """A descriptor in the indirect table at TABLE."""
        struct.pack_into("<QIHH", self.memory, TABLE + 16 * index, address, length, flags, next_index)

    def submit(self, head, avail_idx=None):
        struct.pack_into("<H", self.memory, AVAIL + 4 + 2 * (self.avail_idx % QUEUE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF if avail_idx is None else avail_idx
        struct.pack_into("<H", self.memory, AVAIL + 2, self.avail_idx)
        os.eventfd_write(self.kick_fd, 1)

    def wait_used(self, timeout=10, take_interrupts=True):
        """The next used element (id, len), or None if none comes. Without
        `take_interrupts` the used index alone is watched, and interrupts stay pending."""
        deadline = time.monotonic() + timeout
        while True:
            used_idx = struct.unpack_from("<H", self.memory, USED + 2)[0]
            if used_idx != self.used_seen:
                element = struct.unpack_from("<II", self.memory, USED + 4 + 8 * (self.used_seen % QUEUE))
                self.used_seen = (self.used_seen + 1) & 0xFFFF
                return element
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not take_interrupts:
                time.sleep(0.001)
            # The interrupt: wait for it, then take it (the used index is read again).
            elif select.select([self.call_fd], [], [], min(left, 0.1))[0]:
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass

    def request(self, kind, sector, data_length=0, write_data=None, status_at=STATUS, take_interrupts=True):
        """A well-formed request: header, data, status in three descriptors."""
        struct.pack_into("<IIQ", self.memory, HEADER, kind, 0, sector)
        self.memory[status_at:status_at + 1] = b"\xee"
        if write_data is not None:
            self.memory[DATA:DATA + len(write_data)] = write_data
        if data_length:
            self.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1)
            self.desc(1, GUEST_BASE + DATA, data_length, F_NEXT | (F_WRITE if kind in (T_IN, T_GET_ID) else 0), 2)
            self.desc(2, GUEST_BASE + status_at, 1, F_WRITE)
        else:
            self.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 2)
            self.desc(2, GUEST_BASE + status_at, 1, F_WRITE)
        self.submit(0)
        return self.wait_used(take_interrupts=take_interrupts)

    def status(self, at=STATUS):
        return self.memory[at]


def good(path):
    front = Frontend(path)
    front.negotiate()
    check("memory-table", front.map_memory() == 0)
    front.start_queue()
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(64 << 10))
    used = front.request(T_OUT, 8, len(pattern), pattern)
    check("write", used is not None and front.status() == S_OK, f"used {used}, status {front.status()}")
    front.memory[DATA:DATA + len(pattern)] = bytes(len(pattern))
    used = front.request(T_IN, 8, len(pattern))
    check("read-back", used is not None and front.status() == S_OK and used[1] == len(pattern) + 1
          and front.memory[DATA:DATA + len(pattern)] == pattern, f"used {used}, status {front.status()}")
    used = front.request(T_FLUSH, 0)
    check("flush", used is not None and front.status() == S_OK, f"used {used}, status {front.status()}")
    # The same read through an indirect table: one ring descriptor names header, data
    # in 16 pieces of 4 KiB, and status (what Linux sends for a large request).
    front.memory[DATA:DATA + len(pattern)] = bytes(len(pattern))
    front.memory[STATUS:STATUS + 1] = b"\xee"
    struct.pack_into("<IIQ", front.memory, HEADER, T_IN, 0, 8)
    front.table_entry(0, GUEST_BASE + HEADER, 16, F_NEXT, 1)
    for piece in range(16):
        front.table_entry(1 + piece, GUEST_BASE + DATA + piece * 4096, 4096, F_NEXT | F_WRITE, 2 + piece)
    front.table_entry(17, GUEST_BASE + STATUS, 1, F_WRITE)
    front.desc(0, GUEST_BASE + TABLE, 18 * 16, F_INDIRECT)
    front.submit(0)
    used = front.wait_used()
    check("indirect-read", used is not None and front.status() == S_OK and used[1] == len(pattern) + 1
          and front.memory[DATA:DATA + len(pattern)] == pattern, f"used {used}, status {front.status()}")
    used = front.request(T_GET_ID, 0, 20)
    serial = bytes(front.memory[DATA:DATA + 20]).rstrip(b"\0").decode(errors="replace")
    check("get-id", used is not None and front.status() == S_OK and serial != "", f"serial {serial!r}")
    print("serial " + serial)
    return front


F_EVENT_IDX = 1 << 29


def notifications(path):
    """Each answer, once the device is idle, is checked against what the guest asked:
    an interrupt exactly when the used index passes `used_event` (EVENT_IDX) or unless
    NO_INTERRUPT is set (without it), and kicks asked for again before the device sleeps:
    `avail_event` at the guest's avail index, or VRING_USED_F_NO_NOTIFY clear."""
    def interrupted(front, timeout):
        if not select.select([front.call_fd], [], [], timeout)[0]:
            return False
        os.eventfd_read(front.call_fd)
        return True

    def flags_settle(read, want, timeout=5):
        deadline = time.monotonic() + timeout
        while read() != want and time.monotonic() < deadline:
            time.sleep(0.01)
        return read()

    def connect_when_free(without):
        # The back-end serves one front-end and refuses another until the last one's
        # queues are stopped: ask again until it takes this one.
        deadline = time.monotonic() + 10
        while True:
            front = Frontend(path)
            try:
                return front, front.negotiate(without=without)
            except (ConnectionError, BrokenPipeError):
                front.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    for mode in ("event-idx", "flags"):
        front, features = connect_when_free(0 if mode == "event-idx" else F_EVENT_IDX)
        if mode == "event-idx":
            check("event-idx: offered", features & F_EVENT_IDX != 0, f"features {features:#x}")
        check(f"{mode}: memory-table", front.map_memory() == 0)
        front.start_queue()
        interrupted(front, 0.5)  # the one a starting queue sends, in case a back-end died before signalling
        used_event = lambda value: struct.pack_into("<H", front.memory, AVAIL + 4 + 2 * QUEUE, value & 0xFFFF)
        avail_event = lambda: struct.unpack_from("<H", front.memory, USED + 4 + 8 * QUEUE)[0]
        used_flags = lambda: struct.unpack_from("<H", front.memory, USED)[0]
        for round in range(3):
            # Asked: an interrupt for the next answer.
            if mode == "event-idx":
                used_event(front.used_seen)
            else:
                struct.pack_into("<H", front.memory, AVAIL, 0)
            front.request(T_FLUSH, 0, take_interrupts=False)
            check(f"{mode}: interrupt asked for, round {round}", interrupted(front, 5))
            # Not asked: the answer comes, with no interrupt.
            if mode == "event-idx":
                used_event(front.used_seen + 1000)
            else:
                struct.pack_into("<H", front.memory, AVAIL, 1)
            used = front.request(T_FLUSH, 0, take_interrupts=False)
            check(f"{mode}: answered, round {round}", used is not None and front.status() == S_OK, f"used {used}")
            check(f"{mode}: no interrupt unasked, round {round}", not interrupted(front, 0.3))
            if mode == "event-idx":
                seen = flags_settle(avail_event, front.avail_idx)
                check(f"{mode}: kicks asked again at {front.avail_idx}", seen == front.avail_idx, f"avail_event {seen}")
            else:
                seen = flags_settle(used_flags, 0)
                check(f"{mode}: NO_NOTIFY clear when idle", seen == 0, f"used flags {seen:#x}")
        front.sock.close()


def hostile(path):
    front = Frontend(path)
    front.negotiate()
    front.map_memory()
    front.start_queue()
    cases = []

    def case(name, program, expect=S_IOERR):
        """expect: the status the back-end writes; None: a chain that cannot be followed
        to its end, returned with nothing written."""
        front.memory[STATUS:STATUS + 1] = b"\xee"
        struct.pack_into("<IIQ", front.memory, HEADER, T_IN, 0, 0)
        program()
        front.submit(0)
        used = front.wait_used()
        if expect is None:
            check(name, used is not None and used[1] == 0 and front.status() == 0xee, f"used {used}, status {front.status():#x}")
        else:
            check(name, used is not None and front.status() == expect, f"used {used}, status {front.status():#x}")

    # Data outside the guest's memory, far and just past its end.
    case("outside-memory", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                    front.desc(1, 0xdead0000000, 4096, F_NEXT | F_WRITE, 2),
                                    front.desc(2, GUEST_BASE + STATUS, 1, F_WRITE)))
    case("past-the-end", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                  front.desc(1, GUEST_BASE + MEMORY - 512, 4096, F_NEXT | F_WRITE, 2),
                                  front.desc(2, GUEST_BASE + STATUS, 1, F_WRITE)))
    # A huge length that wraps the address space.
    case("huge-length", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                 front.desc(1, GUEST_BASE + DATA, 0xFFFFFE00, F_NEXT | F_WRITE, 2),
                                 front.desc(2, GUEST_BASE + STATUS, 1, F_WRITE)))
    # A chain that loops (1 -> 3 -> 1 ...) and one whose next leaves the table.
    case("loop", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                          front.desc(1, GUEST_BASE + DATA, 512, F_NEXT | F_WRITE, 3),
                          front.desc(3, GUEST_BASE + DATA + 512, 512, F_NEXT | F_WRITE, 1)), expect=None)
    case("next-outside-table", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                        front.desc(1, GUEST_BASE + DATA, 512, F_NEXT | F_WRITE, 999)), expect=None)
    case("readable-after-writable", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                             front.desc(1, GUEST_BASE + DATA, 512, F_NEXT | F_WRITE, 2),
                                             front.desc(2, GUEST_BASE + DATA + 4096, 512, F_NEXT, 3),
                                             front.desc(3, GUEST_BASE + STATUS, 1, F_WRITE)))
    case("short-header", lambda: (front.desc(0, GUEST_BASE + HEADER, 8, F_NEXT, 2),
                                  front.desc(2, GUEST_BASE + STATUS, 1, F_WRITE)))
    # Indirect tables: outside memory, of a length no table has, nested, after a
    # direct descriptor, and one whose chain loops inside it. None can be followed.
    case("indirect-outside-memory", lambda: front.desc(0, 0xdead0000000, 48, F_INDIRECT), expect=None)
    case("indirect-bad-length", lambda: front.desc(0, GUEST_BASE + TABLE, 40, F_INDIRECT), expect=None)
    case("indirect-nested", lambda: (front.table_entry(0, GUEST_BASE + TABLE, 32, F_INDIRECT),
                                     front.desc(0, GUEST_BASE + TABLE, 32, F_INDIRECT)), expect=None)
    case("indirect-not-first", lambda: (front.desc(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                        front.desc(1, GUEST_BASE + TABLE, 32, F_INDIRECT)), expect=None)
    case("indirect-loop", lambda: (front.table_entry(0, GUEST_BASE + HEADER, 16, F_NEXT, 1),
                                   front.table_entry(1, GUEST_BASE + DATA, 512, F_NEXT | F_WRITE, 0),
                                   front.desc(0, GUEST_BASE + TABLE, 32, F_INDIRECT)), expect=None)
    # Reads and writes past the disk's end, and one not in whole sectors.
    used = front.request(T_IN, front.capacity // 512, 512)
    check("read-past-the-end", used is not None and front.status() == S_IOERR, f"status {front.status()}")
    used = front.request(T_OUT, (1 << 64) - 1, 512, b"x" * 512)
    check("write-at-sector-2^64-1", used is not None and front.status() == S_IOERR, f"status {front.status()}")
    used = front.request(T_IN, 0, 100)
    check("partial-sector", used is not None and front.status() == S_IOERR, f"status {front.status()}")
    used = front.request(77, 0, 512)
    check("unknown-type", used is not None and front.status() == S_UNSUPP, f"status {front.status()}")
    # A head outside the table: the ring itself makes no sense (checked in break-ring).
    # After all that, the queue serves as before.
    pattern = b"after" * 100 + b"\0" * 12
    used = front.request(T_OUT, 16, 512, pattern)
    front.memory[DATA:DATA + 512] = bytes(512)
    used = front.request(T_IN, 16, 512)
    check("still-serving", used is not None and front.status() == S_OK and front.memory[DATA:DATA + 512] == pattern)


def break_ring(path):
    front = Frontend(path)
    front.negotiate()
    front.map_memory()
    front.start_queue()
    front.request(T_FLUSH, 0)
    # An avail index 1000 ahead of a 64-entry ring: no driver could have written it.
    front.submit(0, avail_idx=(front.avail_idx + 1000) & 0xFFFF)
    check("broken-ring-unanswered", front.wait_used(timeout=2) is None)
    # The connection lives: the back-end still answers messages.
    features = struct.unpack("<Q", front.call(GET_FEATURES))[0]
    check("connection-alive", features != 0)


def unsealed(path):
    front = Frontend(path)
    front.negotiate()
    try:
        result = front.map_memory(sealed=False)
        check("unsealed-refused", result != 0, f"the back-end took it (reply {result})")
    except (ConnectionError, socket.timeout):
        check("unsealed-refused", True)


def hangup(path):
    front = Frontend(path)
    front.send(GET_FEATURES)
    front.sock.send(struct.pack("<III", SET_FEATURES, 1, 8)[:7])  # half a header
    front.sock.close()
    check("hangup", True)


if __name__ == "__main__":
    path, scenario = sys.argv[1], sys.argv[2]
    {"good": good, "hostile": hostile, "break-ring": break_ring, "unsealed": unsealed, "hangup": hangup,
     "notifications": notifications}[scenario](path)
    sys.exit(1 if failures else 0)
