#!/usr/bin/env bash
# Sets up what the demo needs (Debian packages, .venv) and runs it: a VM joining an Istio mesh,
# on loopback, with a real Envoy and a Kubernetes API emulator. No root needed beyond apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m demo "$@"
