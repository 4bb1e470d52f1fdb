"""Fresh workers: tiny jobs under -r, worker replacement time, worker memory.

Part of the benchmark run by scripts/bench: bench/bench.py calls ``run``
after its own configurations and ``render`` for its section of
bench/results.md. It uses bench/benchlib.py's process handling (every
process in its own group, killed on the way out), servers and
bench/client.py's clients; it does not import bench.py.

Three measurements, each with --only keys of its own:

  -r rows     one server at a time with -r -w 2 (a fresh worker after every
              job), tiny jobs from the matching client family, as bench.py's
              tiny runs: ours with --worker-start fork and spawn, ppft 1.7.8's
              and pp 1.7.0's Python ppservers with -r.
  replace-*   ours with -d -w 2 and ppft workers, idle: SIGKILL one worker
              (its pid only), wait for the slot's next ready line, again and
              again; the figure is the server's own, from that line.
  memory-*    ours with -w 4: each worker runs a numpy job, then the PSS of
              the workers (and, with fork, of the fork-server) is summed.

Our server logs, at debug level, `slot N: worker pid P ready by fork in
X.XXX ms` (or `by spawn`) when a worker is ready; a build that logs only
`slot N: worker pid P ready` leaves the start mode and X unavailable, and the
report says so.
"""

import os
import re
import signal
import statistics
import time

import benchlib as B

REPLACE_WORKERS, MEMORY_WORKERS = 2, 4

# -r rows: job counts by calibration, as bench.py's tiny runs, but smaller:
# a worker start per job makes every configuration far slower than without
# -r (spawned workers: 5-30 jobs/s on a busy 2-core machine).
R_WARMUP, R_CALIBRATE = 10, 50
R_TINY_FAST, R_TINY_SLOW, R_SLOW_BELOW = 1000, 100, 150
R_TINY_REPS_FAST, R_TINY_REPS_SLOW = 3, 1

# Replacement time: kills per mode, bounded by REPLACE_DEADLINE.
KILLS = 100
IDLE_GAP = 0.05  # after a ready line, before the next kill: the worker idles
POLL = 0.002  # log polling while waiting for a ready line
READY_TIMEOUT = 60  # all workers ready at startup; one replacement
REPLACE_DEADLINE = 60  # per mode

# Worker memory.
NUMPY_SLEEP = 0.5  # seconds each numpy job sleeps: the batch's jobs overlap
NUMPY_BATCHES = 3  # tries at a batch that ran on every worker
MEMORY_TIMEOUT = 60  # the memory client, start to result
SETTLE = 1.0  # after the client left, before PSS is read

READY_RE = re.compile(r"slot (\d+): worker pid (\d+) ready"
                      r"(?: by (\w+) in ([0-9]+(?:\.[0-9]+)?) ms)?")


# ------------------------------------------------------------ configurations

def ours(workers, start, *extra, module="ppft", python=None):
    """Our server's argv: ppft (or pp._worker) workers, --worker-start."""
    return [B.BINARY, "-i", B.HOST, "-p", "{port}", "-s", B.SECRET, "-w", str(workers),
            "--python", python or B.PY_PPFT, "--worker-module", module,
            "--worker-start", start] + list(extra)


def r_configs():
    """The -r rows. Ours run with -d, for the ready lines (two short log
    lines per job)."""
    py = ["-i", B.HOST, "-p", "{port}", "-s", B.SECRET, "-w", str(B.WORKERS), "-r"]
    return [
        B.Config("ours-ppft-r-fork", "ppserver (Rust) -r --worker-start fork, ppft 1.7.8",
                 B.PY_PPFT, ours(B.WORKERS, "fork", "-r", "-d")),
        B.Config("ours-ppft-r-spawn", "ppserver (Rust) -r --worker-start spawn, ppft 1.7.8",
                 B.PY_PPFT, ours(B.WORKERS, "spawn", "-r", "-d")),
        B.Config("ppft-py-r", "ppft 1.7.8 Python ppserver -r", B.PY_PPFT,
                 [B.PY_PPFT, "-m", "ppft.server"] + py),
        B.Config("ours-pp170-r-fork", "ppserver (Rust) -r --worker-start fork, pp 1.7.0",
                 B.PY_PP, ours(B.WORKERS, "fork", "-r", "-d", module="pp._worker",
                               python=B.PY_PP)),
        B.Config("ours-pp170-r-spawn", "ppserver (Rust) -r --worker-start spawn, pp 1.7.0",
                 B.PY_PP, ours(B.WORKERS, "spawn", "-r", "-d", module="pp._worker",
                               python=B.PY_PP)),
        B.Config("pp170-py-r", "pp 1.7.0 Python ppserver -r", B.PY_PP,
                 [B.PY_PP, "-m", "pp.cli"] + py),
    ]


MODES = ("fork", "spawn")
REPLACE_KEYS = ["replace-" + m for m in MODES]
MEMORY_KEYS = ["memory-" + m for m in MODES]


def keys():
    return [c.key for c in r_configs()] + REPLACE_KEYS + MEMORY_KEYS


# ---------------------------------------------------------------- ready lines

class ReadyLines:
    """Follows a server's log file and parses its worker-ready lines."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.buf = b""

    def new(self):
        """[(slot, pid, mode or None, ms or None)] logged since the last call."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = []
        for line in lines:
            line = line.decode(errors="replace")
            m = READY_RE.search(line)
            # A worker's stderr is logged as "worker pid P stderr: ...":
            # never taken for a ready line.
            if m and "stderr:" not in line[:m.start()]:
                out.append((int(m.group(1)), int(m.group(2)), m.group(3),
                            float(m.group(4)) if m.group(4) else None))
        return out


def wait_ready(lines, want, timeout, what):
    """Ready lines until `want` (a predicate on the list so far) holds."""
    got = []
    deadline = time.monotonic() + timeout
    while not want(got):
        if time.monotonic() > deadline:
            raise B.BenchError("%s: no ready line within %ds" % (what, timeout))
        got += lines.new()
        if not want(got):
            time.sleep(POLL)
    return got


def start_summary(ready):
    """'fork 200' / 'spawn 200' / 'not in the log 200': how the workers of
    these ready lines were started, by count."""
    counts = {}
    for _, _, mode, _ in ready:
        k = mode or "not in the log"
        counts[k] = counts.get(k, 0) + 1
    return ", ".join("%s %d" % kv for kv in sorted(counts.items()))


def on_server(res, key, argv, logdir, workdir, body):
    """Start a server for one measurement, run body(server), which fills
    `res`, and stop the server whatever happens; a BenchError (the start's
    or the body's) goes into res["errors"], and so do what the server left
    behind and the time taken (not recorded when it did not start)."""
    started = time.monotonic()
    try:
        server = B.start_server(key, argv, logdir, workdir)
    except B.BenchError as exc:
        res["errors"].append(str(exc))
        return res
    try:
        body(server)
    except B.BenchError as exc:
        res["errors"].append(str(exc))
    finally:
        server.stop()
        res["leftovers"] = server.leftovers
    res["seconds"] = time.monotonic() - started
    return res


# ---------------------------------------------------------------- -r rows

def measure_r(cfg, logdir, workdir):
    """Tiny jobs against one -r server, started for it and stopped after."""
    res = {"key": cfg.key, "label": cfg.label, "errors": []}

    def body(server):
        lines = ReadyLines(server.log_path)
        phase = {"name": "tiny_auto", "calibrate": R_CALIBRATE, "n_fast": R_TINY_FAST,
                 "n_slow": R_TINY_SLOW, "slow_below": R_SLOW_BELOW,
                 "reps": R_TINY_REPS_FAST, "reps_slow": R_TINY_REPS_SLOW}
        client = B.Client(cfg.client_python,
                          B.client_cfg(server, 0, warmup=R_WARMUP, phases=[phase]),
                          logdir / ("client-%s.log" % cfg.key), workdir)
        try:
            single = B.wait_all([client], "result", B.CLIENT_TIMEOUT)[0]
        finally:
            client.close()
        tiny = single["tiny"]
        rates = [r["n"] / r["seconds"] for r in tiny]
        res.update(client_version=single["client_version"], tiny_n=tiny[0]["n"],
                   tiny_reps=len(tiny), tiny_rates=rates,
                   tiny_jobs_per_s=statistics.median(rates),
                   tiny_wrong=sum(r["wrong"] for r in tiny),
                   cpu_ms_per_1000=(sum(r["server_cpu_s"] for r in tiny)
                                    / sum(r["n"] for r in tiny) * 1000 * 1000))
        if cfg.server_argv[0] == B.BINARY:
            ready = lines.new()
            res["started_by"] = start_summary(ready)
            ms = [r[3] for r in ready if r[3] is not None]
            res["ready_ms_p50"] = statistics.median(ms) if ms else None
    return on_server(res, cfg.key, cfg.server_argv, logdir, workdir, body)


# -------------------------------------------------------- replacement time

def measure_replace(mode, logdir, workdir):
    """Kill an idle worker (slots taking turns), wait for its slot's next
    ready line, KILLS times or until REPLACE_DEADLINE."""
    key = "replace-" + mode
    res = {"key": key, "mode": mode, "errors": [], "ms": [], "seen_ms": [], "ready": []}

    def body(server):
        lines = ReadyLines(server.log_path)
        first = wait_ready(lines, lambda got: len({s for s, *_ in got}) >= REPLACE_WORKERS,
                           READY_TIMEOUT, "startup")
        current = {}  # slot -> (pid, starttime)
        for slot, pid, _, _ in first:
            current[slot] = (pid, (B.proc_stat(pid) or (0, None))[1])
        deadline = time.monotonic() + REPLACE_DEADLINE
        for i in range(KILLS):
            if time.monotonic() > deadline:
                res["errors"].append("deadline of %ds: %d kills of %d"
                                     % (REPLACE_DEADLINE, i, KILLS))
                break
            slot = sorted(current)[i % len(current)]
            pid, start = current[slot]
            time.sleep(IDLE_GAP)
            # Only a live worker of this server: guards against pid reuse.
            if B.descendants(server.proc.pid).get(pid) != start or start is None:
                raise B.BenchError("slot %d: worker pid %d is no longer a live process "
                                   "under the server, not killed" % (slot, pid))
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            got = wait_ready(lines, lambda got: any(s == slot and p != pid
                                                    for s, p, _, _ in got),
                             READY_TIMEOUT, "slot %d after killing pid %d" % (slot, pid))
            seen = time.monotonic() - t0
            for s, p, m, ms in got:
                current[s] = (p, (B.proc_stat(p) or (0, None))[1])
                if s == slot and p != pid:
                    res["ready"].append((s, p, m, ms))
                    res["seen_ms"].append(seen * 1000)
                    if ms is not None:
                        res["ms"].append(ms)
        res["started_by"] = start_summary(res["ready"])
    return on_server(res, key, ours(REPLACE_WORKERS, mode, "-d"), logdir, workdir, body)


# ------------------------------------------------------------ worker memory

def pss_kib(pid):
    """Pss of one process in KiB, from /proc/PID/smaps_rollup, or None."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def measure_memory(mode, logdir, workdir):
    """MEMORY_WORKERS workers that each ran a numpy job: PSS of the workers
    and of the server's other descendants (the fork-server)."""
    key = "memory-" + mode
    extra = ("--preload", "numpy") if mode == "fork" else ()
    res = {"key": key, "mode": mode, "errors": [], "flags": " ".join(
        ["-w", str(MEMORY_WORKERS), "--worker-start", mode] + list(extra))}

    def body(server):
        lines = ReadyLines(server.log_path)
        ready = wait_ready(lines, lambda got: len({s for s, *_ in got}) >= MEMORY_WORKERS,
                           READY_TIMEOUT, "startup")
        phase = {"name": "numpy", "jobs": MEMORY_WORKERS, "seconds": NUMPY_SLEEP,
                 "batches": NUMPY_BATCHES}
        client = B.Client(B.PY_PPFT, B.client_cfg(server, 0, phases=[phase]),
                          logdir / ("client-%s.log" % key), workdir)
        try:
            runs = B.wait_all([client], "result", MEMORY_TIMEOUT)[0]["numpy"]
        finally:
            client.close()
        ready += lines.new()
        workers = {}  # slot -> pid, the latest ready line of each
        for slot, pid, _, _ in ready:
            workers[slot] = pid
        last = runs[-1]
        res["batches"] = len(runs)
        if last["wrong"] or len(set(last["pids"])) != MEMORY_WORKERS:
            raise B.BenchError("no batch of %d numpy jobs ran right on %d different "
                               "workers in %d tries (last: pids %s, %d wrong)"
                               % (MEMORY_WORKERS, MEMORY_WORKERS, len(runs), last["pids"],
                                  last["wrong"]))
        if set(last["pids"]) != set(workers.values()):
            raise B.BenchError("the numpy jobs ran on pids %s, the ready lines name %s"
                               % (sorted(last["pids"]), sorted(workers.values())))
        res["started_by"] = start_summary(ready)
        time.sleep(SETTLE)
        res["worker_pss_kib"] = [pss_kib(p) for p in sorted(workers.values())]
        others = sorted(set(B.descendants(server.proc.pid)) - set(workers.values()))
        res["other_pss_kib"] = [pss_kib(p) for p in others]
        res["others"] = [cmdline(p)[:80] for p in others]
        res["server_pss_kib"] = pss_kib(server.proc.pid)
        if None in res["worker_pss_kib"] + res["other_pss_kib"]:
            raise B.BenchError("a process ended before its PSS was read")
        res["total_kib"] = sum(res["worker_pss_kib"]) + sum(res["other_pss_kib"])
    return on_server(res, key, ours(MEMORY_WORKERS, mode, "-d", *extra), logdir, workdir,
                     body)


# --------------------------------------------------------------------- run

def run(only, logdir, workdir):
    """Every measurement of this file that `only` (a list of keys, or None
    for all) selects; returns {"r": [...], "replace": [...], "memory": [...]}."""
    sel = lambda key: not only or key in only  # noqa: E731
    out = {"r": [], "replace": [], "memory": []}
    for cfg in r_configs():
        if sel(cfg.key):
            print("== %s: %s" % (cfg.key, cfg.label), flush=True)
            res = measure_r(cfg, logdir, workdir)
            out["r"].append(res)
            print("   tiny %s jobs/s in %.0f s%s%s" % (
                B.fmt(res.get("tiny_jobs_per_s")), res.get("seconds", 0),
                "; workers started by: %s" % res["started_by"] if "started_by" in res else "",
                ", ERRORS: %d" % len(res["errors"]) if res["errors"] else ""), flush=True)
    for mode in MODES:
        if sel("replace-" + mode):
            print("== replace-%s: SIGKILL an idle worker, %d times" % (mode, KILLS), flush=True)
            res = measure_replace(mode, logdir, workdir)
            out["replace"].append(res)
            print("   %d replacements in %.0f s: ready in p50 %s (server's figure, ms), "
                  "%s ms kill to ready line; workers started by: %s%s" % (
                      len(res["ready"]), res.get("seconds", 0),
                      B.fmt(statistics.median(res["ms"]) if res["ms"] else None, "%.1f",
                            none="unavailable"),
                      B.fmt(statistics.median(res["seen_ms"]) if res["seen_ms"] else None,
                            "%.1f"),
                      res.get("started_by", "n/a"),
                      ", ERRORS: %d" % len(res["errors"]) if res["errors"] else ""),
                  flush=True)
    for mode in MODES:
        if sel("memory-" + mode):
            print("== memory-%s: %d workers that ran a numpy job" % (mode, MEMORY_WORKERS),
                  flush=True)
            res = measure_memory(mode, logdir, workdir)
            out["memory"].append(res)
            print("   total PSS %s MiB (workers %s, others %s)%s" % (
                B.fmt(B.mib(res.get("total_kib")), "%.1f"),
                B.fmt(B.mib(sum(res.get("worker_pss_kib") or [0])), "%.1f"),
                B.fmt(B.mib(sum(res.get("other_pss_kib") or [0])), "%.1f"),
                ", ERRORS: %d" % len(res["errors"]) if res["errors"] else ""), flush=True)
    return out


def failed(out):
    return any(r["errors"] or r.get("tiny_wrong") for part in out.values() for r in part)


# --------------------------------------------------------------- reporting

def render(out):
    """The section of bench/results.md; empty if nothing was measured."""
    if not any(out.values()):
        return []
    by = {r["key"]: r for part in out.values() for r in part}
    g = lambda k, f: by.get(k, {}).get(f)  # noqa: E731
    L = ["## Fresh workers: -r, replacement time, worker memory", ""]
    L.append("How fast our server gets a new worker: `--worker-start fork` forks it from "
             "a fork-server that has the worker module imported, `spawn` starts a fresh "
             "`python -u -m MODULE`. The column \"workers started by\" counts our "
             "server's debug-level ready lines by the start mode they name (\"not in the "
             "log\": the build logs no mode, and the ready-in figure is unavailable).")
    L.append("")
    if out["r"]:
        L.append("### Tiny jobs with -r (a fresh worker after every job), %d workers"
                 % B.WORKERS)
        L.append("")
        L.append("| configuration | client | tiny jobs | tiny jobs/s "
                 "| server CPU ms / 1000 jobs | workers started by | ready in, p50 ms |")
        L.append("|---|---|---:|---:|---:|---|---:|")
        for r in out["r"]:
            if "tiny_jobs_per_s" not in r:
                L.append("| %s | | failed | | | | |" % r["key"])
                continue
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                r["key"], r["client_version"],
                *B.tiny_cells(r),
                B.fmt(r.get("cpu_ms_per_1000"), "%.0f"),
                r.get("started_by", "n/a"),
                B.fmt(r.get("ready_ms_p50"), "%.1f")))
        L.append("")
        L.append("Configurations: " + "; ".join("`%s` = %s" % (r["key"], r["label"])
                                                for r in out["r"]) + ".")
        L.append("")
        L.append("- Method: one server at a time, started for its row and stopped after; "
                 "tiny jobs (a function returning its int argument) submitted all at once, "
                 "then collected in order and checked (%d-job warm-up, %d-job calibration; "
                 "under %d jobs/s %d jobs once, else %d jobs, median of %d runs, range in "
                 "brackets). Our "
                 "server runs with -d for its ready lines (two short log lines per job), "
                 "the Python servers without. Ready in: the server's own figure, from the "
                 "previous worker's end to the new one's handshake, median over the row's "
                 "worker starts." % (R_WARMUP, R_CALIBRATE, R_SLOW_BELOW, R_TINY_SLOW,
                                     R_TINY_FAST, R_TINY_REPS_FAST))
        for a, b in (("ours-ppft-r-fork", "ppft-py-r"), ("ours-ppft-r-spawn", "ppft-py-r"),
                     ("ours-pp170-r-fork", "pp170-py-r"),
                     ("ours-pp170-r-spawn", "pp170-py-r"),
                     ("ours-ppft-r-fork", "ours-ppft-r-spawn"),
                     ("ours-pp170-r-fork", "ours-pp170-r-spawn")):
            x = B.ratio(g(a, "tiny_jobs_per_s"), g(b, "tiny_jobs_per_s"))
            if x is not None:
                L.append("- `%s` vs `%s`: %.2fx the tiny jobs/s." % (a, b, x))
        L.append("")
    if out["replace"]:
        L.append("### Replacement time")
        L.append("")
        L.append("| mode | replacements | workers started by | ready in, p50 ms "
                 "| ready in, p99 ms | kill to ready line seen, p50 / p99 ms |")
        L.append("|---|---:|---|---:|---:|---:|")
        for r in out["replace"]:
            ms, seen = r["ms"], r["seen_ms"]
            L.append("| %s | %d | %s | %s | %s | %s |" % (
                r["mode"], len(r["ready"]), r.get("started_by", "n/a"),
                B.fmt(statistics.median(ms) if ms else None, "%.1f",
                      none="unavailable"),
                B.fmt(B.percentile(ms, 99) if ms else None, "%.1f", none="unavailable"),
                "%.1f / %.1f" % (statistics.median(seen), B.percentile(seen, 99))
                if seen else "n/a"))
        L.append("")
        L.append("- Method: our server with `-d -w %d --worker-start MODE`, ppft workers, "
                 "no client: up to %d times (bounded at %d s), %.0f ms after a worker "
                 "became ready, SIGKILL it (its pid alone; the two slots take turns) and "
                 "wait for its slot's next ready line. Ready in: the server's own figure "
                 "from that line, from the dead worker's end seen to the new worker's "
                 "handshake done; percentiles by nearest rank. Kill to ready line seen: "
                 "the same from this script's side, from the kill to reading the line "
                 "(polled every %.0f ms)." % (REPLACE_WORKERS, KILLS, REPLACE_DEADLINE,
                                              IDLE_GAP * 1000, POLL * 1000))
        L.append("")
    if out["memory"]:
        L.append("### Worker memory with numpy, %d workers" % MEMORY_WORKERS)
        L.append("")
        L.append("| mode | flags | workers started by | PSS per worker MiB | workers MiB "
                 "| other processes of the server MiB | total MiB | server MiB |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|")
        for r in out["memory"]:
            if "total_kib" not in r:
                L.append("| %s | `%s` | failed | | | | | |" % (r["mode"], r["flags"]))
                continue
            w, o = r["worker_pss_kib"], r["other_pss_kib"]
            L.append("| %s | `%s` | %s | %.1f-%.1f | %.1f | %s | %.1f | %s |" % (
                r["mode"], r["flags"], r["started_by"], B.mib(min(w)), B.mib(max(w)),
                B.mib(sum(w)),
                "%.1f (%d: %s)" % (B.mib(sum(o)), len(o), "; ".join(
                    "`%s`" % c for c in r["others"])) if o else "0 (none)",
                B.mib(r["total_kib"]), B.fmt(B.mib(r.get("server_pss_kib")), "%.1f")))
        x = B.ratio(g("memory-fork", "total_kib"), g("memory-spawn", "total_kib"))
        L.append("")
        L.append("- Method: our server with the flags shown, ppft workers; once all %d "
                 "workers are ready, a ppft client submits %d jobs at once that each "
                 "compute `numpy.arange(10**5).sum()` and sleep %.1f s, so that every "
                 "worker runs one (checked: %d different worker pids, the ones of the "
                 "ready lines); %.0f s after the client left, `Pss:` of "
                 "/proc/PID/smaps_rollup of each worker and of the server's other "
                 "descendants (the fork-server), summed into the total; the server's own "
                 "PSS is beside it, not in the total."
                 % (MEMORY_WORKERS, MEMORY_WORKERS, NUMPY_SLEEP, MEMORY_WORKERS, SETTLE))
        if x is not None:
            L.append("- fork total / spawn total: %.2fx." % x)
        L.append("")
    rows = []

    def check(desc, key, value, op, threshold, unit):
        """A target met by the `key` measurement; judged only where all its
        workers were started by fork, as the target is about fork."""
        started = g(key, "started_by") or "n/a"
        shown = "unavailable" if value is None else unit % value
        if not re.fullmatch(r"fork \d+", started):
            rows.append((desc, shown, "n/a: workers started by: %s" % started))
            return
        if value is None:
            rows.append((desc, shown, "n/a"))
            return
        ok = {">=": value >= threshold, "<=": value <= threshold,
              "<": value < threshold}[op]
        rows.append((desc, unit % value, "PASS" if ok else "FAIL"))

    if out["r"]:
        check("-r tiny jobs/s, fork >= 10x ppft's Python ppserver with -r", "ours-ppft-r-fork",
              B.ratio(g("ours-ppft-r-fork", "tiny_jobs_per_s"),
                      g("ppft-py-r", "tiny_jobs_per_s")), ">=", 10, "%.2fx")
    if out["replace"]:
        ms = g("replace-fork", "ms")
        check("replacement with fork: ready in, median < 10 ms", "replace-fork",
              statistics.median(ms) if ms else None, "<", 10, "%.1f ms")
    if out["memory"]:
        check("worker memory with numpy: fork total <= 0.6x spawn total", "memory-fork",
              B.ratio(g("memory-fork", "total_kib"), g("memory-spawn", "total_kib")),
              "<=", 0.6, "%.2fx")
    if rows:
        L.append("### Targets for fresh workers (informational, not a test)")
        L.append("")
        L.append("Judged only where every worker of the measurement was started by fork.")
        L.append("")
        L.append("| target | measured | |")
        L.append("|---|---:|---|")
        for desc, value, verdict in rows:
            L.append("| %s | %s | %s |" % (desc, value, verdict))
        L.append("")
    notes = []
    for r in by.values():
        for e in r["errors"]:
            notes.append("- %s: error: %s" % (r["key"], e.replace("\n", " / ")[:600]))
        if r.get("tiny_wrong"):
            notes.append("- %s: %d wrong answers" % (r["key"], r["tiny_wrong"]))
        if r.get("leftovers"):
            notes.append("- %s: on SIGTERM: %s" % (r["key"], "; ".join(r["leftovers"])))
    if notes:
        L.append("### Notes on fresh workers")
        L.append("")
        L += notes
        L.append("")
    return L
