#!/bin/bash
# What backup costs a running VM, on one iofilterd, beside nbdkit and qemu-nbd:
#
#  1. 4k randwrite QD16 on a VM disk with one active checkpoint (changed-block
#     tracking) against its twin without one, nbdkit and qemu-nbd on the same data,
#     rounds interleaved. Goal: tracked >= 0.95x untracked.
#  2. A point-in-time snapshot of a 4 GiB disk holding 1 GiB: the time to its complete
#     copy against `cp --sparse=always` of the same file (goal <= 1.5x), and the guest's
#     4k randwrite IOPS while the copy runs against the same without a copy (goal
#     >= 0.7x).
#  3. An incremental backup of a 16 GiB disk after 1 % of it changed (64 KiB writes at
#     random): bytes read through qemu:dirty-bitmap against the disk's size (goal <= 2 %).
#
#   Tests/Benchmarks/backup.sh [--runtime SECONDS] [--rounds N] [--size 512M] [--quick]
runtime=8
rounds=3
size=512M
. "$(dirname "$0")/lib.sh"

prepare_disk
start_nbdkit nbdkit file "$disk"
cp "$disk" "$work/qemu.img"
qemu-nbd -f raw -k "$work/qemu.sock" -t -e 16 --cache=writeback --aio=threads "$work/qemu.img" & pids+=($!)
wait_for_socket "$work/qemu.sock"; uri[qemu-nbd]="nbd+unix:///?socket=$work/qemu.sock"

"$bin/iofilterd" --state-dir "$work/host" --acceptance-level community --allow-path "$work" 2> "$work/iofilterd.log" & pids+=($!)
wait_for_socket "$work/host/api.sock"
cli() { "$bin/iofilter" "$@" --socket "$work/host/api.sock"; }
for _ in $(seq 100); do cli vm list > /dev/null 2>&1 && break; sleep 0.1; done
cli plugin install "$passthrough" > /dev/null
cli policy create sample --filter org.swift-iofilter.passthrough-c > /dev/null
for name in plain tracked; do
    cli disk import "$name" --from "$disk" --policy sample > /dev/null
    cat "$work/host/disks/$name.img" > /dev/null
    cli vm create "$name" --disk "$name" > /dev/null
    cli vm start "$name" > /dev/null
    uri[vm-$name]="nbd+unix:///$name?socket=$work/host/vms/$name/$name.sock"
done
cli disk checkpoint create tracked monday > /dev/null

# 1. Tracking on the write path.
for _ in $(seq "$rounds"); do
    for server in nbdkit qemu-nbd vm-plain vm-tracked; do
        measure 4k-randwrite-qd16 "$server" randwrite 4k 16 "$size"
    done
done
python3 Tests/Benchmarks/report.py "$results"
echo "checkpoint monday of the tracked disk: $(cli disk checkpoint list tracked | tail -1)"
echo

# 2. A point-in-time snapshot of a 4 GiB disk holding 1 GiB, while the VM runs.
big=$work/big.img
truncate -s 4G "$big"
fio --name=fill --filename="$big" --size=1G --rw=write --bs=1M --iodepth=8 --ioengine=libaio --refill_buffers --output=/dev/null >&2
cli disk import big --from "$big" > /dev/null
rm -f "$big"
cli vm create big --disk big > /dev/null
cli vm start big > /dev/null
uri[vm-big]="nbd+unix:///big?socket=$work/host/vms/big/big.sock"
cat "$work/host/disks/big.img" > /dev/null
seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$@"; }
copies=()
snapshots=()
for round in $(seq "$rounds"); do
    settle
    started=$(date +%s.%N); cp --sparse=always "$work/host/disks/big.img" "$work/cp.img"; sync -f "$work/cp.img"; ended=$(date +%s.%N)
    copies+=("$(seconds "$started" "$ended")"); rm -f "$work/cp.img"
    settle
    started=$(date +%s.%N); cli disk snapshot big "quiet$round" --wait > /dev/null; ended=$(date +%s.%N)
    snapshots+=("$(seconds "$started" "$ended")"); cli disk delete "quiet$round" > /dev/null
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cp_time=$(median "${copies[@]}"); snap_time=$(median "${snapshots[@]}")
echo "snapshot of a 4 GiB disk holding 1 GiB: ${snap_time}s (runs ${snapshots[*]}); cp --sparse=always: ${cp_time}s (runs ${copies[*]}); ratio $(python3 -c "print(f'{$snap_time / $cp_time:.2f}x')")"

# The guest's 4k random writes over its 1 GiB of data, without and during copies: one
# snapshot after another is taken and deleted for as long as fio runs, so a copy is
# running through (nearly) all of the measured row.
copying() {
    local n=0
    while [ ! -e "$work/stop-copies" ]; do
        n=$((n + 1))
        cli disk snapshot big "busy$n" --wait > /dev/null
        cli disk delete "busy$n" > /dev/null
    done
    echo "$n" > "$work/copies-made"
}
: > "$results"
made=()
for round in $(seq "$rounds"); do
    measure 4k-randwrite-qd16-1G vm-big randwrite 4k 16 1G
    settle
    rm -f "$work/stop-copies"
    copying & copier=$!
    sleep 0.5
    out="$work/during.$round.json"
    "${client_pin[@]}" fio --name=during --ioengine=nbd --uri="${uri[vm-big]}" --rw=randwrite --bs=4k --iodepth=16 --size=1G \
        --time_based --runtime="$runtime" --randrepeat=0 --norandommap --output-format=json --output="$out" >&2
    touch "$work/stop-copies"; wait "$copier"
    echo -e "4k-randwrite-qd16-1G\tvm-big-during-copies\t$out" >> "$results"
    made+=("$(cat "$work/copies-made")")
done
python3 Tests/Benchmarks/report.py "$results"
echo "snapshots copied back to back during each ${runtime}s row: ${made[*]}"
echo

# 3. An incremental backup after 1 % of a 16 GiB disk changed.
cli disk create huge --size 16G > /dev/null
cli vm create huge --disk huge > /dev/null
cli vm start huge > /dev/null
huge="nbd+unix:///huge?socket=$work/host/vms/huge/huge.sock"
cli disk snapshot huge base --checkpoint since-base --wait > /dev/null
fio --name=change --ioengine=nbd --uri="$huge" --rw=randwrite --bs=64k --iodepth=8 --size=16G --io_size=164M \
    --randseed=7 --output=/dev/null >&2
cli disk snapshot huge next --checkpoint since-next --wait > /dev/null
next=$(cli disk export-nbd next)
truncate -s 16G "$work/incremental.img"
started=$(date +%s.%N)
report=$(/usr/bin/python3 Tests/IntegrationTests/Fixtures/backup.py incremental "$next" qemu:dirty-bitmap:since-base "$work/incremental.img")
ended=$(date +%s.%N)
read_bytes=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['bytes_read'])" "$report")
echo "incremental of 16 GiB after 164 MiB of 64 KiB random writes: read $((read_bytes >> 20)) MiB" \
     "($(python3 -c "print(f'{$read_bytes / (16 << 30) * 100:.2f}')") % of the disk) in $(seconds "$started" "$ended")s; $report"
