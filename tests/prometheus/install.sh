#!/usr/bin/env bash
# Install Prometheus (Debian `prometheus`) for the metrics tests (tests/prometheus/server.py
# starts its own server on loopback with a generated config and a temp storage dir; nothing runs
# as a service). Idempotent. Needs root (or sudo) and apt.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    echo "prometheus already installed"
    exit 0
fi

SUDO=""
[[ $(id -u) == 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The package scripts try to start the service; there is no systemd here, which is fine.
$SUDO apt-get install -y -qq --no-install-recommends prometheus
echo "installed: prometheus $(dpkg-query -W -f='${Version}' prometheus)"
