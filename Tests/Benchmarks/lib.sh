# Shared by the benchmark scripts: options, build, scratch space, servers, fio runs.
# A script sets its defaults (runtime, rounds, size) and then sources this file, which
# reads the script's own command line.
set -euo pipefail
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --quick) runtime=3; rounds=1; size=256M; shift ;;
        *) echo "usage: $0 [--runtime SECONDS] [--rounds N] [--size SIZE] [--quick]" >&2; exit 64 ;;
    esac
done
cd "$(dirname "$0")/../.."
sh scripts/install-dependencies.sh
swift build -c release >&2
bin=$(swift build -c release --show-bin-path)
work=$(mktemp -d "${BENCH_DIR:-/tmp}/iofilter-bench.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
results=$work/results.tsv
: > "$results"

wait_for_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# make_disk PATH SIZE: a raw file full of data, in the page cache.
make_disk() {
    fio --name=fill --filename="$1" --size="$2" --rw=write --bs=1M --iodepth=8 --ioengine=libaio \
        --refill_buffers --output=/dev/null >&2
    cat "$1" > /dev/null
}

# prepare_disk: a $size raw file in $disk, and the C sample, built with cc and the
# header alone, in $passthrough.
prepare_disk() {
    disk=$work/disk.img
    echo "preparing a $size raw file..." >&2
    make_disk "$disk" "$size"
    passthrough=$work/passthrough-c.so
    # Against the ABI 1.0 header: a baseline build from before 1.1 loads it as well.
    cc -O2 -shared -fPIC -ITests/IntegrationTests/Fixtures/abi-1.0 -o "$passthrough" Plugins/passthrough-c/passthrough.c
}

# start_iofilter NAME DISK [serve options...]: sets uri[NAME]. With `build=DIR` before
# the call, that build's iofilter serves (a baseline to compare with, in the same run).
declare -A uri
start_iofilter() {
    local name=$1 disk=$2; shift 2
    "${build:-$bin}/iofilter" serve "$disk" --socket "$work/$name.sock" --state-dir "$work/state-$name" "$@" \
        > "$work/$name.uri" 2> "$work/$name.log" &
    pids+=($!)
    for _ in $(seq 400); do [ -s "$work/$name.uri" ] && break; sleep 0.05; done
    [ -s "$work/$name.uri" ] || { cat "$work/$name.log" >&2; exit 1; }
    uri[$name]=$(head -1 "$work/$name.uri")
}

# start_nbdkit NAME [nbdkit arguments...]: sets uri[NAME]. With `remote=1` before the
# call, the server stands in for another machine (a replica): it runs at nice 10, so it
# takes the CPU the servers under test leave idle rather than competing with them.
start_nbdkit() {
    local name=$1; shift
    ${remote:+nice -n 10} nbdkit -f -U "$work/$name.sock" "$@" & pids+=($!)
    wait_for_socket "$work/$name.sock"
    uri[$name]="nbd+unix:///?socket=$work/$name.sock"
}

# settle: waits (up to 3 minutes) until every worker process is idle, so that one
# server's background work (a replication shipper draining its journal, a cache
# destaging) never runs during, and is never charged to, another server's row; then
# writes back the page cache's dirty pages, which the kernel would otherwise flush
# during the next row.
settle() {
    local before after
    for _ in $(seq 180); do
        sync
        before=$(worker_cpu_ticks); sleep 1; after=$(worker_cpu_ticks)
        [ $((after - before)) -lt 5 ] && return 0
    done
    echo "workers still busy after 3 minutes" >&2
}
worker_cpu_ticks() {
    local total=0 pid
    for pid in $(pgrep -f iofilter-worker); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo $total
}

# fio stands in for the guest, which runs on CPUs of its own: it is pinned to the last
# CPU. Unpinned on this 2-core machine, the scheduler put fio on the server's CPU
# whenever the other one was busier (a replication shipper running, say), and every
# reply the server sent woke fio there to preempt it: 1,400 preemptions a second of
# the data path, charged to the server.
client_pin=()
[ "$(nproc)" -ge 2 ] && client_pin=(taskset -c "$(( $(nproc) - 1 ))")

# measure ROW SERVER RW BS IODEPTH SIZE [extra fio options...]: one fio run, one result line.
measure() {
    local row=$1 server=$2 rw=$3 bs=$4 depth=$5 size=$6; shift 6
    settle
    local out="$work/$row.$server.$RANDOM$RANDOM.json"
    echo "$row on $server..." >&2
    "${client_pin[@]}" fio --name="$row" --ioengine=nbd --uri="${uri[$server]}" --rw="$rw" --bs="$bs" --iodepth="$depth" --size="$size" \
        --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 --norandommap "$@" \
        --output-format=json --output="$out" >&2
    echo -e "$row\t$server\t$out" >> "$results"
}

# wait_for_log NAME TEXT [SECONDS]: until the iofilter server NAME has logged TEXT.
wait_for_log() {
    for _ in $(seq $((${3:-180} * 10))); do grep -q "$2" "$work/$1.log" && return 0; sleep 0.1; done
    echo "$1 never logged '$2'" >&2; exit 1
}
