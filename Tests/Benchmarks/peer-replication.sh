#!/bin/bash
# Benchmark of replication between hosts (the replication sample through its partner
# daemons): two network namespaces joined by a veth pair, an iofilterd in each. On host
# A, 4k randwrite QD16 on a VM whose disk replicates asynchronously to host B
# (iofilter://B:PORT/DISK), against the same VM's twin without replication, rounds
# interleaved; the ratio is protected/plain.
#
#   Tests/Benchmarks/peer-replication.sh [--runtime SECONDS] [--rounds N] [--size SIZE] [--quick]
runtime=10
rounds=3
size=1G
. "$(dirname "$0")/lib.sh"
replication=$bin/libiofilter-replication.so
tag=$$
ns_a=iofbench-a-$tag ns_b=iofbench-b-$tag veth_a=ibva$tag veth_b=ibvb$tag
address_a=192.0.2.1 address_b=192.0.2.2 port=10950
teardown() {
    cleanup
    ip netns delete "$ns_a" 2>/dev/null || true
    ip netns delete "$ns_b" 2>/dev/null || true
}
trap teardown EXIT
ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add "$veth_a" type veth peer name "$veth_b"
ip link set "$veth_a" netns "$ns_a"
ip link set "$veth_b" netns "$ns_b"
ip -n "$ns_a" addr add $address_a/24 dev "$veth_a"
ip -n "$ns_b" addr add $address_b/24 dev "$veth_b"
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set "$veth_a" up
ip -n "$ns_b" link set "$veth_b" up

# start_host NAME NAMESPACE [nice]: an iofilterd in the namespace, its state in $work/NAME.
start_host() {
    local name=$1 ns=$2
    mkdir -p "$work/$name"
    ${3:+nice -n $3} ip netns exec "$ns" "$bin/iofilterd" --state-dir "$work/$name" --acceptance-level community \
        --allow-path "$work" 2> "$work/$name.log" & pids+=($!)
    for _ in $(seq 200); do "$bin/iofilter" vm list --state-dir "$work/$name" >/dev/null 2>&1 && return 0; sleep 0.05; done
    cat "$work/$name.log" >&2; exit 1
}
# Host B stands in for another machine: at nice 10 it takes the CPU host A leaves idle.
start_host b "$ns_b" 10
start_host a "$ns_a"
on_a() { "$bin/iofilter" "$@" --state-dir "$work/a"; }
on_b() { "$bin/iofilter" "$@" --state-dir "$work/b"; }

on_b plugin install "$replication" --daemon-listen "$address_b:$port" >&2
on_a plugin install "$replication" >&2
on_a policy create protected --filter "org.swift-iofilter.replication:target=iofilter://$address_b:$port/protected-replica,mode=async,journal-size=256M" >&2
echo "preparing two $size disks..." >&2
make_disk "$work/source.img" "$size"
on_a disk import plain --from "$work/source.img" >&2
on_a disk import protected --from "$work/source.img" --policy protected >&2
rm -f "$work/source.img"
for vm in plain protected; do
    on_a vm create "$vm" --disk "$vm" >&2
    on_a vm start "$vm" >&2
    uri[$vm]="nbd+unix:///$vm?socket=$work/a/vms/$vm/$vm.sock"
done
# Rows measure steady state: the replica finishes its initial sync first.
echo "initial sync to host B..." >&2
for _ in $(seq 600); do on_a vm show protected | grep -q "state_in_sync=1" && break; sleep 0.5; done
on_a vm show protected | grep -q "state_in_sync=1" || { echo "the replica never caught up" >&2; on_a vm show protected >&2; exit 1; }
for _ in $(seq "$rounds"); do
    for server in plain protected; do measure 4k-randwrite-qd16 "$server" randwrite 4k 16 "$size"; done
done
on_a vm show protected | grep "replication" >&2
python3 Tests/Benchmarks/report.py "$results"
