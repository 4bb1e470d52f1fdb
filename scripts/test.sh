#!/usr/bin/env bash
# Usage: scripts/test.sh [pytest args]
# Runs every test: formatting and lints, the Rust unit and integration
# tests (including the fixture replay against the real binary), and the
# compat suite with real ppft clients from PyPI against the release build.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

echo "== setting up the compat venv (pinned ppft, dill, pytest)"
scripts/venv.sh compat-tests/.venv compat-tests/requirements.txt
export PPSERVER_TEST_PYTHON="$here/compat-tests/.venv/bin/python"

echo "== cargo fmt --check, clippy"
cargo fmt --check
cargo clippy --quiet --all-targets -- -D warnings

echo "== cargo test"
cargo test --quiet

echo "== release build"
cargo build --release --quiet
export PPSERVER_BIN="$here/target/release/ppserver"

echo "== compat suite (ppft 1.7.8 clients against target/release/ppserver)"
"$PPSERVER_TEST_PYTHON" -m pytest compat-tests -q "$@"
