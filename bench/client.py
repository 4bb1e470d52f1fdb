"""One benchmark client: a real, unmodified pp/ppft client process.

Run by bench/bench.py with the interpreter of the venv under test, so the
same file drives a ppft 1.7.8 client (bench/.venv-ppft) or a pp 1.7.0 client
(bench/.venv-pp); bench/latency.py runs it too, for its churn and latency
phases, and bench/churn.py for its numpy phase (ppft only). It takes one
JSON argument (see ``main``), connects, warms up, optionally waits at a
barrier, runs its phases and prints one line ``BENCH-JSON {...}`` with the
figures. The marker and the /proc CPU reader are bench/benchlib.py's, the
same the reading side uses (this file's folder is first on sys.path, as it
runs as a script).

Why a separate process rather than measuring inside bench.py: each
configuration needs its own client package (ppft or pp 1.7.0) and the scaling
test needs N independent clients, each with its own pp.Server; a process per
client is also what a real deployment looks like.
"""

import json
import os
import sys
import time

try:
    # ppft's venv also installs a `pp` shim; import ppft explicitly there so
    # the client under test is unambiguous. pp 1.7.0's venv has only `pp`.
    import ppft as pp
except ImportError:
    import pp

from benchlib import MARKER, cpu_ticks

CLK_TCK = os.sysconf("SC_CLK_TCK")


# Job functions. They are defined here, in __main__, so the client ships them
# as source (the usual case for pp users); the workers need nothing but the
# worker package to run them.
def ident(x):
    return x


def blen(b):
    return len(b)


def numpy_job(seconds):
    """Uses numpy in the worker (a no-op import where the worker was forked
    from a fork-server that preloaded it), then sleeps so that the other
    jobs of its batch land on other workers; returns (worker pid, sum)."""
    import os
    import time
    import numpy
    total = int(numpy.arange(10 ** 5).sum())
    time.sleep(seconds)
    return os.getpid(), total


def cpu_seconds(pid):
    """utime+stime of one process (all its threads, not its children), from
    /proc/<pid>/stat; None without a pid."""
    if not pid:
        return None
    return sum(cpu_ticks(pid)) / CLK_TCK


def emit(kind, payload):
    sys.stdout.write(MARKER + json.dumps(dict(payload, kind=kind)) + "\n")
    sys.stdout.flush()


def run_tiny(server, n):
    """Submit n tiny jobs, then collect them all in order, checking each.
    Returns (seconds, wrong answers)."""
    t0 = time.monotonic()
    jobs = [server.submit(ident, (i,)) for i in range(n)]
    wrong = sum(1 for i, job in enumerate(jobs) if job() != i)
    return time.monotonic() - t0, wrong, t0


def run_churn(server, backlog, max_seconds):
    """Tiny jobs without a pause, `backlog` of them submitted ahead, until a
    line (or EOF) arrives on stdin or max_seconds pass; then the backlog is
    collected. Used by bench/latency.py: against a server with -r every job
    ends a worker, so the server gets a steady stream of SIGCHLD."""
    import collections
    import threading
    stop = threading.Event()

    def wait_stdin():
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    emit("churning", {})
    t0 = time.monotonic()
    pending, done, wrong, i = collections.deque(), 0, 0, 0
    while not stop.is_set() and time.monotonic() - t0 < max_seconds:
        while len(pending) < backlog:
            pending.append((i, server.submit(ident, (i,))))
            i += 1
        k, job = pending.popleft()
        wrong += job() != k
        done += 1
    seconds = time.monotonic() - t0
    for k, job in pending:
        wrong += job() != k
    return {"jobs": done, "seconds": seconds, "wrong": wrong}


def run_numpy(server, jobs, seconds, batches):
    """Batches of `jobs` numpy jobs submitted at once, each sleeping
    `seconds`, until one batch ran on `jobs` different workers (at most
    `batches` batches). Used by bench/churn.py to have every worker of a
    server import and use numpy before their memory is read."""
    expected = int(sum(range(10 ** 5)))
    runs = []
    for _ in range(batches):
        results = [job() for job in [server.submit(numpy_job, (seconds,))
                                     for _ in range(jobs)]]
        wrong = sum(1 for r in results if not r or r[1] != expected)
        pids = [r[0] for r in results if r]
        runs.append({"pids": pids, "wrong": wrong})
        if not wrong and len(set(pids)) == jobs:
            break
    return runs


def stat_round_trip(server):
    """Seconds for one Server.get_stats(): with a remote server, ppft sends
    TIME on its STAT connection and reads the answer, which no worker is
    involved in."""
    t0 = time.perf_counter()
    stats = server.get_stats()
    took = time.perf_counter() - t0
    if not any(s.rworker for s in stats.values()):
        raise SystemExit("get_stats: no STAT connection to the server")
    return took


def run_latency(server, seconds, ping_seconds, ping_gap):
    """For `seconds`: one tiny job, submitted and waited for, then STAT
    round trips for ping_seconds (ping_gap apart), and again. Returns every
    latency, in seconds."""
    jobs, pings, wrong, i = [], [], 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        wrong += server.submit(ident, (i,))() != i
        jobs.append(time.perf_counter() - t0)
        i += 1
        pings_end = time.monotonic() + ping_seconds
        while time.monotonic() < pings_end:
            pings.append(stat_round_trip(server))
            time.sleep(ping_gap)
    return {"jobs": jobs, "stat": pings, "wrong": wrong, "seconds": seconds}


def main():
    cfg = json.loads(sys.argv[1])
    # cfg keys:
    #   server      "host:port", or null for local workers (no server)
    #   secret      the server's secret
    #   ncpus       local workers (0 with a server)
    #   server_pid  pid whose CPU time is sampled around the tiny runs, or null
    #   warmup      tiny jobs to run before anything is timed
    #   barrier     print READY and wait for a line on stdin before the phases
    #   phases      list of {"name": "tiny", "n": N, "reps": R}
    #                    or {"name": "tiny_auto", "n_fast": N, "n_slow": M,
    #                        "slow_below": JOBS_PER_S, "reps": R}
    #                    or {"name": "bulk", "jobs": J, "mb": M, "reps": R}
    #                    or {"name": "churn", "backlog": B, "max_seconds": S}
    #                    or {"name": "latency", "seconds": S,
    #                        "ping_seconds": P, "ping_gap": G}
    #                    or {"name": "numpy", "jobs": J, "seconds": S,
    #                        "batches": B}
    ppservers = (cfg["server"],) if cfg["server"] else ()
    server = pp.Server(ncpus=cfg["ncpus"], ppservers=ppservers, secret=cfg["secret"])
    out = {"client_version": pp.__version__, "pid": os.getpid()}

    # Warm-up: opens every connection (the client connects to remote servers
    # in a background thread, so the first jobs also wait for that), starts
    # the workers and fills the function caches on both ends.
    t0 = time.monotonic()
    elapsed, wrong, _ = run_tiny(server, cfg["warmup"])
    if wrong:
        raise SystemExit("warm-up: %d wrong answers" % wrong)
    out["warmup_s"] = elapsed

    if cfg.get("barrier"):
        emit("ready", {})
        if not sys.stdin.readline():
            raise SystemExit("barrier: stdin closed")

    for phase in cfg["phases"]:
        name = phase["name"]
        if name in ("tiny", "tiny_auto"):
            n = phase.get("n")
            if name == "tiny_auto":
                # Calibrate: the slow Python ppservers do ~45 jobs/s, and
                # 2000 of those would take most of the time budget; pick the
                # job count from a short timed run instead of hard-coding
                # which server is slow.
                cal_n = phase.get("calibrate", 100)
                cal_s, wrong, _ = run_tiny(server, cal_n)
                if wrong:
                    raise SystemExit("calibration: %d wrong answers" % wrong)
                out["calibration_jobs_per_s"] = cal_n / cal_s
                slow = cal_n / cal_s < phase["slow_below"]
                n = phase["n_slow"] if slow else phase["n_fast"]
                reps = phase["reps_slow"] if slow else phase["reps"]
            else:
                reps = phase.get("reps", 1)
            runs = []
            for _ in range(reps):
                cpu0 = cpu_seconds(cfg.get("server_pid"))
                mine0 = cpu_seconds(os.getpid())
                seconds, wrong, start = run_tiny(server, n)
                mine1 = cpu_seconds(os.getpid())
                cpu1 = cpu_seconds(cfg.get("server_pid"))
                runs.append({
                    "n": n,
                    "seconds": seconds,
                    "start": start,          # CLOCK_MONOTONIC: comparable
                    "end": start + seconds,  # across processes on Linux
                    "wrong": wrong,
                    "server_cpu_s": None if cpu0 is None else cpu1 - cpu0,
                    # The client's own CPU: on 2 cores the Python client
                    # competes with the server and workers, which explains
                    # much of the tiny-job figures.
                    "client_cpu_s": mine1 - mine0,
                })
            out["tiny"] = runs
        elif name == "bulk":
            size = phase["mb"] * 1024 * 1024
            # Random bytes so nothing on the way can shortcut the data.
            payload = os.urandom(size)
            # One untimed job first: the worker has to receive the function
            # and the allocators on every side grow to 16 MB messages.
            if server.submit(blen, (payload,))() != size:
                raise SystemExit("bulk warm-up: wrong answer")
            runs = []
            for _ in range(phase.get("reps", 1)):
                cpu0 = cpu_seconds(cfg.get("server_pid"))
                t0 = time.monotonic()
                jobs = [server.submit(blen, (payload,)) for _ in range(phase["jobs"])]
                wrong = sum(1 for job in jobs if job() != size)
                seconds = time.monotonic() - t0
                cpu1 = cpu_seconds(cfg.get("server_pid"))
                runs.append({"jobs": phase["jobs"], "mb": phase["mb"],
                             "seconds": seconds, "wrong": wrong,
                             "server_cpu_s": None if cpu0 is None else cpu1 - cpu0})
            out["bulk"] = runs
        elif name == "churn":
            out["churn"] = run_churn(server, phase["backlog"], phase["max_seconds"])
        elif name == "latency":
            out["latency"] = run_latency(server, phase["seconds"], phase["ping_seconds"],
                                         phase["ping_gap"])
        elif name == "numpy":
            out["numpy"] = run_numpy(server, phase["jobs"], phase["seconds"],
                                     phase["batches"])
        else:
            raise SystemExit("unknown phase %r" % name)

    emit("result", out)
    # destroy() kills local workers; remote connections just close. Exit
    # hard afterwards: the client's connection threads are not daemons in
    # every version and must not keep this process alive.
    try:
        server.destroy()
    finally:
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
