#!/bin/sh
# Installs swift-iofilter the way Linux daemons install:
#
#   PREFIX/bin/iofilter, PREFIX/bin/iofilterd      the CLI and the host
#   PREFIX/libexec/iofilter/iofilter-worker        the sandboxed worker (never run by hand)
#   PREFIX/include/iofilter.h                      the plug-in ABI
#   PREFIX/lib/pkgconfig/iofilter.pc               cc $(pkg-config --cflags iofilter) ...
#   PREFIX/lib/iofilter/plugins/*.so               the sample plug-ins (iofilterd --demo uses them)
#   PREFIX/share/man/man1/*.1                      a manual page for every command
#   PREFIX/share/{bash-completion,zsh,fish}/...    shell completions
#   PREFIX/share/iofilter/alerts.yml               Prometheus alert rules for /metrics
#   PREFIX/lib/systemd/system/iofilterd.service    the host as a systemd service
#
#   sh scripts/install.sh [--prefix /usr/local] [--destdir DIR] [--from BIN-DIR]
#
# --destdir stages everything below DIR (for packaging); --from installs an existing
# build's programs instead of building a release. The programs use the Swift runtime of
# the toolchain they were built with (the worker must share it with Swift plug-ins).
set -eu
prefix=/usr/local
destdir=
from=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --destdir) destdir=$2; shift 2 ;;
        --from) from=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 64 ;;
    esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be an absolute path" >&2; exit 64 ;; esac
cd "$(dirname "$0")/.."

if [ -z "$from" ]; then
    sh scripts/install-dependencies.sh
    swift build -c release >&2
    from=$(swift build -c release --show-bin-path)
fi
# The manual pages come from the programs' own help, by swift-argument-parser's tool
# (taken from --from's directory when it was built there).
manual_tool=$from/generate-manual
if [ ! -x "$manual_tool" ]; then
    swift build -c release --product generate-manual >&2
    manual_tool=$(swift build -c release --show-bin-path)/generate-manual
fi

root=$destdir$prefix
install -d "$root/bin" "$root/libexec/iofilter" "$root/include" "$root/lib/pkgconfig" "$root/lib/iofilter/plugins" \
    "$root/share/man/man1" "$root/share/bash-completion/completions" "$root/share/zsh/site-functions" \
    "$root/share/fish/vendor_completions.d" "$root/lib/systemd/system"
install -m 0755 "$from/iofilter" "$from/iofilterd" "$root/bin/"
install -m 0755 "$from/iofilter-worker" "$root/libexec/iofilter/"
install -m 0644 include/iofilter.h "$root/include/"
install -d "$root/share/iofilter"
install -m 0644 scripts/share/alerts.yml "$root/share/iofilter/"
for sample in passthrough-c cache replication template; do
    install -m 0755 "$from/libiofilter-$sample.so" "$root/lib/iofilter/plugins/"
done

version=$("$from/iofilter" --version | cut -d' ' -f1)
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" > "$root/lib/pkgconfig/iofilter.pc" <<'PC'
prefix=@PREFIX@
includedir=${prefix}/include
pluginsdir=${prefix}/lib/iofilter/plugins

Name: iofilter
Description: The swift-iofilter plug-in ABI: build I/O filter plug-ins in C
Version: @VERSION@
Cflags: -I${includedir}
PC

for program in iofilter iofilterd; do
    "$manual_tool" "$from/$program" --multi-page --output-directory "$root/share/man/man1" >/dev/null
done
"$from/iofilter" --generate-completion-script bash > "$root/share/bash-completion/completions/iofilter"
"$from/iofilter" --generate-completion-script zsh > "$root/share/zsh/site-functions/_iofilter"
"$from/iofilter" --generate-completion-script fish > "$root/share/fish/vendor_completions.d/iofilter.fish"

sed "s|@PREFIX@|$prefix|g" > "$root/lib/systemd/system/iofilterd.service" <<'UNIT'
[Unit]
Description=swift-iofilter host: I/O filter chains for virtual disks
Documentation=man:iofilterd(1)
After=local-fs.target network.target

[Service]
Type=simple
ExecStart=@PREFIX@/bin/iofilterd --state-dir /var/lib/iofilter
# Who may do what, and which plug-ins it installs (see iofilterd(1)), e.g.:
#   --admin-group iofilter-admin --read-only-group iofilter-view --acceptance-level partner
# Stop and restart end iofilterd alone (SIGQUIT): the VMs' workers and the partner
# daemons serve on, and the next start adopts them, so an upgrade of the host or a
# restart never interrupts a VM. `iofilter vm stop` stops a VM; at shutdown the
# system's final SIGTERM reaches the workers, whose filters flush and destage.
KillMode=process
KillSignal=SIGQUIT
TimeoutStopSec=60
Restart=on-failure
RestartSec=2
StateDirectory=iofilter
StateDirectoryMode=0700
UMask=0077
# Workers get cgroups of their own below the service's.
Delegate=yes
# The host needs root to give each worker its namespaces, private root and identity;
# nothing else of the system is written.
ProtectSystem=strict
ReadWritePaths=/var/lib/iofilter
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelModules=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=multi-user.target
UNIT

echo "installed swift-iofilter $version in $root" >&2
