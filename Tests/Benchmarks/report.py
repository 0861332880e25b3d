"""Turns the benchmark's fio JSON files into one table. A (workload, server) pair run
several times is reported by its median IOPS run; each workload's first server is the
baseline its ratio is taken against (nbdkit in run.sh). With interleaved rounds, the
"paired" column is the median of the per-round ratios (each run against the baseline's
run of the same round): drift of the machine between rounds cancels out of it."""
import json
import sys

runs = {}
order = []
for line in open(sys.argv[1]):
    workload, server, path = line.rstrip("\n").split("\t")
    job = json.load(open(path))["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    key = (workload, server)
    if key not in runs:
        runs[key] = []
        order.append(key)
    runs[key].append((side["iops"], side["bw_bytes"] / 1e6, p99))


def paired_ratio(workload, server, base_server):
    mine = [run[0] for run in runs[(workload, server)]]
    base = [run[0] for run in runs[(workload, base_server)]]
    if len(mine) < 2 or len(mine) != len(base) or 0 in base:
        return ""
    ratios = sorted(m / b for m, b in zip(mine, base))
    return f"{ratios[len(ratios) // 2]:.2f}x"

baseline = {}
rows = []
for key in order:
    samples = sorted(runs[key])
    iops, mbs, p99 = samples[len(samples) // 2]
    rows.append((key[0], key[1], iops, mbs, p99, len(samples), samples[0][0], samples[-1][0]))
    baseline.setdefault(key[0], (key[1], iops))

print(f"{'workload':30} {'server':22} {'IOPS':>10} {'MB/s':>9} {'p99 us':>9} {'ratio':>8} {'paired':>7}  (to)   runs: min-max IOPS")
for workload, server, iops, mbs, p99, count, low, high in rows:
    base_server, base = baseline[workload]
    ratio = iops / base if base else float("nan")
    paired = paired_ratio(workload, server, base_server)
    spread = f"{count}: {low:.0f}-{high:.0f}" if count > 1 else "1"
    print(f"{workload:30} {server:22} {iops:10.0f} {mbs:9.1f} {p99:9.0f} {ratio:7.2f}x {paired:>7}  ({base_server})  {spread}")
