#!/bin/bash
# How long a worker takes to serve: from starting `iofilter serve` to its NBD URI on
# stdout (plug-in validation in a sandboxed child, then the worker's spawn, its
# confinement — namespaces, private root, identity, Landlock, seccomp — loading the
# plug-ins and opening the disk), with no filters and with the C sample: validated
# before (its manifest remembered, as at every start after the first) and new (the
# record cleared before each start, so the validator runs). Median and p90 of --rounds
# starts. With BASELINE_BIN=DIR (another build's bin directory) the same starts are
# measured for it, interleaved, and the ratio is printed.
#
#   Tests/Benchmarks/startup.sh [--rounds N]
runtime=0
rounds=20
size=64M
. "$(dirname "$0")/lib.sh"

prepare_disk
# The validated plug-ins' record (see ValidatedManifests), this run's own.
export XDG_CACHE_HOME=$work/cache
# Built against the ABI 1.0 header, so that a baseline from before 1.1 loads it too.
passthrough=$work/passthrough-abi-1.0.so
cc -O2 -shared -fPIC -ITests/IntegrationTests/Fixtures/abi-1.0 -o "$passthrough" Plugins/passthrough-c/passthrough.c
# starts BIN NAME [serve options...]: seconds from exec to the URI, one start.
starts() {
    local binary=$1 name=$2; shift 2
    python3 - "$binary/iofilter" "$disk" "$work/$name.sock" "$@" <<'PY'
import subprocess, sys, time
binary, disk, socket, *rest = sys.argv[1:]
began = time.monotonic()
server = subprocess.Popen([binary, "serve", disk, "--socket", socket, *rest],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
line = server.stdout.readline()
elapsed = time.monotonic() - began
server.terminate()
server.wait()
if not line.startswith(b"nbd"):
    sys.exit("no URI: " + server.stderr.read().decode()[-500:])
print(f"{elapsed * 1000:.2f}")
PY
}

builds=("new $bin")
[ -n "${BASELINE_BIN:-}" ] && builds+=("baseline $BASELINE_BIN")
for _ in $(seq "$rounds"); do
    for build in "${builds[@]}"; do
        set -- $build
        echo -e "$1\tno-filters\t$(starts "$2" "$1-none")" >> "$results"
        # New first (the record cleared: the validator runs), then validated before.
        rm -rf "$XDG_CACHE_HOME"
        echo -e "$1\tc-sample-new\t$(starts "$2" "$1-c" --filter "$passthrough")" >> "$results"
        echo -e "$1\tc-sample\t$(starts "$2" "$1-c" --filter "$passthrough")" >> "$results"
    done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    build, case, ms = line.split("\t")
    rows.setdefault((case, build), []).append(float(ms))
print(f"{'case':<13} {'build':<9} {'median ms':>10} {'p90 ms':>8} {'ratio':>6}")
for case in ("no-filters", "c-sample", "c-sample-new"):
    base = rows.get((case, "baseline"))
    for build in ("new", "baseline"):
        values = rows.get((case, build))
        if not values:
            continue
        median = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        ratio = f"{median / statistics.median(base):.3f}" if base and build == "new" else ""
        print(f"{case:<13} {build:<9} {median:>10.1f} {p90:>8.1f} {ratio:>6}")
PY
