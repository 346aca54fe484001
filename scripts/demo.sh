#!/usr/bin/env bash
# Install everything into .venv and run the main job, `mergeswarm demo`, on an embedded tiny model.
# Extra arguments go to `mergeswarm demo` (see `.venv/bin/mergeswarm demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mergeswarm demo "$@"
