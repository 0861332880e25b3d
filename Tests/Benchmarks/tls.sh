#!/bin/bash
# NBD over TLS (pre-shared keys): nbdkit's file plugin with --tls=require against
# `iofilter serve --tls-psk` (no filters, and the C sample), on one raw file under fio's
# nbd engine: 1M sequential reads QD8 and 4k random reads QD16. Prints IOPS, MB/s and
# p99 latency with the ratio to nbdkit.
#
#   Tests/Benchmarks/tls.sh [--runtime SECONDS] [--rounds N] [--size 1G] [--quick]
runtime=5
rounds=3
size=1G
. "$(dirname "$0")/lib.sh"

prepare_disk
keys=$work/keys.psk
psktool -u bench -p "$keys" >&2
client="tls-psk-file=$keys"

nbdkit -f -U "$work/nbdkit-tls.sock" --tls=require --tls-psk="$keys" file "$disk" & pids+=($!)
wait_for_socket "$work/nbdkit-tls.sock"
uri[nbdkit-tls]="nbds+unix://bench@/?socket=$work/nbdkit-tls.sock&$client"
for server in iofilter-tls iofilter-tls+c-sample; do
    extra=()
    [ "$server" = iofilter-tls+c-sample ] && extra=(--filter "$passthrough")
    start_iofilter "$server" "$disk" --tls-psk "$keys" "${extra[@]}"
    # serve prints nbds+unix:///NAME?socket=PATH; the client adds its user and key.
    uri[$server]="${uri[$server]/nbds+unix:\/\//nbds+unix://bench@}&$client"
done
servers=(nbdkit-tls iofilter-tls iofilter-tls+c-sample)

workloads=("1m-seqread-qd8-tls read 1M 8" "4k-randread-qd16-tls randread 4k 16")
for workload in "${workloads[@]}"; do
    set -- $workload
    for _ in $(seq "$rounds"); do
        for server in "${servers[@]}"; do measure "$1" "$server" "$2" "$3" "$4" "$size"; done
    done
done

python3 Tests/Benchmarks/report.py "$results"
