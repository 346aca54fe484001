#!/usr/bin/env bash
# System packages the test suite runs: Prometheus (a real server scraping a live swarm; promtool
# checks the rules), docker-compose (validates docker/compose.yaml; no Docker engine needed),
# faketime (a volunteer with a wrong clock) and iproute2 and iptables (the network lab).
# Installs only what is missing, with apt-get (as root, or through sudo).
set -euo pipefail
missing=()
command -v prometheus > /dev/null || missing+=(prometheus)
command -v promtool > /dev/null || missing+=(prometheus)
command -v docker-compose > /dev/null || missing+=(docker-compose)
command -v faketime > /dev/null || missing+=(faketime)
command -v ip > /dev/null || missing+=(iproute2)
command -v tc > /dev/null || missing+=(iproute2)
command -v iptables > /dev/null || missing+=(iptables)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get > /dev/null; then
    echo "install_system.sh: please install: ${missing[*]} (no apt-get here)" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo > /dev/null; then
        echo "install_system.sh: not root and no sudo; please install: ${missing[*]}" >&2
        exit 1
    fi
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) > /dev/null
