#!/usr/bin/python3
"""A client that must not notice a live hand-over: one libnbd connection (it is never
reopened), queue depth 1, each round a 4 KiB write of a fresh pattern, a read that must
give it back, and a flush every 16 rounds, until STOPFILE exists. Prints a JSON summary:
rounds, errors (the first error ends the run), the slowest rounds (what a hand-over
cost the client) and the latency percentiles.

    liveclient.py URI OFFSET SPAN STOPFILE
"""
import json
import os
import sys
import time

import nbd

uri, offset, span, stopfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
handle = nbd.NBD()
handle.connect_uri(uri)
latencies = []
errors = []
rounds = 0
blocks = span // 4096
started = time.monotonic()
while not os.path.exists(stopfile):
    where = offset + (rounds * 7919 % blocks) * 4096
    data = bytes([(rounds + 1) % 256]) * 4096
    begin = time.monotonic()
    try:
        handle.pwrite(data, where)
        if handle.pread(4096, where) != data:
            errors.append("round %d: read back something else at %d" % (rounds, where))
            break
        if rounds % 16 == 15:
            handle.flush()
    except nbd.Error as error:
        errors.append("round %d: %s" % (rounds, error))
        break
    latencies.append((time.monotonic() - begin) * 1000)
    rounds += 1
ordered = sorted(latencies)


def percentile(p):
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0


print(json.dumps({
    "rounds": rounds,
    "errors": errors,
    "seconds": time.monotonic() - started,
    "slowest": [round(x, 2) for x in sorted(latencies, reverse=True)[:80]],
    "p50": round(percentile(0.5), 3),
    "p99": round(percentile(0.99), 3),
}))
