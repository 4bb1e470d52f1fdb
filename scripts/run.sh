#!/usr/bin/env bash
# Usage: scripts/run.sh [ppserver flags]
# Sets up what the server needs and runs it: a Python venv (.venv) with
# ppft and dill for the workers, and the release build. Flags are passed
# to ppserver as they are, e.g. scripts/run.sh -p 60000 -s SECRET -w 4
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/venv.sh .venv scripts/requirements-run.txt
cargo build --release --quiet
exec target/release/ppserver --python "$here/.venv/bin/python" "$@"
