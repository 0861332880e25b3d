#!/bin/sh
# Installs the Debian packages swift-iofilter builds and tests with, if any is missing:
#   libffi-dev      management calls (libffi)
#   libseccomp-dev  the worker sandbox
#   libsqlite3-dev  iofilterd's state (GRDB)
#   libgnutls28-dev NBD over TLS (PSK and X.509), as libnbd, nbdkit and QEMU speak it
#   nettle-dev      Ed25519 and SHA-256 for plug-in signatures and API tokens (GnuTLS's own library)
#   pkg-config      finds them for SwiftPM
#   qemu-utils libnbd-bin fio nbdkit   real NBD clients and servers for tests and benchmarks
#   sqlite3         the crash drills check the state database's integrity with it
# With --tests it also installs man-db and systemd (the install test renders a manual
# page and verifies iofilterd.service with systemd-analyze), openssl and curl (the API's
# TLS and token tests make a certificate and call it as a browser would),
# nbdsh's Python module (python3-libnbd: fast-zero, cache and block-status requests),
# gnutls-bin (psktool and certtool make the NBD TLS tests' keys and certificates) and
# schemathesis (from PyPI), which the API tests run against iofilterd's OpenAPI document,
# and prometheus-client (from PyPI), whose parser reads /metrics in the tests; and
# promtool, taken out of Debian's prometheus package without installing the server
# (nothing starts listening), which checks the alert rules install.sh ships; and for
# the guests the vhost-user-blk tests boot: qemu-system-x86 (TCG), a Debian kernel
# (linux-image-amd64, whose virtio and ext4 modules go into the guest's initramfs),
# busybox-static and cpio (the guest's userland and its archive), e2fsprogs (mkfs.ext4
# and e2fsck on the host side), libvirt-clients and libxml2-utils (virt-xml-validate
# checks `vm libvirt-xml` against libvirt's own schema), and libvirt-daemon with its
# QEMU driver (a session libvirtd, run as nobody, boots the printed domain; not
# libvirt-daemon-system, whose services the tests do not need).
set -eu
packages="libffi-dev libseccomp-dev libsqlite3-dev libgnutls28-dev nettle-dev pkg-config qemu-utils libnbd-bin fio nbdkit sqlite3"
[ "${1:-}" = "--tests" ] && packages="$packages man-db systemd openssl curl python3-libnbd gnutls-bin iproute2 chromium binutils qemu-system-x86 linux-image-amd64 busybox-static cpio e2fsprogs libvirt-clients libxml2-utils libvirt-daemon libvirt-daemon-driver-qemu"
missing=""
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
    echo "installing:$missing" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing >&2
fi

if [ "${1:-}" = "--tests" ] && ! command -v schemathesis >/dev/null 2>&1; then
    echo "installing: schemathesis (PyPI)" >&2
    python3 -m pip install -q schemathesis >&2 || python3 -m pip install -q --break-system-packages schemathesis >&2
fi
if [ "${1:-}" = "--tests" ] && ! python3 -c 'import prometheus_client' 2>/dev/null; then
    echo "installing: prometheus-client (PyPI)" >&2
    python3 -m pip install -q prometheus-client >&2 || python3 -m pip install -q --break-system-packages prometheus-client >&2
fi
if [ "${1:-}" = "--tests" ] && ! command -v promtool >/dev/null 2>&1 && [ ! -x /usr/local/libexec/iofilter-tests/promtool ]; then
    echo "installing: promtool (from Debian's prometheus package)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    unpack=$(mktemp -d)
    (cd "$unpack" && apt-get download -q prometheus >&2 && dpkg-deb -x prometheus_*.deb root)
    $SUDO install -D -m 0755 "$unpack/root/usr/bin/promtool" /usr/local/libexec/iofilter-tests/promtool
    rm -rf "$unpack"
fi
