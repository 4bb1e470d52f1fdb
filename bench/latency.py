"""Latency of single jobs and of STAT round trips while workers churn.

Run through scripts/bench-latency, which creates the venv and builds the
release binary first; this file runs with bench/.venv-ppft's python and
uses bench/benchlib.py's process handling and servers and bench/client.py's
clients.

Each binary under test (--binary NAME=PATH, any number) runs as one server
with -r -w 2 (a fresh worker after every job) and ppft 1.7.8 workers, kept
for the whole run. A round, for one binary:
  1. a churn client submits tiny jobs without a pause, a few ahead, so that
     under -r a worker exits after every job and SIGCHLD keeps coming: the
     server's scan of /proc for orphans runs about once a second;
  2. a probe client (a second process) repeats, for --seconds: one tiny job
     submitted and waited for (it queues behind the churn's jobs and waits
     for a fresh worker: that is part of its latency), then STAT round trips
     (ppft's Server.get_stats(), which sends TIME on the STAT connection and
     involves no worker) every PING_GAP for PING_SECONDS;
  3. the churn client stops and reports its jobs/s.
Rounds alternate between the binaries (the order rotating each round) so
that whatever else loads the machine falls on all of them alike; figures
are percentiles over all rounds of a binary pooled together.

The whole set of rounds runs twice: with the processes the machine has (a
sandbox has few) and with --sleepers extra idle `sleep` processes, as a
real host has hundreds to thousands, since the scan reads every one of
them. The sleepers are started in a process group of their own and killed
at the end.

Writes bench/latency.md. Every process started here is in its own process
group and killed on the way out; everything that can block has a deadline.
No figure is checked against a threshold: this measures, it does not test.
"""

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402  (processes, servers, clients)

WORKERS = 2
CHURN_BACKLOG = 8  # churn jobs submitted ahead; ppft keeps 4 on the wire
WARMUP_JOBS = 5
PING_SECONDS = 0.5  # STAT round trips after each probe job, for this long
PING_GAP = 0.002  # between two round trips
ROUNDS = 4
SECONDS = 10  # probe time per round
SLEEPERS = 2000
STALL_MS = 50  # the report counts the STAT round trips slower than this

GLOBAL_DEADLINE = 9 * 60
SLEEPERS_TIMEOUT = 60
READY_TIMEOUT = 60  # a client connected and warmed up
RESULT_MARGIN = 60  # beyond the probe's own --seconds


def process_count():
    return sum(1 for e in os.listdir("/proc") if e.isdigit())


def proc_read_ms():
    """What one read of every /proc/<pid>/stat costs here, from Python
    (median of 5): the work the server's scan does, for scale. The Rust
    scan does the same system calls with less around them."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for e in os.listdir("/proc"):
            if e.isdigit():
                try:
                    with open("/proc/%s/stat" % e, "rb") as f:
                        f.read()
                except OSError:
                    pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def start_sleepers(n, logdir):
    """n idle `sleep` processes under one shell, all in one process group
    (killed as a unit by B.finish). Returns the shell's Popen."""
    proc = B.spawn(["bash", "-c", 'for ((i = 0; i < %d; i++)); do sleep %d & done; '
                    'echo up; wait' % (n, GLOBAL_DEADLINE + 60)],
                   logdir / "sleepers.log", stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE)
    # The shell prints "up" once it has started them all.
    ready, _, _ = select.select([proc.stdout], [], [], SLEEPERS_TIMEOUT)
    if not ready or proc.stdout.readline().strip() != b"up":
        B.finish(proc)
        raise B.BenchError("could not start %d sleep processes within %ds"
                           % (n, SLEEPERS_TIMEOUT))
    return proc


def churn_client(server, logdir, cwd, tag):
    cfg = B.client_cfg(server, 0, warmup=WARMUP_JOBS, phases=[
        {"name": "churn", "backlog": CHURN_BACKLOG,
         "max_seconds": SECONDS + RESULT_MARGIN}])
    return B.Client(B.PY_PPFT, cfg, logdir / ("churn-%s.log" % tag), cwd)


def probe_client(server, logdir, cwd, tag):
    cfg = B.client_cfg(server, 0, warmup=WARMUP_JOBS, phases=[
        {"name": "latency", "seconds": SECONDS, "ping_seconds": PING_SECONDS,
         "ping_gap": PING_GAP}])
    return B.Client(B.PY_PPFT, cfg, logdir / ("probe-%s.log" % tag), cwd)


def one_round(server, logdir, cwd, tag):
    """Churn and probe against one server; returns the probe's latencies
    and the churn's rate."""
    churn = probe = None
    try:
        churn = churn_client(server, logdir, cwd, tag)
        B.wait_all([churn], "churning", READY_TIMEOUT)
        procs = process_count()
        probe = probe_client(server, logdir, cwd, tag)
        lat = B.wait_all([probe], "result", READY_TIMEOUT + SECONDS + RESULT_MARGIN)[0]
        churn.go()  # any line on stdin stops the churn
        ch = B.wait_all([churn], "result", RESULT_MARGIN)[0]
    finally:
        for c in (probe, churn):
            if c:
                c.close()
    wrong = lat["latency"]["wrong"] + ch["churn"]["wrong"]
    if wrong:
        raise B.BenchError("%s: %d wrong answers" % (tag, wrong))
    return {"jobs": lat["latency"]["jobs"], "stat": lat["latency"]["stat"],
            "churn_jobs_per_s": ch["churn"]["jobs"] / ch["churn"]["seconds"],
            "processes": procs}


def run_phase(label, servers, rounds, logdir, cwd):
    """`rounds` rounds over all servers, the order rotating each round."""
    out = {name: {"jobs": [], "stat": [], "churn": [], "processes": []} for name in servers}
    names = list(servers)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        line = []
        for name in order:
            res = one_round(servers[name], logdir, cwd, "%s-%s-%d" % (label, name, r))
            o = out[name]
            o["jobs"] += res["jobs"]
            o["stat"] += res["stat"]
            o["churn"].append(res["churn_jobs_per_s"])
            o["processes"].append(res["processes"])
            stat = res["stat"]
            line.append("%s job p50 %.0f ms, STAT p50 %.2f p99 %.1f max %.0f ms, "
                        "%d over %d ms, churn %.0f jobs/s"
                        % (name, statistics.median(res["jobs"]) * 1000,
                           statistics.median(stat) * 1000, B.percentile(stat, 99) * 1000,
                           max(stat) * 1000, stalls(stat), STALL_MS,
                           res["churn_jobs_per_s"]))
        print("   round %d: %s" % (r + 1, "; ".join(line)), flush=True)
    return out


def stalls(stat):
    """STAT round trips that took over STALL_MS."""
    return sum(1 for v in stat if v * 1000 > STALL_MS)


def render(phases, binaries, machine, command, total_s):
    L = ["# Latency under worker churn", "",
         "Written by `scripts/bench-latency` (one run on one machine; a shared "
         "2-core VM, so single figures move between runs: compare the binaries "
         "within one run, whose rounds alternate). Every server runs with "
         "`-r -w %d` and ppft 1.7.8 workers; clients are unmodified ppft 1.7.8."
         % WORKERS, "",
         "## Machine", ""]
    for k in ("cpu", "cores", "kernel", "python", "rustc", "commit", "date"):
        L.append("- %s: %s" % (k, machine[k]))
    L.append("- 1-minute load average: %s before the run, %s after it (other work "
             "was running on the machine; starting the sleep processes lifts it for a "
             "minute or two by itself)"
             % (B.fmt(machine.get("load_before"), "%.2f"), B.fmt(machine["load"], "%.2f")))
    L.append("- total time: %.0f s" % total_s)
    L.append("- command: `%s`" % command)
    L.append("- binaries: " + "; ".join("`%s` = %s" % (n, p) for n, p in binaries.items()))
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("| binary | processes on the machine | job p50 ms | job p99 ms | STAT p50 ms "
             "| STAT p99 ms | STAT p99.9 ms | STAT max ms | STAT over %d ms "
             "| churn jobs/s | samples (jobs, STAT) |" % STALL_MS)
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase in phases:
        for name in binaries:
            o = phase["out"].get(name, {})
            if not o.get("jobs") or not o.get("stat"):
                L.append("| %s | %s | failed | | | | | | | | |" % (name, phase["label"]))
                continue
            ms = [v * 1000 for v in o["stat"]]
            L.append("| %s | %d-%d | %.0f | %.0f | %.2f | %.1f | %.1f | %.0f | %d "
                     "| %.1f | %d, %d |" % (
                         name, min(o["processes"]), max(o["processes"]),
                         statistics.median(o["jobs"]) * 1000,
                         B.percentile(o["jobs"], 99) * 1000,
                         statistics.median(ms), B.percentile(ms, 99), B.percentile(ms, 99.9),
                         max(ms), stalls(o["stat"]),
                         statistics.median(o["churn"]), len(o["jobs"]), len(ms)))
    L.append("")
    L.append("- job: one tiny job (a function returning its argument) submitted by a "
             "second client and waited for, while the churn client keeps %d jobs "
             "ahead; under -r it queues behind the churn's jobs and waits for fresh "
             "workers, so its latency is mostly worker starts." % CHURN_BACKLOG)
    L.append("- STAT: one `Server.get_stats()` of the same client (ppft sends `TIME` "
             "on its STAT connection; no worker involved), every %.0f ms for %.1f s "
             "after each job: how long the server leaves a ready request waiting. "
             "A stall of the event loop holds up the one round trip in flight, so it "
             "shows as one slow sample among hundreds a second: in the p99.9, the "
             "max and the count over %d ms more than in the p99. On 2 busy cores a few "
             "ms is the scheduler's doing (worker starts keep both cores busy)."
             % (PING_GAP * 1000, PING_SECONDS, STALL_MS))
    L.append("- %d rounds of %d s per binary and process count, binaries taking turns "
             "(order rotating); percentiles (nearest rank) over the rounds' samples "
             "pooled; churn jobs/s: median of the rounds." % (ROUNDS, SECONDS))
    for phase in phases:
        L.append("- %s: 1-minute load average %s at its start; one read of every "
                 "`/proc/<pid>/stat` from Python took %.1f ms (what the server's "
                 "orphan scan reads, about once a second while workers exit)."
                 % (phase["label"], B.fmt(phase["load"], "%.2f"), phase["read_ms"]))
    L.append("")
    return "\n".join(L)


def run_pass(tag, label, servers, logdir, cwd, phases):
    """One pass of ROUNDS rounds, recorded in `phases` (the report's rows)."""
    count = process_count()
    load = B.load_average()
    print("== %d rounds x %d s per binary, %d processes on the machine, load %s"
          % (ROUNDS, SECONDS, count, B.fmt(load, "%.2f")), flush=True)
    out = run_phase(tag, servers, ROUNDS, logdir, cwd)
    phases.append({"label": "%s (%d processes)" % (label, count), "out": out,
                   "load": load, "read_ms": proc_read_ms()})


def main():
    global ROUNDS, SECONDS, SLEEPERS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", action="append", metavar="NAME=PATH",
                        help="a ppserver binary to measure (repeatable; default "
                             "this=target/release/ppserver)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--seconds", type=int, default=SECONDS,
                        help="probe time per round (default %d)" % SECONDS)
    parser.add_argument("--sleepers", type=int, default=SLEEPERS,
                        help="idle processes added for the second pass (default %d; "
                             "0: no second pass)" % SLEEPERS)
    parser.add_argument("--output", default=str(B.BENCH / "latency.md"), metavar="FILE")
    args = parser.parse_args()
    ROUNDS, SECONDS, SLEEPERS = args.rounds, args.seconds, args.sleepers
    binaries = {}
    for spec in args.binary or ["this=%s" % B.BINARY]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).exists():
            sys.exit("--binary %s: expected NAME=PATH of an existing file" % spec)
        binaries[name] = str(Path(path).resolve())
    if not B.PY_PPFT.exists():
        sys.exit("missing %s: run scripts/bench-latency, which sets it up" % B.PY_PPFT)
    command = "scripts/bench-latency " + " ".join(
        arg if " " not in arg else "'%s'" % arg for arg in sys.argv[1:])

    B.arm(GLOBAL_DEADLINE)

    load_before = B.load_average()
    logdir = Path(tempfile.mkdtemp(prefix="pplatency-"))
    workdir = logdir / "cwd"
    workdir.mkdir()
    started = time.monotonic()
    phases = []
    servers = {}
    try:
        for name, path in binaries.items():
            servers[name] = B.start_server(name, [
                path, "-r", "-w", str(WORKERS), "-i", B.HOST, "-p", "{port}",
                "-s", B.SECRET, "--python", B.PY_PPFT, "--worker-module", "ppft"],
                logdir, workdir)
        run_pass("own", "machine's own", servers, logdir, workdir, phases)
        if SLEEPERS:
            print("== starting %d sleep processes" % SLEEPERS, flush=True)
            sleepers = start_sleepers(SLEEPERS, logdir)
            try:
                run_pass("sleepers", "+%d sleepers" % SLEEPERS, servers, logdir, workdir, phases)
            finally:
                B.finish(sleepers)
        for server in servers.values():
            server.stop()
            if server.leftovers:
                print("   %s on SIGTERM: %s" % (server.name, "; ".join(server.leftovers)),
                      file=sys.stderr)
    except B.BenchError as exc:
        print("failed: %s\nlogs in %s" % (exc, logdir), file=sys.stderr)
        B.cleanup_all()
        sys.exit(1)
    except KeyboardInterrupt as exc:
        print("\ninterrupted (%s): stopping everything; logs in %s" % (exc or "Ctrl-C", logdir),
              file=sys.stderr)
        B.cleanup_all()
        sys.exit(130)
    finally:
        signal.alarm(0)
        B.cleanup_all()

    machine = B.machine_info()
    machine["load_before"] = load_before
    text = render(phases, binaries, machine, command, time.monotonic() - started)
    Path(args.output).write_text(text)
    print()
    print(text)
    print("wrote %s" % args.output)
    shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
