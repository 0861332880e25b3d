#!/bin/bash
# Benchmark of the Swift samples (issue: SDK and samples), side by side in one run:
#  - cache in front of slow storage (nbdkit delay filter, 1 ms per read, over NBD):
#    4k randread QD16 over a 64 MiB hot set, warmed first: no cache, our cache,
#    nbdkit's cache filter with cache-on-read=true
#  - replication (async) on 4k randwrite QD16 against the same chain without it, to a
#    remote-like target (nbdkit's memory plugin over NBD) and to a file on the same disk
#  - the full sample chain (replication + write-back cache + C sample) on a fast file
#    against no filters
#
#   Tests/Benchmarks/samples.sh [--runtime SECONDS] [--rounds N] [--quick]
runtime=10
rounds=3
. "$(dirname "$0")/lib.sh"
hot=64M
cache=$bin/libiofilter-cache.so
replication=$bin/libiofilter-replication.so
passthrough=$bin/libiofilter-passthrough-c.so

slowdisk=$work/slow.img
make_disk "$slowdisk" 1G
start_nbdkit slow --filter=delay file "$slowdisk" delay-read=1ms
start_iofilter uncached "${uri[slow]}"
start_iofilter iofilter-cache "${uri[slow]}" --filter "$cache:size=256M,block-size=4K"
start_nbdkit nbdkit-cache --filter=cache nbd socket="$work/slow.sock" cache-on-read=true
warm() { fio --name=warm --ioengine=nbd --uri="${uri[$1]}" --rw=read --bs=1M --iodepth=8 --size=$hot --output=/dev/null >&2; }
warm iofilter-cache
warm nbdkit-cache
for server in uncached iofilter-cache nbdkit-cache; do measure slow-4k-randread-qd16-hot64M "$server" randread 4k 16 $hot; done

fast=$work/fast.img
make_disk "$fast" 1G
start_iofilter no-filters "$fast"
remote=1 start_nbdkit remote-replica memory 1G
start_iofilter replication-nbd "$fast" --filter "$replication:target=${uri[remote-replica]},mode=async,journal-size=256M"
start_iofilter replication-file "$fast" --filter "$replication:target=$work/replica.img,mode=async,journal-size=256M"
start_iofilter full-chain "$fast" --filter "$replication:target=$work/replica2.img,mode=async,journal-size=256M" \
    --filter "$cache:size=512M,mode=write-back" --filter "$passthrough"
# Rows measure steady state: the replicas finish their initial sync first.
wait_for_log replication-nbd "is in sync"
wait_for_log replication-file "is in sync"
wait_for_log full-chain "is in sync"
# The write rows swing with the page cache's state: interleaved rounds, median kept.
for _ in $(seq "$rounds"); do
    for server in no-filters replication-nbd replication-file; do measure 4k-randwrite-qd16 "$server" randwrite 4k 16 1G; done
    for server in no-filters full-chain; do measure 4k-randread-qd16-chain "$server" randread 4k 16 256M; done
    for server in no-filters full-chain; do measure 4k-randwrite-qd16-chain "$server" randwrite 4k 16 256M; done
done

python3 Tests/Benchmarks/report.py "$results"
