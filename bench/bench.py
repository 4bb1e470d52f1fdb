"""Benchmark of ppserver (Rust) against the Python pp/ppft network servers.

Run through scripts/bench, which creates the venvs and builds the release
binary first; this file runs with bench/.venv-ppft's python. It starts each
server under test, drives it with real, unmodified clients (bench/client.py
run in the matching venv), and writes bench/results.md and bench/chart.png.

Configurations (2 workers everywhere):
  ours-ppft    ppft 1.7.8 client -> target/release/ppserver, ppft workers
  ppft-py      ppft 1.7.8 client -> python -m ppft.server
  local        ppft 1.7.8 client alone, pp.Server(ncpus=2): no server at all
  pp170-py     pp 1.7.0 client   -> python -m pp.cli (pp 1.7.0's ppserver)
  ours-pp170   pp 1.7.0 client   -> target/release/ppserver, pp._worker workers
  local-pp170  pp 1.7.0 client alone, pp.Server(ncpus=2): no server at all
and then bench/churn.py's (fresh workers: tiny jobs under -r with ours, by
fork and by spawn, and with both Python ppservers; the time our server takes
to replace a killed worker; the memory of 4 workers that use numpy, by fork
with --preload numpy and by spawn), each with a server of its own that runs
alone, started for it and stopped after.

Every server of configs() is started once and kept for the whole run of
configs() (and stopped before bench/churn.py's part). Tiny jobs and the
concurrent clients are measured one configuration after the other; bulk
runs alternate between the configurations, round after round, so that
whatever else loads the machine at some moment falls on all of them alike,
and each configuration's figure is the median of its rounds.

Everything that can block has a deadline, every process started here is
started in its own process group and killed on the way out (normal end,
exception, Ctrl-C, SIGTERM or the global alarm), so a run cannot hang or
leave servers and workers behind. What this shares with bench/churn.py and
the other scripts (processes, servers, clients, /proc) is bench/benchlib.py.

Beside results.md, a run writes the figures it was rendered from to
results.json, and a full run (no --only, into bench/) rewrites the
paragraph between README.md's `<!-- bench:begin -->` and
`<!-- bench:end -->` lines with its headline figures. `--readme` does only
the latter, from bench/results.json, without running anything.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import churn  # bench/churn.py: -r rows, replacement time, memory
from benchlib import (BENCH, BINARY, CLIENT_TIMEOUT, HOST, PY_PP, PY_PPFT, REPO, SECRET,
                      WARMUP_JOBS, WORKERS, BenchError, Client, Config, arm, cleanup_all,
                      client_cfg, descendants, fmt, load_average, machine_info, mib,
                      proc_status, ratio, start_server, tiny_cells, wait_all)

# Job counts. "Slow" means the calibration run (100 jobs) did fewer than
# SLOW_BELOW jobs/s: the Python ppservers (~45 and ~90 jobs/s here), whose
# 2000-job run would eat most of the time budget.
TINY_FAST, TINY_SLOW, SLOW_BELOW = 2000, 200, 250
TINY_REPS_FAST, TINY_REPS_SLOW = 3, 1  # median of 3 where it is cheap
# Bulk: BULK_ROUNDS rounds, each one client run per configuration in turn;
# the median of the rounds. Noisy on a shared 2-core machine, hence 5.
BULK_JOBS, BULK_MB, BULK_ROUNDS = 16, 16, 5
SCALE_CLIENTS = (1, 4, 16)
SCALE_N_FAST, SCALE_N_SLOW = 1000, 50  # tiny jobs per client

# Deadlines (seconds). The whole run takes ~4 minutes on 2 cores (~1.5 for
# configs(), the rest bench/churn.py's); the global alarm is the last
# resort if something misbehaves anyway.
GLOBAL_DEADLINE = 14 * 60
SCALE_READY_TIMEOUT = 60  # all N clients connected and warmed up
SCALE_RUN_TIMEOUT = 60
SETTLE = 1.0  # let a server go idle before reading its RSS


def run_single(python, server, ncpus, logdir, cwd, name):
    """Tiny jobs (count chosen by calibration), in one client."""
    cfg = client_cfg(server, ncpus, phases=[
        {"name": "tiny_auto", "n_fast": TINY_FAST, "n_slow": TINY_SLOW,
         "slow_below": SLOW_BELOW, "reps": TINY_REPS_FAST, "reps_slow": TINY_REPS_SLOW},
    ])
    client = Client(python, cfg, logdir / ("client-%s.log" % name), cwd)
    try:
        return wait_all([client], "result", CLIENT_TIMEOUT)[0]
    finally:
        client.close()


def run_bulk(python, server, ncpus, logdir, cwd, name, round_no):
    """One timed bulk run (after an untimed bulk job), in a fresh client."""
    cfg = client_cfg(server, ncpus, phases=[
        {"name": "bulk", "jobs": BULK_JOBS, "mb": BULK_MB, "reps": 1},
    ])
    client = Client(python, cfg, logdir / ("bulk-%s-%d.log" % (name, round_no)), cwd)
    try:
        return wait_all([client], "result", CLIENT_TIMEOUT)[0]["bulk"][0]
    finally:
        client.close()


def run_scale(python, server, ncpus, nclients, per_client, logdir, cwd, name):
    """nclients client processes, each with its own pp.Server, released
    together at a barrier once all are connected and warmed up."""
    cfg = client_cfg(server, ncpus, barrier=True,
                     phases=[{"name": "tiny", "n": per_client, "reps": 1}])
    clients = []
    try:
        for i in range(nclients):
            clients.append(Client(python, cfg, logdir / ("scale-%s-%d-%d.log"
                                                         % (name, nclients, i)), cwd))
        wait_all(clients, "ready", SCALE_READY_TIMEOUT)
        for c in clients:
            c.go()
        results = wait_all(clients, "result", SCALE_RUN_TIMEOUT)
    finally:
        for c in clients:
            c.close()
    runs = [r["tiny"][0] for r in results]
    total = sum(r["n"] for r in runs)
    # Wall time from the first client's start to the last one's end
    # (CLOCK_MONOTONIC is system-wide, so the clients' clocks agree).
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"clients": nclients, "jobs": total, "seconds": wall,
            "jobs_per_s": total / wall,
            "lost": sum(r["wrong"] for r in runs)}


# --------------------------------------------------------------- the bench

def configs():
    common = ["-i", HOST, "-p", "{port}", "-s", SECRET, "-w", str(WORKERS)]
    return [
        Config("ours-ppft", "ppserver (Rust), ppft 1.7.8 client", PY_PPFT,
               [BINARY] + common + ["--python", PY_PPFT, "--worker-module", "ppft"]),
        Config("ppft-py", "ppft 1.7.8 Python ppserver", PY_PPFT,
               [PY_PPFT, "-m", "ppft.server"] + common),
        Config("local", "no server: ppft 1.7.8 ncpus=2", PY_PPFT, None),
        Config("pp170-py", "pp 1.7.0 Python ppserver", PY_PP,
               [PY_PP, "-m", "pp.cli"] + common),
        Config("ours-pp170", "ppserver (Rust), pp 1.7.0 client", PY_PP,
               [BINARY] + common + ["--python", PY_PP, "--worker-module", "pp._worker"]),
        Config("local-pp170", "no server: pp 1.7.0 ncpus=2", PY_PP, None),
    ]


def start_servers(cfgs, logdir, workdir):
    """Starts the server of every configuration that has one; returns
    {key: Server}, and records startup errors and idle RSS in results."""
    servers, results = {}, {}
    for cfg in cfgs:
        res = results[cfg.key] = {"key": cfg.key, "label": cfg.label, "errors": []}
        if cfg.server_argv:
            try:
                servers[cfg.key] = start_server(cfg.key, cfg.server_argv, logdir, workdir)
            except BenchError as exc:
                res["errors"].append(str(exc))
    time.sleep(SETTLE)
    for key, server in servers.items():
        results[key]["rss_idle_kib"] = proc_status(server.proc.pid, "VmRSS")
    return servers, results


def measure(cfg, server, res, logdir, workdir):
    """Tiny jobs and concurrent clients for one configuration; errors are
    recorded, not raised, so that one broken configuration does not cost
    the others."""
    started = time.monotonic()
    try:
        single = run_single(cfg.client_python, server, cfg.ncpus, logdir, workdir, cfg.key)
        res["client_version"] = single["client_version"]
        tiny = single["tiny"]
        res["tiny_n"] = tiny[0]["n"]
        res["tiny_reps"] = len(tiny)
        rates = [r["n"] / r["seconds"] for r in tiny]
        res["tiny_rates"] = rates
        res["tiny_jobs_per_s"] = statistics.median(rates)
        res["tiny_wrong"] = sum(r["wrong"] for r in tiny)
        if server:
            # Summed over all repetitions: /proc counts in 10 ms ticks, so
            # one 2000-job run of a fast server is only ~10 ticks.
            cpu = sum(r["server_cpu_s"] for r in tiny)
            res["cpu_ms_per_1000"] = cpu / sum(r["n"] for r in tiny) * 1000 * 1000
        res["client_cpu_ms_per_1000"] = (sum(r["client_cpu_s"] for r in tiny)
                                         / sum(r["n"] for r in tiny) * 1000 * 1000)
        slow = res["tiny_jobs_per_s"] < SLOW_BELOW
        per_client = SCALE_N_SLOW if slow else SCALE_N_FAST
        res["scale"] = []
        for n in SCALE_CLIENTS:
            try:
                res["scale"].append(run_scale(cfg.client_python, server, cfg.ncpus, n,
                                              per_client, logdir, workdir, cfg.key))
            except BenchError as exc:
                res["errors"].append("%d clients: %s" % (n, exc))
                res["scale"].append({"clients": n, "jobs": n * per_client, "error": str(exc)})
    except BenchError as exc:
        res["errors"].append(str(exc))
    res["seconds"] = time.monotonic() - started


def measure_bulk(cfgs, servers, results, logdir, workdir):
    """BULK_ROUNDS rounds of one bulk run per configuration, in turn."""
    for cfg in cfgs:
        results[cfg.key].update(bulk_rates=[], bulk_wrong=0, bulk_server_cpu_s=[])
    for round_no in range(BULK_ROUNDS):
        line = []
        for cfg in cfgs:
            res = results[cfg.key]
            if cfg.server_argv and cfg.key not in servers:
                continue  # its server did not start
            server = servers.get(cfg.key)
            try:
                run = run_bulk(cfg.client_python, server, cfg.ncpus, logdir, workdir,
                               cfg.key, round_no)
            except BenchError as exc:
                res["errors"].append("bulk round %d: %s" % (round_no, exc))
                continue
            rate = run["jobs"] * run["mb"] / run["seconds"]
            res["bulk_rates"].append(rate)
            res["bulk_wrong"] += run["wrong"]
            if run.get("server_cpu_s") is not None:
                res["bulk_server_cpu_s"].append(run["server_cpu_s"])
            line.append("%s %.0f" % (cfg.key, rate))
        print("   bulk round %d: %s MB/s" % (round_no + 1, ", ".join(line)), flush=True)
    for cfg in cfgs:
        res = results[cfg.key]
        if res["bulk_rates"]:
            res["bulk_mb_per_s"] = statistics.median(res["bulk_rates"])
        if res["bulk_server_cpu_s"]:
            # Per 16 MB job: the relay's own cost, whatever the throughput.
            res["bulk_cpu_ms_per_job"] = (statistics.median(res["bulk_server_cpu_s"])
                                          / BULK_JOBS * 1000)


def finish_servers(servers, results):
    """RSS after all runs and the peak, then stops every server."""
    time.sleep(SETTLE)
    for key, server in servers.items():
        res = results[key]
        try:
            res["rss_after_kib"] = proc_status(server.proc.pid, "VmRSS")
            res["rss_peak_kib"] = proc_status(server.proc.pid, "VmHWM")
            res["workers"] = len(descendants(server.proc.pid))
        finally:
            server.stop()
            res["leftovers"] = server.leftovers


# --------------------------------------------------------------- reporting

def pickle_rates():
    """How fast this machine pickles and unpickles the bulk argument with
    each client's default protocol. The ppft client pickles with protocol 2,
    which turns bytes into a latin-1 str (1.5x bigger for random data and
    ~10x slower than protocol 4), so it bounds the bulk figures of every
    ppft configuration alike: useful context for reading them."""
    import pickle
    payload = os.urandom(BULK_MB * 1024 * 1024)
    out = {}
    for proto in (2, 4):
        t0 = time.perf_counter()
        data = pickle.dumps((payload,), proto)
        t1 = time.perf_counter()
        pickle.loads(data)
        t2 = time.perf_counter()
        out[proto] = {"wire_mb": len(data) / 2**20, "dumps": BULK_MB / (t1 - t0),
                      "loads": BULK_MB / (t2 - t1)}
    return out


def targets(by):
    """(description, measured text, pass/fail/n/a) per target."""
    g = lambda k, f: by.get(k, {}).get(f)  # noqa: E731
    rows = []

    def check(desc, value, threshold, higher_is_better=True, unit="x"):
        if value is None:
            rows.append((desc, "n/a", "n/a"))
            return
        ok = value >= threshold if higher_is_better else value <= threshold
        shown = ("%.2f%s" % (value, unit)) if unit == "x" else ("%.1f%s" % (value, unit))
        rows.append((desc, shown, "PASS" if ok else "FAIL"))

    check("tiny jobs/s >= 35x ppft's Python ppserver",
          ratio(g("ours-ppft", "tiny_jobs_per_s"), g("ppft-py", "tiny_jobs_per_s")), 35)
    check("tiny jobs/s >= 15x pp 1.7.0's Python ppserver",
          ratio(g("ours-pp170", "tiny_jobs_per_s"), g("pp170-py", "tiny_jobs_per_s")), 15)
    check("tiny jobs/s >= 1.0x no server",
          ratio(g("ours-ppft", "tiny_jobs_per_s"), g("local", "tiny_jobs_per_s")), 1.0)
    cpu = ratio(g("ours-ppft", "cpu_ms_per_1000"), g("ppft-py", "cpu_ms_per_1000"))
    check("server CPU per job <= 5% of ppft's Python ppserver's",
          None if cpu is None else cpu * 100, 5, higher_is_better=False, unit="%")
    check("bulk MB/s >= 1.5x ppft's Python ppserver",
          ratio(g("ours-ppft", "bulk_mb_per_s"), g("ppft-py", "bulk_mb_per_s")), 1.5)
    check("bulk MB/s >= 0.9x no server (ppft 1.7.8 client)",
          ratio(g("ours-ppft", "bulk_mb_per_s"), g("local", "bulk_mb_per_s")), 0.9)
    check("bulk MB/s >= 1.2x pp 1.7.0's Python ppserver (pp 1.7.0 client)",
          ratio(g("ours-pp170", "bulk_mb_per_s"), g("pp170-py", "bulk_mb_per_s")), 1.2)
    for key in ("ours-ppft", "ours-pp170"):
        check("our server's RSS after the runs <= 10 MiB (%s)" % key,
              mib(g(key, "rss_after_kib")), 10, higher_is_better=False, unit=" MiB")
    for key in ("ours-ppft", "ours-pp170"):
        scale = {s["clients"]: s for s in (g(key, "scale") or [])}
        one, many = scale.get(1, {}), scale.get(16, {})
        if key not in by:
            rows.append(("16 clients >= 1 client's jobs/s, nothing lost (%s)" % key,
                         "n/a", "n/a"))
            continue
        if "jobs_per_s" not in one or "jobs_per_s" not in many:
            rows.append(("16 clients >= 1 client's jobs/s, nothing lost (%s)" % key,
                         "failed", "FAIL"))
            continue
        r = many["jobs_per_s"] / one["jobs_per_s"]
        lost = one["lost"] + many["lost"]
        rows.append(("16 clients >= 1 client's jobs/s, nothing lost (%s)" % key,
                     "%.2fx, %d lost" % (r, lost),
                     "PASS" if r >= 1.0 and lost == 0 else "FAIL"))
    return rows


def render(results, machine, pickles, total_s, fresh):
    L = []
    L.append("# ppserver benchmark")
    L.append("")
    L.append("Written by `scripts/bench` (one run on one machine; numbers from a "
             "shared 2-core VM move by ~10-20%% between runs). "
             "Every configuration uses %d workers (the worker-memory test: %d) and "
             "real, unmodified clients; figures are from the client's side."
             % (WORKERS, churn.MEMORY_WORKERS))
    L.append("")
    L.append("## Machine")
    L.append("")
    for k in ("cpu", "cores", "kernel", "python", "rustc", "commit", "date"):
        L.append("- %s: %s" % (k, machine[k]))
    L.append("- 1-minute load average: %s before the run, %s after it (other work on "
             "the machine lowers every figure)" % (fmt(machine.get("load_before"), "%.2f"),
                                                   fmt(machine["load"], "%.2f")))
    L.append("- total benchmark time: %.0f s" % total_s)
    L.append("")
    L.append("Other benchmarks, each with its own script and page: sharing a server "
             "between users, the cost of a login with 1000 users and two users at once "
             "under `--isolate user` ([users.md](users.md), `scripts/bench-users`); the "
             "longest pause a client sees over reloads ([reload.md](reload.md), "
             "`scripts/bench-reload`); latency while workers churn "
             "([latency.md](latency.md), `scripts/bench-latency`).")
    L.append("")
    if results:
        L += render_main(results, pickles)
    L += churn.render(fresh)
    if results:
        profile = BENCH / "profile.md"
        if profile.exists():
            # Written by hand from bench/profile.py runs; kept across reruns.
            L.append(profile.read_text().rstrip())
            L.append("")
    return "\n".join(L)


def render_main(results, pickles):
    """The sections on the configurations of configs(), as lines."""
    by = {r["key"]: r for r in results}
    L = []
    L.append("## Results")
    L.append("")
    L.append("| configuration | client | tiny jobs | tiny jobs/s | server CPU ms / 1000 jobs "
             "| client CPU ms / 1000 jobs | bulk MB/s | RSS idle MiB | RSS after MiB "
             "| peak RSS MiB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "tiny_jobs_per_s" not in r:
            L.append("| %s | | failed | | | | | | | |" % r["key"])
            continue
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["key"], r["client_version"],
            *tiny_cells(r),
            fmt(r.get("cpu_ms_per_1000"), "%.1f"),
            fmt(r.get("client_cpu_ms_per_1000"), "%.0f"),
            fmt(r.get("bulk_mb_per_s"), "%.1f") + (" (%.1f-%.1f)" % (min(r["bulk_rates"]),
                                                                     max(r["bulk_rates"]))
                                                   if len(r.get("bulk_rates", [])) > 1
                                                   else ""),
            fmt(mib(r.get("rss_idle_kib")), "%.1f"),
            fmt(mib(r.get("rss_after_kib")), "%.1f"),
            fmt(mib(r.get("rss_peak_kib")), "%.1f")))
    L.append("")
    L.append("Configurations: " + "; ".join("`%s` = %s" % (r["key"], r["label"])
                                            for r in results) + ".")
    L.append("")
    L.append("- tiny: a function returning its int argument; all jobs submitted, then "
             "all results collected in order and checked. Job count chosen by a "
             "100-job calibration run (< %d jobs/s: %d jobs, once; else %d jobs, "
             "median of %d runs, range in brackets), after a %d-job warm-up."
             % (SLOW_BELOW, TINY_SLOW, TINY_FAST, TINY_REPS_FAST, WARMUP_JOBS))
    L.append("- server CPU: utime+stime of the server process alone (not its workers) "
             "from /proc/PID/stat, over all tiny runs (10 ms ticks). n/a: no server process. "
             "Client CPU: the same for the client process (not its local workers); "
             "the machine has 2 cores for client, server and workers together.")
    L.append("- bulk: %d jobs, each with a %d MB random `bytes` argument, returning its "
             "length; MB/s of argument data (after one untimed job), median of %d rounds "
             "in which the configurations take turns (one fresh client each), range in "
             "brackets." % (BULK_JOBS, BULK_MB, BULK_ROUNDS))
    L.append("- RSS: VmRSS of the server process after startup (+%.0f s) and after all "
             "runs; peak is VmHWM (reached during the bulk runs)." % SETTLE)
    L.append("")
    L.append("### Scaling: concurrent clients")
    L.append("")
    L.append("Separate client processes, each with its own pp.Server, released together "
             "once all are connected; total jobs/s from the first start to the last end. "
             "Each client submits %d tiny jobs (%d for servers under %d jobs/s). "
             "`lost` counts jobs not answered correctly." % (SCALE_N_FAST, SCALE_N_SLOW,
                                                             SLOW_BELOW))
    L.append("")
    L.append("| configuration | " + " | ".join("%d client%s" % (n, "s" if n > 1 else "")
                                               for n in SCALE_CLIENTS) + " | lost |")
    L.append("|---|" + "---:|" * len(SCALE_CLIENTS) + "---:|")
    for r in results:
        cells, lost = [], 0
        for s in r.get("scale", []):
            if "jobs_per_s" in s:
                cells.append("%s (%d jobs)" % (fmt(s["jobs_per_s"]), s["jobs"]))
                lost += s["lost"]
            else:
                cells.append("failed")
        cells += ["n/a"] * (len(SCALE_CLIENTS) - len(cells))
        L.append("| %s | %s | %d |" % (r["key"], " | ".join(cells), lost))
    L.append("")
    L.append("### Bulk, per client family")
    L.append("")
    L.append("The client's pickling bounds every configuration of a family alike, so "
             "the gap to no server is what the relay costs. Server CPU: utime+stime of "
             "the server process per %d MB job, median over the rounds (10 ms ticks)."
             % BULK_MB)
    L.append("")
    L.append("| client | this server MB/s | its Python ppserver MB/s | no server MB/s "
             "| vs Python ppserver | vs no server | server CPU ms / job: ours, Python |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    g = lambda k, f: by.get(k, {}).get(f)  # noqa: E731

    def rate(key):
        r = by.get(key, {})
        if "bulk_mb_per_s" not in r:
            return "n/a"
        rates = r["bulk_rates"]
        return "%.0f (%.0f-%.0f)" % (r["bulk_mb_per_s"], min(rates), max(rates))

    for client, ours, py, local in (("ppft 1.7.8", "ours-ppft", "ppft-py", "local"),
                                    ("pp 1.7.0", "ours-pp170", "pp170-py", "local-pp170")):
        L.append("| %s | %s | %s | %s | %s | %s | %s, %s |" % (
            client, rate(ours), rate(py), rate(local),
            fmt(ratio(g(ours, "bulk_mb_per_s"), g(py, "bulk_mb_per_s")), "%.2fx"),
            fmt(ratio(g(ours, "bulk_mb_per_s"), g(local, "bulk_mb_per_s")), "%.2fx"),
            fmt(g(ours, "bulk_cpu_ms_per_job"), "%.1f"),
            fmt(g(py, "bulk_cpu_ms_per_job"), "%.1f")))
    L.append("")
    L.append("## Headline ratios")
    L.append("")
    g = lambda k, f: by.get(k, {}).get(f)  # noqa: E731
    pairs = [("ours-ppft", "ppft-py", "ours vs ppft 1.7.8's Python ppserver"),
             ("ours-pp170", "pp170-py", "ours vs pp 1.7.0's Python ppserver"),
             ("ours-ppft", "local", "ours vs no server (ppft, ncpus=2)"),
             ("ours-pp170", "local-pp170", "ours vs no server (pp 1.7.0, ncpus=2)")]
    L.append("| comparison | tiny jobs/s | server CPU per job | bulk MB/s |")
    L.append("|---|---:|---:|---:|")
    for a, b, desc in pairs:
        L.append("| %s | %s | %s | %s |" % (
            desc,
            fmt(ratio(g(a, "tiny_jobs_per_s"), g(b, "tiny_jobs_per_s")), "%.2fx"),
            fmt(ratio(g(a, "cpu_ms_per_1000"), g(b, "cpu_ms_per_1000")), "%.3fx"),
            fmt(ratio(g(a, "bulk_mb_per_s"), g(b, "bulk_mb_per_s")), "%.2fx")))
    L.append("")
    L.append("## Targets (informational, not a test)")
    L.append("")
    L.append("| target | measured | |")
    L.append("|---|---:|---|")
    for desc, value, verdict in targets(by):
        L.append("| %s | %s | %s |" % (desc, value, verdict))
    L.append("")
    L.append("## Notes")
    L.append("")
    L.append("- Context for bulk: pickling the %d MB argument on this machine takes "
             "protocol 2 (ppft's client default): %.0f MB/s dumps, %.0f MB/s loads, "
             "%.1f MB on the wire; protocol 4 (pp 1.7.0's default): %.0f MB/s dumps, "
             "%.0f MB/s loads, %.1f MB. The ppft configurations' bulk figures are "
             "bounded by that pickling in the client and the workers, whatever the server."
             % (BULK_MB, pickles[2]["dumps"], pickles[2]["loads"], pickles[2]["wire_mb"],
                pickles[4]["dumps"], pickles[4]["loads"], pickles[4]["wire_mb"]))
    for r in results:
        idle, after = r.get("rss_idle_kib"), r.get("rss_after_kib")
        if r["key"].startswith("ours") and idle and after and after > idle + 5 * 1024:
            # Seen in some runs only (3 to 29 MiB after identical runs): the
            # server frees its bulk frames, but glibc keeps them in the heap
            # once its dynamic mmap threshold has grown past the frame size.
            L.append("- %s: RSS after the runs (%.1f MiB) is well above idle (%.1f MiB): "
                     "memory freed after the bulk run stayed in the server's heap. "
                     "It varies from run to run; in a test, MALLOC_MMAP_THRESHOLD_=131072 "
                     "in the server's environment (a fixed glibc mmap threshold) kept it "
                     "at ~3 MiB." % (r["key"], mib(after), mib(idle)))
        for e in r["errors"]:
            L.append("- %s: error: %s" % (r["key"], e.replace("\n", " / ")[:600]))
        for w in ("tiny_wrong", "bulk_wrong"):
            if r.get(w):
                L.append("- %s: %d wrong answers in %s" % (r["key"], r[w], w[:-6]))
        if r.get("leftovers"):
            L.append("- %s: on SIGTERM: %s" % (r["key"], "; ".join(r["leftovers"])))
    L.append("")
    return L


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")  # no display here; write the PNG directly
    import matplotlib.pyplot as plt

    ok = [r for r in results if "tiny_jobs_per_s" in r]
    keys = [r["key"] for r in ok]
    ours = ["#d95f02" if k.startswith("ours") else "#7570b3" for k in keys]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))

    def bars(ax, values, title, log, spread=None):
        drawn = ax.bar(keys, [v or 0 for v in values], color=ours, yerr=spread,
                       capsize=3 if spread else 0)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        tops = [(v or 0) + up for v, up in zip(values, spread[1])] if spread else values
        for rect, v, top in zip(drawn, values, tops):
            if v:
                # Above the whisker, where there is one.
                ax.annotate("%.0f" % v, (rect.get_x() + rect.get_width() / 2, top),
                            ha="center", va="bottom", fontsize=8)

    bars(axes[0], [r["tiny_jobs_per_s"] for r in ok], "tiny jobs/s (log scale)", True)
    bulk = [r.get("bulk_mb_per_s") for r in ok]
    # Whiskers: the range over the alternating rounds.
    spread = [[(m - min(r["bulk_rates"])) if m else 0 for m, r in zip(bulk, ok)],
              [(max(r["bulk_rates"]) - m) if m else 0 for m, r in zip(bulk, ok)]]
    bars(axes[1], bulk, "bulk MB/s (%d x %d MB arguments; median, range of %d rounds)"
         % (BULK_JOBS, BULK_MB, BULK_ROUNDS), False, spread)
    ax = axes[2]
    width = 0.8 / len(SCALE_CLIENTS)
    for i, n in enumerate(SCALE_CLIENTS):
        vals = []
        for r in ok:
            s = next((s for s in r.get("scale", []) if s["clients"] == n), {})
            vals.append(s.get("jobs_per_s", 0))
        ax.bar([x + (i - 1) * width for x in range(len(ok))], vals, width,
               label="%d client%s" % (n, "s" if n > 1 else ""))
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(keys, rotation=30)
    ax.set_yscale("log")
    top = max([s.get("jobs_per_s", 0) for r in ok for s in r.get("scale", [])] or [1])
    ax.set_ylim(top=top * 5)  # headroom so the legend does not cover bars
    ax.set_title("concurrent clients: total jobs/s (log scale)")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.suptitle("ppserver benchmark (%d workers; orange: our Rust server)" % WORKERS)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------ README.md

README = REPO / "README.md"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def readme_paragraph(data):
    """README.md's headline on speed, from a run's figures (what
    results.json holds): the ppft 1.7.8 client's tiny jobs/s and bulk MB/s
    against ppft's Python ppserver and no server, and -r by fork. A figure
    the run did not get reads n/a."""
    m = data["machine"]
    by = {r["key"]: r for r in data.get("results") or []}
    by.update((r["key"], r) for r in (data.get("fresh") or {}).get("r", []))
    g = lambda k, f: by.get(k, {}).get(f)  # noqa: E731
    version = next((g(k, "client_version") for k in ("ours-ppft", "ppft-py", "local")
                    if g(k, "client_version")), None)
    tiny = ratio(g("ours-ppft", "tiny_jobs_per_s"), g("ppft-py", "tiny_jobs_per_s"))
    cores = "%d cores" % m["cpus"] if m.get("cpus") else m.get("cores", "cores unknown")
    text = ("Latest `scripts/bench` run (%s, %s, %s, commit %s): %s tiny jobs/s with the "
            "%s client against %s for ppft's Python ppserver%s and %s with no server; "
            "bulk %s MB/s against %s; `-r` by fork %s jobs/s against %s. Full tables: "
            "[bench/results.md](bench/results.md)." % (
                m.get("date", "unknown date").split()[0], m.get("cpu", "unknown CPU"), cores,
                # A commit with changes on top says so, without nested brackets.
                m.get("commit", "unknown").replace(" (with ", " with ").rstrip(")"),
                fmt(g("ours-ppft", "tiny_jobs_per_s")),
                "ppft " + version if version else "ppft",
                fmt(g("ppft-py", "tiny_jobs_per_s")),
                " (%.0fx)" % tiny if tiny is not None else "",
                fmt(g("local", "tiny_jobs_per_s")),
                fmt(g("ours-ppft", "bulk_mb_per_s")), fmt(g("ppft-py", "bulk_mb_per_s")),
                fmt(g("ours-ppft-r-fork", "tiny_jobs_per_s")),
                fmt(g("ppft-py-r", "tiny_jobs_per_s"))))
    # Markdown joins the lines; short ones keep README diffs readable.
    return textwrap.fill(text, width=78, break_long_words=False, break_on_hyphens=False)


def update_readme(path, paragraph):
    """Replaces what is between the README's marker lines with paragraph and
    leaves every other byte as it was. Without exactly one begin line
    followed by one end line, warns and changes nothing. Returns whether
    it wrote."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        print("warning: %s not rewritten: %s" % (path, exc), file=sys.stderr)
        return False
    lines = text.splitlines(keepends=True)
    marks = [line.strip() for line in lines]
    if (marks.count(README_BEGIN) != 1 or marks.count(README_END) != 1
            or marks.index(README_BEGIN) > marks.index(README_END)):
        print("warning: %s has no `%s` line followed by a `%s` line: left as it was"
              % (path, README_BEGIN, README_END), file=sys.stderr)
        return False
    begin, end = marks.index(README_BEGIN), marks.index(README_END)
    if not lines[begin].endswith("\n"):  # cannot happen with an end line after it
        lines[begin] += "\n"
    new = "".join(lines[:begin + 1]) + paragraph.rstrip("\n") + "\n" + "".join(lines[end:])
    # Written whole and renamed over: an interrupted write leaves the old one.
    tmp = path.with_name(path.name + ".bench-tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    print("wrote %s (between its bench markers)" % path)
    return True


def readme_only(results_path, readme_path):
    """--readme: the paragraph from a results.json of a full run; exit
    status 1 if README was not rewritten."""
    try:
        data = json.loads(Path(results_path).read_text())
    except (OSError, ValueError) as exc:
        sys.exit("cannot read %s: %s" % (results_path, exc))
    if data.get("only"):
        sys.exit("%s is from a run limited by --only %s: its figures are not the "
                 "README's; run scripts/bench without --only"
                 % (results_path, " --only ".join(data["only"])))
    if not update_readme(readme_path, readme_paragraph(data)):
        sys.exit(1)


# --------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    all_keys = [c.key for c in configs()] + churn.keys()
    parser.add_argument("--only", action="append", metavar="KEY", choices=all_keys,
                        help="run only this configuration (repeatable): "
                             + ", ".join(all_keys))
    parser.add_argument("--output", default=str(BENCH), metavar="DIR",
                        help="where results.md, results.json and chart.png go "
                             "(default bench/; README.md is rewritten only by a full "
                             "run into bench/)")
    parser.add_argument("--readme", action="store_true",
                        help="run nothing: rewrite README.md's paragraph between its bench "
                             "markers from the figures of bench/results.json")
    parser.add_argument("--results", default=str(BENCH / "results.json"), metavar="FILE",
                        help="with --readme: the results.json to read (default %(default)s)")
    parser.add_argument("--readme-file", default=str(README), metavar="FILE",
                        help="with --readme: the README to rewrite (default %(default)s)")
    args = parser.parse_args()
    if args.readme:
        if args.only:
            parser.error("--readme runs nothing: --only has no meaning with it")
        readme_only(args.results, args.readme_file)
        return

    for path in (BINARY, PY_PPFT, PY_PP):
        if not Path(path).exists():
            sys.exit("missing %s: run scripts/bench, which sets it up" % path)

    # Ctrl-C, SIGTERM, SIGHUP and the global deadline all unwind through
    # the finally below, which kills every process group started here.
    arm(GLOBAL_DEADLINE)

    load_before = load_average()
    logdir = Path(tempfile.mkdtemp(prefix="ppbench-"))
    # Servers and clients run in an empty directory: the Python ppservers
    # put their cwd on the workers' path, and nothing from the repo should
    # be importable by accident.
    workdir = logdir / "cwd"
    workdir.mkdir()
    started = time.monotonic()
    cfgs = [c for c in configs() if not args.only or c.key in args.only]
    servers, by_key = {}, {}
    results, pickles = [], None
    failed = False
    try:
        if cfgs:
            print("== starting %d servers" % sum(1 for c in cfgs if c.server_argv),
                  flush=True)
            servers, by_key = start_servers(cfgs, logdir, workdir)
            for cfg in cfgs:
                res = by_key[cfg.key]
                if cfg.server_argv and cfg.key not in servers:
                    print("== %s: server did not start" % cfg.key, flush=True)
                    continue
                print("== %s: %s" % (cfg.key, cfg.label), flush=True)
                measure(cfg, servers.get(cfg.key), res, logdir, workdir)
                print("   tiny %s jobs/s in %.0f s%s" % (
                    fmt(res.get("tiny_jobs_per_s")), res["seconds"],
                    ", ERRORS: %d" % len(res["errors"]) if res["errors"] else ""), flush=True)
            print("== bulk: %d rounds, configurations alternating" % BULK_ROUNDS, flush=True)
            measure_bulk(cfgs, servers, by_key, logdir, workdir)
            finish_servers(servers, by_key)
            results = [by_key[c.key] for c in cfgs]
            pickles = pickle_rates()
        # Fresh workers: each of its servers runs alone, after the above.
        fresh = churn.run(args.only, logdir, workdir)
        failed = any(r["errors"] for r in results) or churn.failed(fresh)
    except KeyboardInterrupt as exc:
        print("\ninterrupted (%s): stopping everything; logs in %s" % (exc or "Ctrl-C", logdir),
              file=sys.stderr)
        cleanup_all()
        sys.exit(130)
    finally:
        signal.alarm(0)
        cleanup_all()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["load_before"] = load_before
    # One dict for results.md, results.json and README's paragraph, so that
    # all three give this run's figures.
    data = {"only": args.only, "machine": machine, "total_s": time.monotonic() - started,
            "pickles": pickles, "results": results, "fresh": fresh}
    text = render(data["results"], data["machine"], data["pickles"], data["total_s"],
                  data["fresh"])
    (out / "results.md").write_text(text)
    # default=str: a value json cannot take must not cost the run's figures.
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print()
    print(text)
    if results:
        chart(results, out / "chart.png")
        print("wrote %s, %s and %s" % (out / "results.md", out / "results.json",
                                       out / "chart.png"))
    else:
        # The chart shows configs() alone; without them it is left as it was.
        print("wrote %s and %s" % (out / "results.md", out / "results.json"))
    if args.only or out.resolve() != BENCH.resolve():
        print("README.md left as it was: only a full run into bench/ rewrites it")
    else:
        update_readme(README, readme_paragraph(data))
    if failed:
        print("some measurements failed; logs kept in %s" % logdir, file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
