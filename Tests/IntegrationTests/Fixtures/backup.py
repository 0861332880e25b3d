#!/usr/bin/python3
"""Backup clients for the backup tests, written against libnbd's Python binding as
backup tools are (virtnbdbackup, oVirt's imageio).

  writer URI BLOCKS SEED STOPFILE   rewrites BLOCKS 4 KiB blocks over and over, each pass
                                    in one fixed shuffled order, until STOPFILE exists;
                                    block b of pass p holds (p, b) in every 16 bytes
  check-cut IMAGE BLOCKS SEED       says whether IMAGE is the disk at one instant of that
                                    writer: every block of the last pass seen up to some
                                    position of the order, every later one of the pass
                                    before, no torn block; exits 1 if not
  dirty URI CONTEXT                 the extents CONTEXT marks (flag 1), as JSON
  incremental URI CONTEXT TARGET    copies the marked extents from URI into the raw file
                                    TARGET; prints {"bytes_read": N, "extents": M}
"""
import json
import os
import random
import struct
import sys

import nbd

BLOCK = 4096


def order(blocks, seed):
    positions = list(range(blocks))
    random.Random(seed).shuffle(positions)
    return positions


def pattern(pass_number, block):
    return struct.pack("<QQ", pass_number + 1, block) * (BLOCK // 16)


def writer(uri, blocks, seed, stopfile):
    handle = nbd.NBD()
    handle.connect_uri(uri)
    sequence = order(blocks, seed)
    passes = 0
    while not os.path.exists(stopfile):
        for block in sequence:
            handle.pwrite(pattern(passes, block), block * BLOCK)
        passes += 1
    handle.flush()
    handle.shutdown()
    print(passes)


def check_cut(image, blocks, seed):
    sequence = order(blocks, seed)
    seen = {}
    with open(image, "rb") as f:
        for block in range(blocks):
            data = f.read(BLOCK)
            if data == bytes(BLOCK):
                seen[block] = 0
                continue
            pass_plus_one, which = struct.unpack_from("<QQ", data)
            if which != block or data != pattern(pass_plus_one - 1, block):
                print(f"block {block} is torn or misplaced")
                sys.exit(1)
            seen[block] = pass_plus_one
    newest = max(seen.values())
    # Position k of the order: blocks before it carry the newest pass, the rest the one
    # before (0: never written).
    k = sum(1 for value in seen.values() if value == newest)
    for position, block in enumerate(sequence):
        want = newest if position < k else newest - 1
        if seen[block] != want:
            print(f"not one instant: block {block} at position {position} holds pass {seen[block]}, "
                  f"but the cut after {k} writes of pass {newest} wants {want}")
            sys.exit(1)
    print(f"one instant: pass {newest}, {k} of {blocks} blocks written")


def marked_extents(uri, context):
    handle = nbd.NBD()
    handle.add_meta_context(context)
    handle.connect_uri(uri)
    if not handle.can_meta_context(context):
        print(f"the server does not offer {context}", file=sys.stderr)
        sys.exit(2)
    size = handle.get_size()
    extents = []
    offset = 0
    while offset < size:
        found = []

        def answer(name, start, entries, error):
            if name == context:
                found.extend(zip(entries[0::2], entries[1::2]))
            return 0

        handle.block_status(min(size - offset, 1 << 30), offset, answer)
        for length, flags in found:
            if flags & 1:
                if extents and extents[-1][0] + extents[-1][1] == offset:
                    extents[-1][1] += length
                else:
                    extents.append([offset, length])
            offset += length
    return handle, extents


def dirty(uri, context):
    handle, extents = marked_extents(uri, context)
    handle.shutdown()
    print(json.dumps(extents))


def incremental(uri, context, target):
    handle, extents = marked_extents(uri, context)
    read = 0
    with open(target, "r+b") as out:
        for offset, length in extents:
            done = 0
            while done < length:
                step = min(length - done, 4 << 20)
                data = handle.pread(step, offset + done)
                out.seek(offset + done)
                out.write(data)
                read += step
                done += step
    handle.shutdown()
    print(json.dumps({"bytes_read": read, "extents": len(extents)}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "writer":
        writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif mode == "check-cut":
        check_cut(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "dirty":
        dirty(sys.argv[2], sys.argv[3])
    elif mode == "incremental":
        incremental(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown mode {mode}")
