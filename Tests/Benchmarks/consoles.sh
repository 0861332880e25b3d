#!/bin/bash
# What watching costs: 4k randread QD16 on a VM served by iofilterd (the C sample on its
# disk), with nobody watching and with 50 web consoles open plus a Prometheus-style
# scrape of /metrics every second, side by side with nbdkit and qemu-nbd on the same
# data, rounds interleaved. iofilterd samples each worker once for every reader: the
# script counts how often the VM's worker was asked for its figures (iofilterd logs
# each question at debug level) and prints it per second of the consoles row.
#
#   Tests/Benchmarks/consoles.sh [--runtime SECONDS] [--rounds N] [--size 512M] [--quick]
#
# CONSOLES=N changes the number of consoles (default 50).
runtime=10
rounds=3
size=512M
. "$(dirname "$0")/lib.sh"
consoles=${CONSOLES:-50}

prepare_disk
start_nbdkit nbdkit file "$disk"
qemu-nbd -f raw -k "$work/qemu.sock" -t -e 16 --cache=writeback --aio=threads "$disk" & pids+=($!)
wait_for_socket "$work/qemu.sock"; uri[qemu-nbd]="nbd+unix:///?socket=$work/qemu.sock"

# The host: one VM whose disk (a copy of the same data) goes through the C sample.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/iofilterd" --state-dir "$work/host" --acceptance-level community --allow-path "$work" --listen "127.0.0.1:$port" \
    --log-level debug 2> "$work/iofilterd.log" & pids+=($!)
wait_for_socket "$work/host/api.sock"
cli() { "$bin/iofilter" "$@" --socket "$work/host/api.sock"; }
for _ in $(seq 100); do cli vm list > /dev/null 2>&1 && break; sleep 0.1; done
cli plugin install "$passthrough" > /dev/null
cli policy create sample --filter org.swift-iofilter.passthrough-c > /dev/null
cli disk import bench --from "$disk" --policy sample > /dev/null
cat "$work/host/disks/bench.img" > /dev/null
cli vm create bench --disk bench > /dev/null
cli vm start bench > /dev/null
uri[vm]="nbd+unix:///bench?socket=$work/host/vms/bench/bench.sock"
uri[vm+${consoles}-consoles]=${uri[vm]}
token=$(cli token create bench --role read-only 2> /dev/null)

watchers=()
start_watching() {
    for _ in $(seq "$consoles"); do
        curl -sN -o /dev/null -H "Authorization: Bearer $token" "http://127.0.0.1:$port/live" & watchers+=($!)
    done
    ( while true; do curl -s -o /dev/null -H "Authorization: Bearer $token" "http://127.0.0.1:$port/metrics"; sleep 1; done ) & watchers+=($!)
    sleep 2
}
stop_watching() {
    kill "${watchers[@]}" 2>/dev/null || true
    wait "${watchers[@]}" 2>/dev/null || true
    watchers=()
}
asks() { grep -c "asking the worker of VM bench" "$work/iofilterd.log" || true; }

servers=(nbdkit qemu-nbd vm "vm+${consoles}-consoles")
rates=()
for _ in $(seq "$rounds"); do
    for server in "${servers[@]}"; do
        if [ "$server" = "vm+${consoles}-consoles" ]; then
            start_watching
            before=$(asks); started=$(date +%s.%N)
            measure 4k-randread-qd16 "$server" randread 4k 16 "$size"
            after=$(asks); ended=$(date +%s.%N)
            stop_watching
            rates+=("$(python3 -c "print(f'{($after - $before) / ($ended - $started):.2f}')")")
        else
            measure 4k-randread-qd16 "$server" randread 4k 16 "$size"
        fi
    done
done
python3 Tests/Benchmarks/report.py "$results"
sleep 2  # the last consoles' streams end on the host once it notices them gone
echo
# Counted over the watched row (settle, ramp and run): a window of N seconds holds N+1
# questions a second apart, so one a second shows as slightly above 1.
echo "questions to the VM's worker per second with $consoles consoles and a scrape every second: ${rates[*]}"
echo "live streams: $(grep -c "live updates for .*]$" "$work/iofilterd.log") opened, $(grep -c "live updates for .* ended" "$work/iofilterd.log") ended"
