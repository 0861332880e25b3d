#!/bin/bash
# What vhost-user-blk saves against NBD, for a guest's disk through the same chain (the
# C sample), in one run. A Linux guest under QEMU (TCG: no KVM here) has two disks:
# one on vhost-user-blk, one through QEMU's NBD client (virtio-blk in the guest both
# times), each served by its own `iofilter serve`. fio runs inside the guest, 4k random
# reads and then writes at QD16, on each disk in turn for --rounds rounds.
#
#  1. The worker's CPU seconds per million requests, vhost-user-blk against NBD (goal
#     <= 0.5x): what the worker pays per request once the socket copy and NBD's framing
#     are gone. utime+stime of every process below each `iofilter serve`, from the
#     moment the guest boots until it powers off, over the requests fio completed.
#  2. The guest's IOPS on each disk (goal: vhost-user-blk >= 1.0x NBD). Under TCG the
#     guest's own CPU is the bottleneck, so this says little about a KVM host, where
#     vhost-user-blk back-ends are published close to the host's own IOPS (SPDK, QEMU's
#     storage daemon) and NBD pays a copy and a context switch per request.
#
#   Tests/Benchmarks/vhost-user.sh [--runtime SECONDS] [--rounds N] [--size 512M] [--quick]
runtime=10
rounds=2
size=512M
. "$(dirname "$0")/lib.sh"

prepare_disk
cp "$disk" "$work/nbd.img"
"$bin/iofilter" serve "$disk" --filter "$passthrough" --socket "$work/vhost-nbd.sock" --state-dir "$work/state-vhost" \
    --vhost-user-blk "$work/vhost.sock" --num-queues 2 > "$work/vhost.uri" 2> "$work/vhost.log" & pids+=($!); vhost_serve=$!
start_iofilter nbd "$work/nbd.img" --filter "$passthrough"
nbd_serve=${pids[-1]}
wait_for_socket "$work/vhost.sock"

# The guest: Debian's kernel, busybox, the kernel's virtio modules, and the host's fio
# with the libraries it links.
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -1)
modules=/lib/modules/${kernel#/boot/vmlinuz-}
root=$work/guest
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp /usr/bin/busybox "$root/bin/"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    cp "$modules/$(grep -E "/$m.ko:" "$modules/modules.dep" | cut -d: -f1)" "$root/lib/modules/$m.ko"
done
cp "$(command -v fio)" "$root/bin/fio"
for lib in $(ldd "$(command -v fio)" | grep -o '/[^ ]*'); do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
cat > "$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do insmod /lib/modules/\$m.ko; done
for d in /sys/block/vd*; do [ "\$(cat \$d/serial)" = nbd ] && nbd=/dev/\${d##*/} || vhost=/dev/\${d##*/}; done
for round in \$(seq $rounds); do
  for rw in randread randwrite; do
    for disk in vhost nbd; do
      eval dev=\\\$\$disk
      fio --name=\$disk --filename=\$dev --rw=\$rw --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --runtime=$runtime \
          --time_based --output-format=terse --terse-version=3 | awk -F';' -v d=\$disk -v rw=\$rw '{ r = rw == "randread" ? \$8 : \$49; n = (rw == "randread" ? \$6 : \$47) / 4; print "RESULT", d, rw, r, int(n) }'
    done
  done
done
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initrd.cpio"

# The CPU (clock ticks) of every process below a serve.
below() { local p; for p in $(ps -o pid= --ppid "$1"); do echo "$p"; below "$p"; done; }
cpu_below() {
    local total=0 p
    for p in $(below "$1"); do total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0))); done
    echo "$total"
}
vhost_before=$(cpu_below "$vhost_serve"); nbd_before=$(cpu_below "$nbd_serve")
nbd_socket=${uri[nbd]#*socket=}
timeout $((rounds * 4 * runtime * 3 + 120)) qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem \
    -object memory-backend-memfd,id=mem,size=512M,share=on,seal=on -m 512 -smp 2 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$kernel" -initrd "$work/initrd.cpio" -append "console=ttyS0 quiet panic=-1" \
    -chardev "socket,id=v0,path=$work/vhost.sock,reconnect=1" -device vhost-user-blk-pci,chardev=v0 \
    -drive "file=nbd:unix:$nbd_socket,format=raw,if=none,id=n0,cache=none,aio=threads" -device virtio-blk-pci,drive=n0,serial=nbd \
    > "$work/guest.out" 2>&1 || { tail -20 "$work/guest.out" >&2; exit 1; }
vhost_cpu=$(( $(cpu_below "$vhost_serve") - vhost_before )); nbd_cpu=$(( $(cpu_below "$nbd_serve") - nbd_before ))
grep RESULT "$work/guest.out" > "$work/guest.results" || { tail -20 "$work/guest.out" >&2; exit 1; }

python3 - "$work/guest.results" "$vhost_cpu" "$nbd_cpu" "$(getconf CLK_TCK)" <<'EOF'
import collections, sys
path, vhost_cpu, nbd_cpu, tick = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
iops = collections.defaultdict(list)
requests = collections.Counter()
for line in open(path):
    _, disk, rw, rate, count = line.split()
    iops[(disk, rw)].append(float(rate))
    requests[disk] += int(count)
print("guest IOPS (median of rounds), 4k QD16, fio in a TCG guest:")
for rw in ("randread", "randwrite"):
    v, n = sorted(iops[("vhost", rw)]), sorted(iops[("nbd", rw)])
    mv, mn = v[len(v) // 2], n[len(n) // 2]
    print(f"  {rw:10} vhost-user-blk {mv:8.0f}  NBD {mn:8.0f}  ratio {mv / mn:.2f}x (goal >= 1.0x)")
per = {}
for disk, ticks in (("vhost", vhost_cpu), ("nbd", nbd_cpu)):
    per[disk] = ticks / tick / max(requests[disk], 1) * 1e6
    print(f"  worker CPU, {disk:5}: {ticks / tick:6.2f} s for {requests[disk]} requests = {per[disk]:.1f} s per million")
print(f"worker CPU per request, vhost-user-blk vs NBD: {per['vhost'] / per['nbd']:.2f}x (goal <= 0.5x)")
EOF
