#!/usr/bin/env bash
# Installs what mesh-agent's demo and tests need on a Debian 12/13 machine:
# Debian packages (only those missing), then a virtualenv in .venv with the Python packages, and
# .venv-k30 with the kubernetes client Debian 13 ships (30.1.0), one of the client generations the
# agent is tested with (tests/clientgen.py; Debian 12's comes with --system-test).
# Usage: scripts/setup.sh [--system-test]   (the flag adds what the booted-systemd tests need)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/apt-lock.sh

packages=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev iproute2 ca-certificates)
# kubectl may come from another package (a cloud SDK ships one); Debian's is kubernetes-client.
command -v kubectl >/dev/null || packages+=(kubernetes-client)
if [[ "${1:-}" == "--system-test" ]]; then
    packages+=(debootstrap dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
               python3-setuptools lintian fakeroot systemd util-linux python3-kubernetes python3-botocore)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=(env)
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    echo "setup: installing Debian packages: ${missing[*]}"
    # An interrupted dpkg run (a VM rebooted mid-upgrade) must be finished first; failing that, apt says why.
    with_apt_lock "${sudo[@]}" DEBIAN_FRONTEND=noninteractive dpkg --configure -a || true
    with_apt_lock "${sudo[@]}" apt-get update -qq
    with_apt_lock "${sudo[@]}" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Debian's own Python, the one the .deb runs on.
if [[ ! -x .venv/bin/python ]]; then
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -e $stamp ]]; then
    echo "setup: installing Python packages into .venv (log: .venv/pip.log)"
    # botocore (identity provider aws, optional on a VM) pins python-dateutil<3, which the current
    # kubernetes client has outgrown; it uses only dateutil's parser and tz, so it goes in without
    # its pins rather than holding the client back.
    if ! { .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e '.[test]' \
            && .venv/bin/pip install --no-deps 'botocore>=1.29' 'jmespath>=0.7'; } >.venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log
        echo "setup: pip failed; see .venv/pip.log" >&2
        exit 1
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# The kubernetes client generation of Debian 13 (python3-kubernetes 30.1.0), from PyPI, on its own:
# the agent's code runs under it from the repository (PYTHONPATH), so nothing else is installed.
K30_VERSION=30.1.0
if [[ ! -e .venv-k30/.installed-$K30_VERSION ]]; then
    echo "setup: installing kubernetes==$K30_VERSION into .venv-k30 (log: .venv-k30/pip.log)"
    rm -rf .venv-k30
    /usr/bin/python3 -m venv .venv-k30
    if ! .venv-k30/bin/pip install "kubernetes==$K30_VERSION" >.venv-k30/pip.log 2>&1; then
        tail -n 30 .venv-k30/pip.log
        echo "setup: pip failed; see .venv-k30/pip.log" >&2
        exit 1
    fi
    touch ".venv-k30/.installed-$K30_VERSION"
fi
