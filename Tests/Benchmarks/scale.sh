#!/bin/bash
# Many VMs on one host: for each count in $COUNTS (default "10 100 1000"), a fresh
# iofilterd runs that many VMs, each with one 16 MiB disk through the C sample, and this
# reports:
#   start      seconds to start them all (vm start, 8 at a time, each returning once
#              its worker serves)
#   answered   how many disks answer qemu-io (a 4 KiB read) with all of them running
#   list, show median milliseconds of GET /vms and GET /vms/NAME (50 calls each)
#   metrics    median milliseconds of GET /metrics (3 calls)
#   pss        median PSS of one VM's worker processes (the one the host started, the
#              init of its pid namespace, and its child, the worker), /proc/PID/smaps_rollup
#   vmstart    median milliseconds of one more VM's start with all the others running
#              (`iofilter vm start`: the CLI, the API call and the worker's start)
#   ready_ms   median milliseconds from a worker's spawn to its serving, as the host
#              measured it (iofilter_worker_start_seconds) over every VM's start
#   fds        file descriptors iofilterd holds
#
#   COUNTS="10 100" Tests/Benchmarks/scale.sh
runtime=0
rounds=1
size=16M
. "$(dirname "$0")/lib.sh"

counts=${COUNTS:-10 100 1000}
# GET on iofilterd's API socket, for the figures read below.
cat > "$work/api.py" <<'PY'
import http.client, socket

class Connection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.socket_path)

def get(path, url):
    connection = Connection(path)
    connection.request("GET", url)
    body = connection.getresponse().read()
    connection.close()
    return body
PY
passthrough=$bin/libiofilter-passthrough-c.so
printf '%-6s %8s %9s %8s %8s %9s %8s %9s %9s %7s\n' vms start answered list_ms show_ms metrics_ms pss_mib vmstart_ms ready_ms fds

for count in $counts; do
    state=$work/state-$count
    api=$work/api-$count.sock
    "$bin/iofilterd" --state-dir "$state" --socket "$api" --log-level warning --acceptance-level community > "$work/iofilterd-$count.log" 2>&1 &
    daemon=$!
    pids+=($daemon)
    wait_for_socket "$api"
    cli() { "$bin/iofilter" "$@" --socket "$api"; }
    cli plugin install "$passthrough" > /dev/null
    cli policy create c --filter org.swift-iofilter.passthrough-c > /dev/null
    for i in $(seq "$count"); do
        cli disk create "d$i" --size "$size" --policy c > /dev/null
        cli vm create "v$i" --disk "d$i" > /dev/null
    done

    began=$(date +%s%N)
    seq "$count" | xargs -P 8 -I{} "$bin/iofilter" vm start "v{}" --socket "$api" > /dev/null
    start=$(awk -v a="$began" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}')

    answered=$(seq "$count" | xargs -P 8 -I{} sh -c \
        "qemu-io -r -f raw -c 'read 0 4k' 'nbd+unix:///d{}?socket=$state/vms/v{}/d{}.sock' 2>/dev/null | grep -c 'read 4096/4096'" \
        | awk '{n += $1} END {print n + 0}')

    # median_ms PATH [N]: the median milliseconds of N (50) GETs of PATH on the API socket.
    median_ms() {
        PYTHONPATH=$work python3 - "$api" "$1" "${2:-50}" <<'PY'
import statistics, sys, time
from api import get
path, url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = []
for _ in range(count):
    began = time.monotonic()
    get(path, url)
    times.append((time.monotonic() - began) * 1000)
print(f"{statistics.median(times):.2f}")
PY
    }
    list=$(median_ms /vms)
    show=$(median_ms /vms/v1)
    metrics=$(median_ms /metrics 3)
    # The host's own figure for each worker's start, spawn to serving, from /metrics.
    ready=$(PYTHONPATH=$work python3 - "$api" <<'PY'
import statistics, sys
from api import get
text = get(sys.argv[1], "/metrics").decode()
values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("iofilter_worker_start_seconds{")]
print(f"{statistics.median(values) * 1000:.1f}" if values else "-")
PY
)

    # A VM's worker processes: the one the host started and what it started (its pid
    # namespace's init starts the worker proper).
    pss=$(for i in $(seq "$count"); do
              worker=$(cli vm show "v$i" --json | python3 -c 'import json, sys; print(json.load(sys.stdin).get("pid") or "")')
              [ -n "$worker" ] || continue
              total=0
              for process in $worker $(pgrep -P "$worker"); do
                  kb=$(awk '/^Pss:/ {print $2}' "/proc/$process/smaps_rollup" 2>/dev/null || echo 0)
                  total=$((total + ${kb:-0}))
              done
              echo "$total"
          done | sort -n | awk '{v[NR] = $1} END {printf "%.1f", v[int((NR + 1) / 2)] / 1024}')

    cli disk create extra --size "$size" --policy c > /dev/null
    cli vm create extra --disk extra > /dev/null
    vmstart=$(for _ in 1 2 3 4 5; do
                  s=$(date +%s%N); cli vm start extra > /dev/null; e=$(date +%s%N)
                  cli vm stop extra > /dev/null
                  echo $(( (e - s) / 1000000 ))
              done | sort -n | sed -n 3p)
    fds=$(ls "/proc/$daemon/fd" | wc -l)

    printf '%-6s %8.1f %9s %8s %8s %9s %8s %9s %9s %7s\n' "$count" "$start" "$answered/$count" "$list" "$show" "$metrics" "$pss" "$vmstart" "$ready" "$fds"
    kill "$daemon"
    wait "$daemon" 2>/dev/null || true
done
