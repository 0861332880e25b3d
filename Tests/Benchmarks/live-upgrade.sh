#!/bin/bash
# What a live change of a running VM's filters costs its clients, beside nbdkit and
# qemu-nbd (which cannot change a filter without a restart, and so a reconnect):
#
#  1. A libnbd client at queue depth 1 (4 KiB write, read back, a flush every 16
#     rounds; Tests/IntegrationTests/Fixtures/liveclient.py) against nbdkit, qemu-nbd
#     and an iofilterd VM, each for --runtime seconds: its median and p99 round.
#  2. The same client on the VM while fio with crc32c verify writes beside it and the VM
#     goes through 20 live filter upgrades (a newer build of the test plug-in each
#     time) and 20 policy changes: zero errors, zero verify failures, and the stall
#     distribution: each change's stall as the host measured it (old worker's last
#     request to the new worker taking the clients), and the client's slowest rounds.
#     Goal: <= 100 ms per hand-over on this machine.
#  3. The same client and fio while iofilterd itself restarts 20 times (kill -9 and
#     SIGQUIT in turn, as a crash and `systemctl restart` do): the worker serves on and
#     the new host adopts it. Printed: how long each new host took to answer its API
#     with the VM adopted, and the client's slowest rounds meanwhile.
#
#   Tests/Benchmarks/live-upgrade.sh [--runtime SECONDS] [--quick]
runtime=8
rounds=1
size=256M
. "$(dirname "$0")/lib.sh"

prepare_disk
start_nbdkit nbdkit file "$disk"
cp "$disk" "$work/qemu.img"
qemu-nbd -f raw -k "$work/qemu.sock" -t -e 16 --cache=writeback --aio=threads "$work/qemu.img" & pids+=($!)
wait_for_socket "$work/qemu.sock"; uri[qemu-nbd]="nbd+unix:///?socket=$work/qemu.sock"

start_host() {
    "$bin/iofilterd" --state-dir "$work/host" --acceptance-level community --allow-path "$work" 2>> "$work/iofilterd.log" & host=$!
    pids+=($host)
    wait_for_socket "$work/host/api.sock"
    for _ in $(seq 200); do cli vm list > /dev/null 2>&1 && break; sleep 0.05; done
}
cli() { "$bin/iofilter" "$@" --socket "$work/host/api.sock"; }
# Workers outlive their host: the last host stops them (SIGTERM) on the way out.
trap 'touch "$work/stop" "$work/stop-fio"; kill "$host" 2>/dev/null || true; wait "$host" 2>/dev/null || true; cleanup' EXIT
start_host
plugin() { cc -O2 -shared -fPIC -Iinclude -DPLUGIN_VERSION="\"$1\"" -o "$work/filter-$1.so" Tests/IntegrationTests/Fixtures/testfilter.c -lpthread; echo "$work/filter-$1.so"; }
cli plugin install "$(plugin 1.0.0)" > /dev/null
cli policy create plain --filter org.test.filter > /dev/null
cli policy create deferring --filter org.test.filter:behaviour=defer > /dev/null
cli disk import d --from "$disk" --policy plain > /dev/null
cat "$work/host/disks/d.img" > /dev/null
cli vm create v --disk d > /dev/null
cli vm start v > /dev/null
uri[vm]="nbd+unix:///d?socket=$work/host/vms/v/d.sock"

client() { # URI STOPFILE -> JSON summary on stdout
    /usr/bin/python3 Tests/IntegrationTests/Fixtures/liveclient.py "$1" 0 $((8 << 20)) "$2"
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d[sys.argv[2]])" "$@"; }

# 1. The client alone, each server in turn.
echo "server      p50 ms  p99 ms  rounds  (libnbd, QD1, write+read 4 KiB, ${runtime}s)"
for server in nbdkit qemu-nbd vm; do
    rm -f "$work/stop"
    client "${uri[$server]}" "$work/stop" > "$work/$server.json" & cpid=$!
    sleep "$runtime"; touch "$work/stop"; wait "$cpid"
    printf '%-10s  %6s  %6s  %s\n' "$server" "$(field "$work/$server.json" p50)" "$(field "$work/$server.json" p99)" "$(field "$work/$server.json" rounds)"
done
base=$(field "$work/nbdkit.json" p50)
for server in qemu-nbd vm; do
    echo "$server median round / nbdkit's: $(python3 -c "print(f'{$(field "$work/$server.json" p50) / $base:.2f}x')")"
done
echo

# 2. 20 upgrades and 20 policy changes under the client and fio verify.
rm -f "$work/stop" "$work/stop-fio"
client "${uri[vm]}" "$work/stop" > "$work/drills.json" & cpid=$!
( runs=0; while [ ! -e "$work/stop-fio" ]; do
      fio --name=verify --ioengine=nbd --uri="${uri[vm]}" --rw=randwrite --bs=4k --iodepth=8 --offset=64M --size=64M \
          --verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime=3 --output=/dev/null || { echo "fio failed" >&2; exit 1; }
      runs=$((runs + 1))
  done; echo "$runs fio verify runs, no failure" ) & fpid=$!
sleep 1
stalls=()
for n in $(seq 20); do
    cli plugin install "$(plugin "1.$n.0")" > /dev/null
    stalls+=("$(cli vm upgrade-filters v --json | python3 -c "import json,sys; print(json.load(sys.stdin)['stallMilliseconds'])")")
done
for n in $(seq 20); do
    if [ $((n % 2)) = 1 ]; then policy=deferring; else policy=plain; fi
    cli disk assign-policy d "$policy" > /dev/null
    [ "$(cli disk compliance d)" = compliant ] || { echo "not compliant after change $n" >&2; exit 1; }
done
touch "$work/stop-fio" "$work/stop"
wait "$cpid"; wait "$fpid"
cli events --limit 200 > "$work/events.txt"

python3 - "$work/drills.json" "$work/events.txt" "${stalls[@]}" <<'PY'
import json, re, sys
summary = json.load(open(sys.argv[1]))
upgrades = sorted(float(x) for x in sys.argv[3:])
# Policy changes report their stall in the host's event line.
changes = sorted(float(x) for line in open(sys.argv[2]) if "policy-assigned" in line
                 for x in re.findall(r"taken over in ([0-9.]+) ms", line))
def spread(values):
    if not values:
        return "none"
    q = lambda p: values[min(len(values) - 1, int(len(values) * p))]
    return f"min {values[0]:.1f}  p50 {q(0.5):.1f}  p90 {q(0.9):.1f}  max {values[-1]:.1f} ms  (n={len(values)})"
print(f"client errors: {len(summary['errors'])} {summary['errors'][:1]}")
print(f"host-side stall per live upgrade:  {spread(upgrades)}")
print(f"host-side stall per policy change: {spread(changes)}")
print(f"client rounds: {summary['rounds']}, median {summary['p50']} ms, p99 {summary['p99']} ms")
print(f"client's 40 slowest rounds (one per hand-over at most): {summary['slowest'][:40]}")
worst = summary['slowest'][0] if summary['slowest'] else 0
print(f"longest stall a client saw: {worst:.1f} ms (goal <= 100 ms)")
sys.exit(1 if summary['errors'] else 0)
PY
echo
# 3. 20 restarts of iofilterd under the client and fio verify.
rm -f "$work/stop" "$work/stop-fio"
client "${uri[vm]}" "$work/stop" > "$work/restarts.json" & cpid=$!; pids+=($cpid)
( while [ ! -e "$work/stop-fio" ]; do
      fio --name=verify --ioengine=nbd --uri="${uri[vm]}" --rw=randwrite --bs=4k --iodepth=8 --offset=64M --size=64M \
          --verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime=3 --output=/dev/null || { echo "fio failed" >&2; exit 1; }
  done ) & rpid=$!; pids+=($rpid)
sleep 1
worker=$(cli vm show v --json | python3 -c "import json,sys; print(json.load(sys.stdin)['pid'])")
comebacks=()
for n in $(seq 20); do
    if [ $((n % 2)) = 1 ]; then kill -9 "$host"; else kill -QUIT "$host"; fi
    wait "$host" 2>/dev/null || true
    began=$(date +%s%N)
    start_host
    now=$(cli vm show v --json | python3 -c "import json,sys; print(json.load(sys.stdin)['pid'])")
    [ "$now" = "$worker" ] || { echo "restart $n: worker $now is not the adopted $worker" >&2; exit 1; }
    comebacks+=("$(( ($(date +%s%N) - began) / 1000000 ))")
done
touch "$work/stop-fio" "$work/stop"
wait "$cpid"; wait "$rpid" || { echo "fio verify failed during the restarts" >&2; exit 1; }
python3 - "$work/restarts.json" "${comebacks[@]}" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
back = sorted(int(x) for x in sys.argv[2:])
print(f"iofilterd restarts: 20 (kill -9 and SIGQUIT in turn), the worker adopted each time")
print(f"  new host answering with the VM adopted: min {back[0]}  p50 {back[len(back) // 2]}  max {back[-1]} ms")
print(f"  client errors: {len(summary['errors'])}, rounds {summary['rounds']}, median {summary['p50']} ms, "
      f"slowest {summary['slowest'][:5]} ms")
sys.exit(1 if summary['errors'] else 0)
PY
