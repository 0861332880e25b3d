#!/bin/bash
# NBD over TLS (pre-shared keys): nbdkit's file plugin with --tls=require against
# `iofilter serve --tls-psk` (no filters, and the C sample). fio's nbd engine will not
# read a PSK file named in a URI, so the client is nbdcopy: 1 MiB requests, 8 in flight,
# one connection, the whole file to its null sink (sequential reads at QD8). Prints
# each row's median MB/s and its ratio to nbdkit.
#
#   Tests/Benchmarks/tls.sh [--rounds N] [--size 1G]
runtime=0
rounds=5
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

bytes=$(stat -c %s "$disk")
declare -A rates
for _ in $(seq "$rounds"); do
    for server in "${servers[@]}"; do
        settle
        start=$(date +%s.%N)
        "${client_pin[@]}" nbdcopy --connections=1 --requests=8 --request-size=1048576 "${uri[$server]}" null:
        end=$(date +%s.%N)
        rates[$server]+="$(awk "BEGIN { print $bytes / ($end - $start) / 1e6 }") "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
base=$(echo "${rates[nbdkit-tls]}" | median)
printf '%-24s %10s %9s\n' "1M seq read QD8, TLS-PSK" "MB/s" "vs nbdkit"
for server in "${servers[@]}"; do
    value=$(echo "${rates[$server]}" | median)
    printf '%-24s %10.0f %8.2fx\n' "$server" "$value" "$(awk "BEGIN { print $value / $base }")"
done
