#!/bin/bash
# Data-path benchmark: nbdkit's file plugin, qemu-nbd and `iofilter serve` (no filters,
# and the C pass-through sample) side by side on one raw file under fio's nbd engine,
# plus a slow-storage row (a 1 ms-per-request backend behind two proxies).
# Prints IOPS, MB/s and p99 latency per row with the ratio to nbdkit.
#
#   Tests/Benchmarks/run.sh [--runtime SECONDS] [--size 1G] [--quick]
#
# Everything runs on this machine over unix sockets.
set -euo pipefail
cd "$(dirname "$0")/../.."
runtime=10
size=1G
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --quick) runtime=3; size=256M; shift ;;
        *) echo "usage: $0 [--runtime S] [--size SIZE] [--quick]" >&2; exit 64 ;;
    esac
done

sh scripts/install-dependencies.sh
swift build -c release >&2
bin=$(swift build -c release --show-bin-path)
work=$(mktemp -d /tmp/iofilter-bench.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

disk=$work/disk.img
echo "preparing a $size raw file..." >&2
fio --name=fill --filename="$disk" --size="$size" --rw=write --bs=1M --iodepth=8 --ioengine=libaio \
    --direct=0 --refill_buffers --output=/dev/null >&2
cat "$disk" > /dev/null   # page cache: every server reads from memory
cc -O2 -shared -fPIC -Iinclude -o "$work/passthrough-c.so" Plugins/passthrough-c/passthrough.c

wait_for_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

start_nbdkit()  { nbdkit -f -U "$work/nbdkit.sock" file "$disk" & pids+=($!); wait_for_socket "$work/nbdkit.sock"; }
start_qemunbd() { qemu-nbd -f raw -k "$work/qemu.sock" -t -e 16 --cache=writeback --aio=threads "$disk" & pids+=($!); wait_for_socket "$work/qemu.sock"; }
start_iofilter() { # name, filter args...
    local name=$1; shift
    "$bin/iofilter" serve "$disk" --socket "$work/$name.sock" --state-dir "$work/state-$name" "$@" > "$work/$name.uri" 2> "$work/$name.log" &
    pids+=($!)
    for _ in $(seq 200); do [ -s "$work/$name.uri" ] && return 0; sleep 0.05; done
    cat "$work/$name.log" >&2; exit 1
}

declare -A uri
start_nbdkit;  uri[nbdkit]="nbd+unix:///?socket=$work/nbdkit.sock"
start_qemunbd; uri[qemu-nbd]="nbd+unix:///?socket=$work/qemu.sock"
start_iofilter plain;       uri[iofilter]=$(head -1 "$work/plain.uri")
start_iofilter passthrough --filter "$work/passthrough-c.so"; uri[iofilter+c-sample]=$(head -1 "$work/passthrough.uri")

# Slow storage: nbdkit with 1 ms per request over a file, proxied by nbdkit's nbd plugin
# and by iofilter's NBD backend.
nbdkit -f -U "$work/slow.sock" --filter=delay file "$disk" delay-read=1ms delay-write=1ms & pids+=($!)
wait_for_socket "$work/slow.sock"
nbdkit -f -U "$work/slowproxy.sock" nbd socket="$work/slow.sock" & pids+=($!)
wait_for_socket "$work/slowproxy.sock"
"$bin/iofilter" serve "nbd+unix:///?socket=$work/slow.sock" --socket "$work/slowio.sock" --state-dir "$work/state-slow" \
    > "$work/slowio.uri" 2> "$work/slowio.log" & pids+=($!)
for _ in $(seq 200); do [ -s "$work/slowio.uri" ] && break; sleep 0.05; done

run_fio() { # label server rw bs iodepth
    local out="$work/$1.$2.json"
    fio --name="$1" --ioengine=nbd --uri="$3" --rw="$4" --bs="$5" --iodepth="$6" --size="$size" \
        --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 --norandommap \
        --output-format=json --output="$out" >&2
    echo "$out"
}

results=$work/results.tsv
: > "$results"
workloads=("4k-randread-qd16 randread 4k 16" "4k-randwrite-qd16 randwrite 4k 16" "4k-randread-qd1 randread 4k 1"
           "1m-seqread-qd8 read 1M 8" "1m-seqwrite-qd8 write 1M 8")
for workload in "${workloads[@]}"; do
    set -- $workload
    for server in nbdkit qemu-nbd iofilter iofilter+c-sample; do
        echo "$1 on $server..." >&2
        echo -e "$1\t$server\t$(run_fio "$1" "$server" "${uri[$server]}" "$2" "$3" "$4")" >> "$results"
    done
done
echo "slow storage..." >&2
echo -e "slow-1ms-4k-randread-qd16\tnbdkit\t$(run_fio slow nbdkit "nbd+unix:///?socket=$work/slowproxy.sock" randread 4k 16)" >> "$results"
echo -e "slow-1ms-4k-randread-qd16\tiofilter\t$(run_fio slow iofilter "$(head -1 "$work/slowio.uri")" randread 4k 16)" >> "$results"

python3 Tests/Benchmarks/report.py "$results"
