#!/usr/bin/env bash
# Usage: scripts/test.sh [pytest args]
# Runs every test: formatting and lints, the Rust unit and integration
# tests (including the fixture replay against the real binary), and the
# compat suite with real clients from PyPI against the release build, once
# per client family (ppft 1.7.8, ppft 1.6.6.4, pp 1.7.0), each from its own
# venv with pinned versions; the server's workers run with that venv too.
# Then pathos (its own venv: pathos 0.3.5 on ppft 1.7.8) starting the
# server with pathos.core.serve and mapping on it (compat-tests/test_pathos.py).
# The wheel (scripts/wheel) is built once and installed by
# compat-tests/test_wheel.py into venvs of its own, in the ppft 1.7.8 run.
# The multi-host tests (autodiscovery, cluster) need root and `ip netns`:
# iproute2 is installed here if `ip` is missing; so are slurm-wlm and
# munge, for the Slurm test (examples/slurm/ppserver.sbatch on a real Slurm).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

echo "== setting up the compat venvs (pinned clients: ppft 1.7.8, ppft 1.6.6.4, pp 1.7.0)"
scripts/venv.sh compat-tests/.venv compat-tests/requirements.txt
scripts/venv.sh compat-tests/.venv-ppft1664 compat-tests/requirements-ppft1664.txt
scripts/venv.sh compat-tests/.venv-pp170 compat-tests/requirements-pp170.txt
scripts/venv.sh compat-tests/.venv-pathos compat-tests/requirements-pathos.txt
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing iproute2 (ip netns: the autodiscovery and cluster tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; } ||
        echo "== could not install iproute2: the autodiscovery and cluster tests will be skipped"
fi
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing promtool (Debian's prometheus package: checks the /metrics page)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends prometheus >/dev/null; } ||
        echo "== could not install prometheus: the promtool check will be skipped"
fi
# --- Slurm (compat-tests/test_slurm.py): Debian's slurm-wlm and munge ---
if { [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing slurm-wlm and munge (a Slurm cluster on this host: compat-tests/test_slurm.py)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null; } ||
        echo "== could not install slurm-wlm and munge: the Slurm test will be skipped"
fi
# --- end of Slurm ---
export PPSERVER_TEST_PYTHON="$here/compat-tests/.venv/bin/python"

echo "== import circles (scripts/check-imports), cargo fmt --check, clippy"
scripts/check-imports
cargo fmt --check
cargo clippy --quiet --all-targets --all-features -- -D warnings

echo "== cargo check for musl (glibc-only calls must stay gated)"
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
    cargo check --quiet --target x86_64-unknown-linux-musl
else
    echo "SKIPPED: the x86_64-unknown-linux-musl target cannot be installed here"
fi

echo "== cargo test"
cargo test --quiet

echo "== release build"
cargo build --release --quiet
export PPSERVER_BIN="$here/target/release/ppserver"

echo "== wheel (scripts/wheel; installed by compat-tests/test_wheel.py)"
wheel=$(scripts/wheel | tail -n 1)
export PPSERVER_WHEEL="$wheel"

failed=()
for family in "ppft 1.7.8:.venv" "ppft 1.6.6.4:.venv-ppft1664" "pp 1.7.0:.venv-pp170"; do
    name=${family%%:*}
    venv=compat-tests/${family#*:}
    echo "== compat suite ($name clients and workers against target/release/ppserver)"
    "$venv/bin/python" -m pytest compat-tests -q "$@" || failed+=("$name")
done
# pathos requires ppft 1.7.8 (and its own dill, pox, multiprocess): its own
# venv, which also runs the workers of the server pathos starts. Exit code 5
# (every test deselected by the arguments) is not a failure here.
echo "== pathos 0.3.5 starting and using target/release/ppserver"
rc=0
compat-tests/.venv-pathos/bin/python -m pytest compat-tests/test_pathos.py -q "$@" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    failed+=("pathos")
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "== compat suite FAILED for: ${failed[*]}"
    exit 1
fi
