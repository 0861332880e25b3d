import Foundation
import Testing

/// cgroup v2 for real. This machine's controllers are on v1, while Debian 12, RHEL 9 and
/// Ubuntu 22.04 hosts have v2 alone: a guest (QEMU, TCG) boots with every v1 controller
/// disabled (`cgroup_no_v1=all`), runs this machine's own root read-only over virtio-9p
/// (the build as it is, nothing copied), and there runs `iofilter serve` and iofilterd.
@Suite("cgroup v2 in a guest", .serialized)
struct CgroupV2Tests {
    let directory = Harness.temporaryDirectory("cgroup2")

    /// In the guest: a worker's group has its limits (memory.max, no swap, pids.max,
    /// cpu.weight) and holds the worker; a filter that allocates without bound is killed
    /// by the kernel inside that group alone, the supervisor names the limit from the
    /// group's OOM events, and a new worker serves. iofilterd sits in a leaf of its own
    /// with its VM's and daemon's groups beside it (not nested below each other); when
    /// it stops, no group of theirs is left.
    @Test func workersAreLimitedAndKilledByTheirOwnGroups() throws {
        let greedy = try Harness.buildTestPlugin("tf-greedy-v2", in: directory)
        let bin = Harness.binDirectory.path
        let initramfs = try Guest.hostRootInitramfs(script: """
            mkdir -p /run/t && cd /run/t
            say() { echo "GUEST-$*"; }
            # waitfor FILE PATTERN [N]: until FILE has N (1) lines matching PATTERN, at most 120 s.
            waitfor() { i=0; while [ $i -lt 120 ] && [ "$(grep -c "$2" "$1")" -lt "${3:-1}" ]; do sleep 1; i=$((i+1)); done; [ "$(grep -c "$2" "$1")" -ge "${3:-1}" ]; }
            groups() { find /sys/fs/cgroup -name 'iofilter-*' -type d | sort | tr '\\n' ' '; }

            # A worker of iofilter serve, in its group, with a filter that allocates on reads.
            truncate -s 16M /run/t/g.img
            IOFILTER_LOG_LEVEL=debug \(bin)/iofilter serve /run/t/g.img --filter \(greedy):behaviour=allocate-on-read --memory-limit 256M \\
                --socket /run/t/g.sock > /run/t/serve.log 2>&1 &
            SERVE=$!
            waitfor /run/t/serve.log "is serving" || say "SERVE-FAILED $(cat /run/t/serve.log)"
            URI=$(grep -o "nbd+unix://[^ ']*" /run/t/serve.log | head -1)
            WORKER=$(pgrep -f iofilter-worker | head -1)
            G=/sys/fs/cgroup$(cut -d: -f3 /proc/$WORKER/cgroup)
            say "WORKER-GROUP $(basename $G) memory.max=$(cat $G/memory.max) swap.max=$(cat $G/memory.swap.max) pids.max=$(cat $G/pids.max) cpu.weight=$(cat $G/cpu.weight)"
            say "SUPERVISOR-GROUP $(cut -d: -f3 /proc/$SERVE/cgroup)"
            qemu-io -f raw -c "read 2M 4096" "$URI" > /dev/null 2>&1
            waitfor /run/t/serve.log "reached its memory limit" && say "OOM-NAMED"
            say "OOM-EVENTS $(grep -h '^oom_kill ' $G/memory.events 2>/dev/null)"
            waitfor /run/t/serve.log "is serving" 2 || say "NO-SECOND-WORKER"
            qemu-io -f raw -c "read 0 4096" "$URI" 2>&1 | grep -q "read 4096/4096" && say "SERVED-AGAIN"
            kill -TERM $SERVE; wait $SERVE
            say "AFTER-SERVE-GROUPS [$(groups)]"
            grep -E "limited by|reached its memory|no cgroup|cannot|its cgroup" /run/t/serve.log | sed 's/^/GUEST-SERVE-LOG /'

            # iofilterd with its demo VM (three filters and the replication daemon).
            \(bin)/iofilterd --state-dir /run/t/state --demo > /run/t/daemon.log 2>&1 &
            DAEMON=$!
            waitfor /run/t/daemon.log "demo VM" || say "DEMO-FAILED $(tail -20 /run/t/daemon.log)"
            say "DAEMON-GROUP $(cut -d: -f3 /proc/$DAEMON/cgroup)"
            say "DAEMON-GROUPS [$(groups)]"
            for g in /sys/fs/cgroup/iofilter-worker-*; do say "GROUP $(basename $g) procs=$(wc -l < $g/cgroup.procs) memory.max=$(cat $g/memory.max) pids.max=$(cat $g/pids.max)"; done
            qemu-io -f raw -c "write -P 0xab 0 1M" -c "read -P 0xab 0 1M" "nbd+unix:///demo-disk?socket=/run/t/state/vms/demo/demo-disk.sock" 2>&1 \\
                | grep -q "read 1048576/1048576" && say "DEMO-SERVED"
            kill -TERM $DAEMON; wait $DAEMON
            say "AFTER-DAEMON-GROUPS [$(groups)]"
            grep -E "no cgroup|cannot delegate|cannot set up" /run/t/daemon.log | sed 's/^/GUEST-DAEMON-LOG /'
            """, in: directory)
        let guest = try Guest.boot(initramfs: initramfs, devices: Guest.hostRootDevice, memory: 1024, kernelArguments: "cgroup_no_v1=all")
        defer { Harness.end(guest.process) }
        #expect(Harness.eventually(420) { guest.output.snapshot().contains("GUEST-DONE") }, "\(guest.output.snapshot())")
        let console = guest.output.snapshot()
        func line(_ marker: String) -> String {
            console.split(whereSeparator: \.isNewline).first { $0.contains("GUEST-\(marker)") }.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        }
        #expect(!console.contains("GUEST-NO-") && !console.contains("FAILED"), "\(console)")

        // The worker's own group, with the limits asked for, below nothing of the host's.
        let worker = line("WORKER-GROUP ")
        #expect(worker.contains("iofilter-worker-") && worker.contains("memory.max=268435456") && worker.contains("swap.max=0")
                && worker.contains("pids.max=") && worker.contains("cpu.weight=100"), "\(console)")
        // The supervisor moved itself into a leaf of its own so that its workers' groups
        // may have controllers (a process sits in no inner group of cgroup v2).
        #expect(line("SUPERVISOR-GROUP ").hasSuffix("/iofilter-host"), "\(console)")
        // Born there: clone3 with CLONE_INTO_CGROUP, never a moment outside its limits.
        #expect(console.contains("was born in its cgroup (clone3)") && !console.contains("was moved into its cgroup"), "\(console)")
        // The kernel killed the worker inside its group; the supervisor said which limit.
        #expect(console.contains("GUEST-OOM-NAMED"), "\(console)")
        #expect(line("SERVE-LOG").contains("limited by its cgroup v2") || console.contains("limited by its cgroup v2"), "\(console)")
        #expect(console.contains("GUEST-SERVED-AGAIN"), "\(console)")
        #expect(line("AFTER-SERVE-GROUPS").contains("[/sys/fs/cgroup/iofilter-host ]"), "a worker's group outlived it:\n\(console)")

        // iofilterd: in the root group, which the first host already opened to the
        // controllers (the root may hold processes), or in the same leaf; its VM's and
        // its daemon's groups beside it, never below it, each limited.
        #expect(line("DAEMON-GROUP ").hasSuffix(" /") || line("DAEMON-GROUP ").hasSuffix("/iofilter-host"), "\(console)")
        let groups = line("DAEMON-GROUPS")
        #expect(!groups.contains("iofilter-host/iofilter-"), "groups nested below the host's leaf:\n\(console)")
        #expect(groups.contains("-daemon-org.swift-iofilter.replication-") && groups.contains("-demo-"), "\(console)")
        let groupLines = console.split(separator: "\n").filter { $0.contains("GUEST-GROUP iofilter-worker-") }
        #expect(!groupLines.isEmpty && groupLines.allSatisfy { !$0.contains("procs=0") && !$0.contains("memory.max=max") && !$0.contains("pids.max=max") },
                "\(console)")
        #expect(console.contains("GUEST-DEMO-SERVED"), "\(console)")
        #expect(!console.contains("GUEST-DAEMON-LOG"), "a worker without its group:\n\(console)")
        #expect(line("AFTER-DAEMON-GROUPS").contains("[/sys/fs/cgroup/iofilter-host ]"), "groups left after iofilterd stopped:\n\(console)")
    }
}
