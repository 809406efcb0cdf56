#!/usr/bin/env bash
# Install RabbitMQ (Debian rabbitmq-server, ~35 MB) for the offline Globus Compute tests
# (tests/plugins/globus_offline.py starts and stops its own broker on loopback; nothing runs as a
# service). Idempotent: does nothing when the broker is already there. Needs root (or sudo) and apt.
set -euo pipefail

if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] && command -v epmd >/dev/null 2>&1; then
    echo "rabbitmq already installed"
    exit 0
fi

SUDO=""
[[ $(id -u) == 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The package scripts try to start the service; there is no systemd here, which is fine.
$SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server
echo "installed: rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server)"
