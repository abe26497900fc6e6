#!/bin/sh
# Install Prometheus and promtool from Debian's `prometheus` package, only when either is missing.
# Safe to run again: it does nothing when both are on PATH. Needs root (or sudo) to install.
set -eu

have_both() {
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

if have_both; then
    echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "prometheus.sh: prometheus/promtool missing and no root or sudo to install them" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Only the binaries are needed: no recommended exporters. In a container without systemd, keep the
# package's service from starting (a policy-rc.d added here is removed again; an existing one is kept).
if [ ! -d /run/systemd/system ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -q --no-install-recommends prometheus

if ! have_both; then
    echo "prometheus.sh: the prometheus package did not provide prometheus and promtool" >&2
    exit 1
fi
echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
