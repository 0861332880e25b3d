"""Turns the benchmark's fio JSON files into one table with ratios to nbdkit."""
import json
import sys

rows = []
for line in open(sys.argv[1]):
    workload, server, path = line.rstrip("\n").split("\t")
    job = json.load(open(path))["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    rows.append((workload, server, side["iops"], side["bw_bytes"] / 1e6, p99))

baseline = {w: iops for (w, s, iops, _, _) in rows if s == "nbdkit"}
print(f"{'workload':28} {'server':20} {'IOPS':>10} {'MB/s':>9} {'p99 us':>9} {'vs nbdkit':>9}")
for workload, server, iops, mbs, p99 in rows:
    ratio = iops / baseline[workload] if baseline.get(workload) else float("nan")
    print(f"{workload:28} {server:20} {iops:10.0f} {mbs:9.1f} {p99:9.0f} {ratio:8.2f}x")
