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
# The multi-host tests (autodiscovery, cluster, discovery across subnets)
# need root and `ip netns`: iproute2 is installed here if `ip` is missing;
# so are haproxy, for the load balancer test, and slurm-wlm and munge, for
# the Slurm test (examples/slurm/ppserver.sbatch on a real Slurm).
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
# --- load balancer (compat-tests/test_load_balancer.py): Debian's haproxy ---
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ] \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing haproxy (three servers behind it: compat-tests/test_load_balancer.py)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends haproxy >/dev/null; } ||
        echo "== could not install haproxy: the load balancer test will be skipped"
fi
# --- end load balancer ---
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
# --- PyPy family (begin) ---------------------------------------------------
# Debian's pypy3 with ppft 1.7.8 and dill (compat-tests/requirements-pypy.txt)
# for the clients and the workers. Only the modules where the interpreter of
# the client and of the workers matters: the protocol and job tests, and
# test_pypy.py (PyPy workers; the wheel in a PyPy venv). pypy3 and
# pypy3-venv (ensurepip's wheels) are installed as root with apt-get when
# missing; without them the family is skipped, saying so.
pypy_modules=(test_jobs.py test_protocol.py test_auth.py test_stats.py test_concurrency.py
    test_worker_failures.py test_pypy.py)
pypy_ready() { pypy3 -c 'import ensurepip, sys; sys.exit(ensurepip.version() is None)' >/dev/null 2>&1; }
pypy_started=$SECONDS
if ! pypy_ready && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing pypy3 and pypy3-venv (the PyPy family)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        pypy3 pypy3-venv >/dev/null; } ||
        echo "== could not install pypy3: the PyPy family will be skipped"
fi
if pypy_ready; then
    echo "== compat suite (ppft 1.7.8 on PyPy, clients and workers: ${pypy_modules[*]})"
    rc=0
    scripts/venv.sh compat-tests/.venv-pypy compat-tests/requirements-pypy.txt pypy3 &&
        compat-tests/.venv-pypy/bin/python -m pytest "${pypy_modules[@]/#/compat-tests/}" -q "$@" ||
        rc=$?
    # Exit code 5: every test deselected by the arguments.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        failed+=("ppft 1.7.8 on PyPy")
    fi
    echo "== PyPy family: $((SECONDS - pypy_started)) s (install, venv and tests)"
else
    echo "SKIPPED: the PyPy family: no pypy3 with ensurepip (as root, scripts/test.sh installs" \
        "Debian's pypy3 and pypy3-venv)"
fi
# --- PyPy family (end) -----------------------------------------------------
if [ ${#failed[@]} -gt 0 ]; then
    echo "== compat suite FAILED for: ${failed[*]}"
    exit 1
fi
