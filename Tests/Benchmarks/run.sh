#!/bin/bash
# Data-path benchmark: nbdkit's file plugin, qemu-nbd and `iofilter serve` (no filters,
# and the C pass-through sample) side by side on one raw file under fio's nbd engine,
# plus a slow-storage row (a 1 ms-per-request backend behind two proxies).
# Prints IOPS, MB/s and p99 latency per row with the ratio to the row's baseline.
# Each row runs `--rounds` times with the servers interleaved, and the median is kept:
# one long run per server in a fixed order is at the mercy of what the page cache and
# the CPU clocks happen to be doing at that moment.
#
#   Tests/Benchmarks/run.sh [--runtime SECONDS] [--rounds N] [--size 1G] [--quick]
#
# With BASELINE_BIN=DIR (another build's bin directory), that build serves too, as
# "baseline" and "baseline+c-sample", interleaved with the rest.
runtime=5
rounds=3
size=1G
. "$(dirname "$0")/lib.sh"

prepare_disk

start_nbdkit nbdkit file "$disk"
qemu-nbd -f raw -k "$work/qemu.sock" -t -e 16 --cache=writeback --aio=threads "$disk" & pids+=($!)
wait_for_socket "$work/qemu.sock"; uri[qemu-nbd]="nbd+unix:///?socket=$work/qemu.sock"
start_iofilter iofilter "$disk"
start_iofilter iofilter+c-sample "$disk" --filter "$passthrough"
# Simple replies only (like nbdkit --no-sr): what structured replies cost the client.
start_iofilter iofilter-no-sr "$disk" --no-sr
servers=(nbdkit qemu-nbd iofilter iofilter+c-sample iofilter-no-sr)
if [ -n "${BASELINE_BIN:-}" ]; then
    build=$BASELINE_BIN start_iofilter baseline "$disk"
    build=$BASELINE_BIN start_iofilter baseline+c-sample "$disk" --filter "$passthrough"
    servers+=(baseline baseline+c-sample)
fi

# Slow storage: nbdkit with 1 ms per request over the file, proxied by nbdkit's nbd
# plugin and by iofilter's NBD backend.
start_nbdkit slow --filter=delay file "$disk" delay-read=1ms delay-write=1ms
start_nbdkit nbdkit-nbd-proxy nbd socket="$work/slow.sock"
start_iofilter iofilter-nbd-proxy "${uri[slow]}"

workloads=("4k-randread-qd16 randread 4k 16" "4k-randwrite-qd16 randwrite 4k 16" "4k-randread-qd1 randread 4k 1"
           "1m-seqread-qd8 read 1M 8" "1m-seqwrite-qd8 write 1M 8")
for workload in "${workloads[@]}"; do
    set -- $workload
    # ONLY=NAME runs one workload (and skips the slow-storage row).
    [ -n "${ONLY:-}" ] && [ "$1" != "$ONLY" ] && continue
    for _ in $(seq "$rounds"); do
        for server in "${servers[@]}"; do measure "$1" "$server" "$2" "$3" "$4" "$size"; done
    done
done
for _ in $(seq "$([ -n "${ONLY:-}" ] && echo 0 || echo "$rounds")"); do
    for server in nbdkit-nbd-proxy iofilter-nbd-proxy; do measure slow-1ms-4k-randread-qd16 "$server" randread 4k 16 "$size"; done
done

python3 Tests/Benchmarks/report.py "$results"
