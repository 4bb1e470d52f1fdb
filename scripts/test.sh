#!/usr/bin/env bash
# Usage: scripts/test.sh [pytest args]
# Runs every test: formatting and lints, the Rust unit and integration
# tests (including the fixture replay against the real binary), and the
# compat suite with real clients from PyPI against the release build, in
# each client family (ppft 1.7.8, ppft 1.6.6.4, pp 1.7.0), each from its own
# venv with pinned versions; the server's workers run with that venv too.
# The ppft 1.7.8 run is the whole suite; the other two run the tests whose
# outcome depends on the family (protocol, jobs, faults, workers...) and
# leave out the modules marked server_behaviour (flags, signals, limits,
# hostile peers...: the server's own behaviour), which the ppft 1.7.8 run
# covers (compat-tests/README.md). The three runs go side by side: ppft
# 1.7.8 on $PPSERVER_TEST_JOBS pytest-xdist processes (default 4; 0 runs
# each family in one process), the other two on half as many each; tests
# that must not run beside each other say so with an xdist_group marker.
# Workers are forked by the fork-server (the default) in these runs; then
# the ppft 1.7.8 run is made again with --worker-start spawn, beside the
# rest. Then pathos (its own venv: pathos 0.3.5 on ppft 1.7.8) starting the
# server with pathos.core.serve and mapping on it (compat-tests/test_pathos.py).
# The release build is the wheel's (scripts/wheel, into target/wheel): the
# compat suite runs the binary the wheel ships, and compat-tests/test_wheel.py
# installs the wheel into venvs of its own, in the ppft 1.7.8 run.
# The release build and the venvs are made in the background while the lints
# and the Rust tests run (their output is in target/test-logs/), and the
# time of each stage is printed at the end.
# The multi-host tests (autodiscovery, cluster, discovery across subnets)
# need root and `ip netns`: iproute2 is installed here if `ip` is missing;
# so are haproxy, for the load balancer test, slurm-wlm and munge, for the
# Slurm test (examples/slurm/ppserver.sbatch on a real Slurm), strace,
# for the count of wait4 calls (compat-tests/test_processes.py), systemd,
# for systemd-socket-activate (compat-tests/test_reload.py), and pypy3
# with pypy3-venv, for the PyPy family (ppft 1.7.8 on PyPy, clients and
# workers: the protocol and job modules in pypy_modules below), which runs
# beside the others.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

xdist_jobs=${PPSERVER_TEST_JOBS:-4}
logs=target/test-logs
mkdir -p "$logs"
# A fresh clone gains nothing from incremental compilation data.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
fi

# --- stage times ---------------------------------------------------------------
started=$EPOCHREALTIME
stage_names=()
stage_secs=()
stage_start() { stage_t0=$EPOCHREALTIME; echo "== $*"; }
stage_end() { # NAME [START]: records the seconds since START (default: stage_start's)
    stage_names+=("$1")
    stage_secs+=("$(awk -v a="${2:-$stage_t0}" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')")
}
times_printed=
print_times() {
    times_printed=1
    echo "== stage times (wall clock; background stages overlap the others)"
    local i
    for i in "${!stage_names[@]}"; do
        printf '   %5s s  %s\n' "${stage_secs[$i]}" "${stage_names[$i]}"
    done
    printf '   %5s s  in all\n' "$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')"
}

# --- background stages -----------------------------------------------------------
bg_pids=()
on_exit() {
    local rc=$? pid
    for pid in "${bg_pids[@]}"; do # a stage failed: stop what still runs
        if kill -0 "$pid" 2>/dev/null; then
            kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
        fi
    done
    if [ -z "$times_printed" ]; then
        print_times
    fi
    return "$rc"
}
trap on_exit EXIT

# bg NAME LOG COMMAND...: runs COMMAND in the background (its own process
# group), output to LOG; `finish NAME` waits for it.
declare -A bg_pid bg_log bg_t0
bg() {
    local name=$1 log=$2
    shift 2
    bg_t0[$name]=$EPOCHREALTIME
    bg_log[$name]=$log
    rm -f "$log.end"
    set -m
    { "$@"; } >"$log" 2>&1 && echo "$EPOCHREALTIME" >"$log.end" &
    set +m
    bg_pid[$name]=$!
    bg_pids+=("$!")
}
finish() { # NAME: waits for it; if it failed, shows its output and exits
    local name=$1 rc=0
    collect "$name" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "== $name FAILED (exit $rc); its output (${bg_log[$name]}):"
        cat "${bg_log[$name]}"
        exit "$rc"
    fi
}
collect() { # NAME: waits for it, records its time; returns its exit status
    local name=$1 rc=0
    wait "${bg_pid[$name]}" || rc=$?
    # Its own time, from its start to its end (not to this wait).
    if [ -s "${bg_log[$name]}.end" ]; then
        stage_names+=("$name (background)")
        stage_secs+=("$(awk -v a="${bg_t0[$name]}" -v b="$(cat "${bg_log[$name]}.end")" \
            'BEGIN { printf "%.0f", b - a }')")
    else
        stage_end "$name (background)" "${bg_t0[$name]}"
    fi
    return "$rc"
}

# The PyPy family's interpreter: Debian's pypy3 with ensurepip (pypy3-venv).
pypy_ready() { pypy3 -c 'import ensurepip, sys; sys.exit(ensurepip.version() is None)' >/dev/null 2>&1; }

setup_machine() {
    # The venvs: the three client families, pathos.
    local pids=() pid rc=0
    scripts/venv.sh compat-tests/.venv compat-tests/requirements.txt & pids+=($!)
    scripts/venv.sh compat-tests/.venv-ppft1664 compat-tests/requirements-ppft1664.txt & pids+=($!)
    scripts/venv.sh compat-tests/.venv-pp170 compat-tests/requirements-pp170.txt & pids+=($!)
    scripts/venv.sh compat-tests/.venv-pathos compat-tests/requirements-pathos.txt & pids+=($!)
    # What pip does not bring: iproute2 (ip netns: the autodiscovery,
    # cluster and subnet tests), Debian's prometheus package (promtool
    # checks the /metrics page), haproxy (the load balancer test),
    # slurm-wlm and munge (the Slurm test), pypy3 and pypy3-venv (the PyPy
    # family), strace (the count of wait4 calls in test_processes.py),
    # systemd (systemd-socket-activate, the socket activation test), as
    # root with apt-get; the tests say so and skip what needs a missing one.
    local packages=()
    if ! command -v ip >/dev/null 2>&1; then
        packages+=(iproute2)
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        packages+=(prometheus)
    fi
    if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
        packages+=(haproxy)
    fi
    if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; then
        packages+=(slurm-wlm munge)
    fi
    if ! command -v strace >/dev/null 2>&1; then
        packages+=(strace)
    fi
    if ! command -v systemd-socket-activate >/dev/null 2>&1; then
        packages+=(systemd)
    fi
    if ! pypy_ready; then
        packages+=(pypy3 pypy3-venv)
    fi
    if [ ${#packages[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "installing ${packages[*]}"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends "${packages[@]}" >/dev/null; } ||
                echo "could not install ${packages[*]}: the tests that need them will skip"
        else
            echo "not installing ${packages[*]} (needs root and apt-get): the tests that need them will skip"
        fi
    fi
    for pid in "${pids[@]}"; do
        wait "$pid" || rc=1
    done
    if pypy_ready; then
        scripts/venv.sh compat-tests/.venv-pypy compat-tests/requirements-pypy.txt pypy3 || rc=1
    fi
    return "$rc"
}

echo "== in the background: the compat venvs (pinned clients: ppft 1.7.8, ppft 1.6.6.4," \
    "pp 1.7.0; pathos) and system packages ($logs/setup.log)"
bg "venvs and system packages" "$logs/setup.log" setup_machine
echo "== in the background: the release build, as the wheel (scripts/wheel into target/wheel;" \
    "$logs/wheel.log)"
bg "release build and wheel" "$logs/wheel.log" scripts/wheel --target-dir target/wheel

# --- lints and Rust tests (foreground) ---------------------------------------------
stage_start "import circles (scripts/check-imports)"
scripts/check-imports
stage_end "import circles"

stage_start "cargo fmt --check"
cargo fmt --check
stage_end "cargo fmt --check"

stage_start "cargo clippy"
cargo clippy --quiet --all-targets --all-features -- -D warnings
stage_end "cargo clippy"

stage_start "cargo check for musl (glibc-only calls must stay gated)"
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
    cargo check --quiet --target x86_64-unknown-linux-musl
else
    echo "SKIPPED: the x86_64-unknown-linux-musl target cannot be installed here"
fi
stage_end "cargo check for musl"

# The fixture replay (tests/replay.rs) runs its workers with the venv.
finish "venvs and system packages"
export PPSERVER_TEST_PYTHON="$here/compat-tests/.venv/bin/python"
stage_start "cargo test"
cargo test --quiet
stage_end "cargo test"

finish "release build and wheel"
wheel=$(tail -n 1 "$logs/wheel.log")
case $wheel in
    "$here"/dist/*.whl) ;;
    *) echo "scripts/wheel did not name a wheel; its output:"; cat "$logs/wheel.log"; exit 1 ;;
esac
export PPSERVER_WHEEL="$wheel"
export PPSERVER_BIN="$here/target/wheel/release/ppserver"
echo "== release binary: $PPSERVER_BIN (the wheel's); wheel: $wheel"

# --- the compat suite ----------------------------------------------------------------
# ppft 1.7.8 (the whole suite) in the foreground; ppft 1.6.6.4 and pp 1.7.0
# (their family's tests) beside it, each on fewer xdist processes, their
# output shown once the first is done. Exit code 5 (every test deselected,
# e.g. by a -k given to this script) is not a failure.
pytest_in() { # VENV XDIST_JOBS [pytest args]: the compat suite with VENV's clients
    local venv=compat-tests/$1 jobs=$2 rc=0
    shift 2
    local parallel=()
    if [ "$jobs" != 0 ]; then
        parallel=(-n "$jobs" --dist loadgroup)
    fi
    "$venv/bin/python" -m pytest compat-tests -q "${parallel[@]}" --durations=15 "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        rc=0
    fi
    return "$rc"
}
other_jobs=$(( (xdist_jobs + 1) / 2 ))
failed=()
declare -A family_log
for family in "ppft 1.6.6.4:.venv-ppft1664" "pp 1.7.0:.venv-pp170"; do
    name=${family%%:*}
    family_log[$name]=$logs/compat-${family#*:.venv-}.log
    echo "== in the background: compat suite ($name clients and workers against the" \
        "release binary; ${family_log[$name]})"
    bg "compat suite, $name" "${family_log[$name]}" pytest_in "${family#*:}" "$other_jobs" "$@"
done
# PyPy (Debian's pypy3, ppft 1.7.8 and dill: compat-tests/requirements-pypy.txt)
# for the clients and the workers: only the modules where the interpreter of
# the client and of the workers matters, and test_pypy.py (PyPy workers; the
# wheel in a PyPy venv), in one process beside the others.
pypy_modules=(test_jobs.py test_protocol.py test_auth.py test_stats.py test_concurrency.py
    test_worker_failures.py test_pypy.py)
pypy_run() {
    local rc=0
    compat-tests/.venv-pypy/bin/python -m pytest "${pypy_modules[@]/#/compat-tests/}" -q \
        --durations=5 "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        rc=0
    fi
    return "$rc"
}
if [ -x compat-tests/.venv-pypy/bin/python ] && pypy_ready; then
    echo "== in the background: compat suite (ppft 1.7.8 on PyPy: ${pypy_modules[*]};" \
        "$logs/compat-pypy.log)"
    bg "compat suite, PyPy" "$logs/compat-pypy.log" pypy_run "$@"
else
    echo "SKIPPED: the PyPy family: no pypy3 with ensurepip (as root, scripts/test.sh installs" \
        "Debian's pypy3 and pypy3-venv)"
fi
stage_start "compat suite (ppft 1.7.8 clients and workers against the release binary)"
pytest_in .venv "$xdist_jobs" "$@" || failed+=("ppft 1.7.8")
stage_end "compat suite, ppft 1.7.8"
# The suite once more with every worker spawned (--worker-start spawn; the
# runs above use the default, the fork-server), ppft 1.7.8, beside the rest:
# all but the fork-server's own tests, the two that bring their own server
# command (Slurm's batch script, the wheel's venvs), and the three whose
# subject is done before any worker sees a job (the login throttle and
# handshake budgets, discovery across subnets, the PROXY header). It is the
# last stage on the way to the end, with the machine to itself but for the
# reports, so it takes as many test processes as the first run.
spawn_run() {
    PPSERVER_WORKER_START=spawn pytest_in .venv "$xdist_jobs" \
        --ignore=compat-tests/test_forkserver.py --ignore=compat-tests/test_slurm.py \
        --ignore=compat-tests/test_wheel.py --ignore=compat-tests/test_hostile.py \
        --ignore=compat-tests/test_discovery_subnets.py \
        --ignore=compat-tests/test_proxy_protocol.py "$@"
}
echo "== in the background: compat suite with --worker-start spawn (ppft 1.7.8;" \
    "$logs/compat-spawn.log)"
bg "compat suite, --worker-start spawn" "$logs/compat-spawn.log" spawn_run "$@"
# report NAME HEADER LOG FAILED_AS: waits for background stage NAME, shows
# its LOG under HEADER, and counts it as FAILED_AS if it failed.
report() {
    local rc=0
    collect "$1" || rc=$?
    echo "== $2:"
    cat "$3"
    if [ "$rc" -ne 0 ]; then
        failed+=("$4")
    fi
}
for name in "ppft 1.6.6.4" "pp 1.7.0"; do
    report "compat suite, $name" \
        "compat suite ($name clients and workers; ${family_log[$name]})" \
        "${family_log[$name]}" "$name"
done
# pathos requires ppft 1.7.8 (and its own dill, pox, multiprocess): its own
# venv, which also runs the workers of the server pathos starts.
stage_start "pathos 0.3.5 starting and using the release binary"
rc=0
compat-tests/.venv-pathos/bin/python -m pytest compat-tests/test_pathos.py -q "$@" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    failed+=("pathos")
fi
stage_end "pathos"
report "compat suite, --worker-start spawn" \
    "compat suite with --worker-start spawn ($logs/compat-spawn.log)" \
    "$logs/compat-spawn.log" "ppft 1.7.8 with --worker-start spawn"
# PyPy: its run went beside the others (started below, before ppft 1.7.8's).
if [ -n "${bg_pid[compat suite, PyPy]:-}" ]; then
    report "compat suite, PyPy" "compat suite (ppft 1.7.8 on PyPy; $logs/compat-pypy.log)" \
        "$logs/compat-pypy.log" "ppft 1.7.8 on PyPy"
fi
print_times
if [ ${#failed[@]} -gt 0 ]; then
    echo "== compat suite FAILED for: ${failed[*]}"
    exit 1
fi
