"""Turns the benchmark's fio JSON files into one table; each row's first server is
the baseline its ratio is taken against (nbdkit in run.sh)."""
import json
import sys

rows = []
for line in open(sys.argv[1]):
    workload, server, path = line.rstrip("\n").split("\t")
    job = json.load(open(path))["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    rows.append((workload, server, side["iops"], side["bw_bytes"] / 1e6, p99))

baseline = {}
for workload, server, iops, _, _ in rows:
    baseline.setdefault(workload, (server, iops))
print(f"{'workload':30} {'server':22} {'IOPS':>10} {'MB/s':>9} {'p99 us':>9} {'ratio':>8}  (to)")
for workload, server, iops, mbs, p99 in rows:
    base_server, base = baseline[workload]
    ratio = iops / base if base else float("nan")
    print(f"{workload:30} {server:22} {iops:10.0f} {mbs:9.1f} {p99:9.0f} {ratio:7.2f}x  ({base_server})")
