"""The local demo: `./scripts/demo.sh` (python -m demo)."""
