#!/usr/bin/env bash
# nbdcopy of a large sparse disk (64 GiB holding 32 MiB of data by default): how much
# block status through the chain saves. nbdkit's file plugin, `iofilter serve` with the C
# sample, and with the C sample and the cache (write-back), side by side; the copy goes
# to nbdcopy's null: sink, so only the server's side is timed. Prints each row's median
# seconds and its ratio to nbdkit.
#
#     Tests/Benchmarks/sparse.sh [--rounds N] [--size SIZE]
runtime=0; rounds=5; size=64G
source "$(dirname "$0")/lib.sh"

disk=$work/sparse.img
truncate -s "$size" "$disk"
blocks=$(( $(stat -c %s "$disk") / (1 << 20) ))
# 32 pieces of 1 MiB, spread over the disk.
for i in $(seq 0 31); do
    dd if=/dev/urandom of="$disk" bs=1M count=1 seek=$(( i * blocks / 32 )) conv=notrunc status=none
done
passthrough=$work/passthrough-c.so
cc -O2 -shared -fPIC -Iinclude -o "$passthrough" Plugins/passthrough-c/passthrough.c

nbdkit --exit-with-parent -U "$work/nbdkit.sock" file "$disk" &
pids+=($!)
wait_for_socket "$work/nbdkit.sock"
uri[nbdkit]="nbd+unix:///?socket=$work/nbdkit.sock"
start_iofilter c-sample "$disk" --filter "$passthrough"
start_iofilter c-sample+cache "$disk" --filter "$passthrough" --filter "$bin/libiofilter-cache.so:mode=write-back"

rows=(nbdkit c-sample c-sample+cache)
declare -A times
for round in $(seq "$rounds"); do
    for row in "${rows[@]}"; do
        start=$(date +%s.%N)
        nbdcopy "${uri[$row]}" null:
        end=$(date +%s.%N)
        times[$row]+="$(awk "BEGIN { print $end - $start }") "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
base=$(echo "${times[nbdkit]}" | median)
printf '%-16s %10s %8s\n' "nbdcopy $size" seconds "vs nbdkit"
for row in "${rows[@]}"; do
    value=$(echo "${times[$row]}" | median)
    printf '%-16s %10.3f %7.2fx\n' "$row" "$value" "$(awk "BEGIN { print $value / $base }")"
done
