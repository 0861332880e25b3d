#!/bin/bash
# What a filter costs as chains grow: 4k random reads (and writes) at QD16 through
# `iofilter serve` with no filters, one pass-through filter (the C sample; the Swift
# template built with the SDK), five C pass-through filters (one per category), and
# five filters that defer every request to another thread and back (start and done),
# the same five deferring to the host's completion executor instead (ABI 1.7
# defer_call: one thread hop for the whole chain), with nbdkit's file plugin in the
# same run. Ratios are to iofilter without filters.
#
#   Tests/Benchmarks/chain.sh [--runtime SECONDS] [--rounds N] [--size 1G] [--quick]
runtime=5
rounds=3
size=1G
. "$(dirname "$0")/lib.sh"

prepare_disk
five=() deferring=() executor=()
for category in inspection replication encryption cache qos; do
    upper=$(echo "$category" | tr a-z A-Z)
    cc -O2 -shared -fPIC -Iinclude -DCATEGORY=IOF_CATEGORY_$upper -DPLUGIN_NAME="\"org.bench.$category\"" \
        -o "$work/$category.so" Tests/IntegrationTests/Fixtures/testfilter.c -lpthread
    five+=(--filter "$work/$category.so")
    deferring+=(--filter "$work/$category.so:behaviour=defer")
    executor+=(--filter "$work/$category.so:behaviour=defer-on-host")
done

start_iofilter iofilter "$disk"
start_nbdkit nbdkit file "$disk"
start_iofilter 1-c-filter "$disk" --filter "$passthrough"
start_iofilter 1-swift-filter "$disk" --filter "$bin/libiofilter-template.so"
start_iofilter 5-c-filters "$disk" "${five[@]}"
start_iofilter 5-deferring "$disk" "${deferring[@]}"
start_iofilter 5-host-deferring "$disk" "${executor[@]}"

for workload in "4k-randread-qd16 randread" "4k-randwrite-qd16 randwrite"; do
    set -- $workload
    for _ in $(seq "$rounds"); do
        for server in iofilter nbdkit 1-c-filter 1-swift-filter 5-c-filters 5-deferring 5-host-deferring; do
            measure "$1" "$server" "$2" 4k 16 "$size"
        done
    done
done

python3 Tests/Benchmarks/report.py "$results"
