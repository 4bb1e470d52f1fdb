"""Concurrency: several clients at once, and jobs running in parallel on all
of the server's workers.

No wall-clock thresholds: parallelism is proven by overlapping intervals
measured inside the jobs, on distinct worker processes.
"""

import json

import ppwire
from common_jobs import assert_all_workers_in_parallel
from pphelpers import finish_client_script, run_client_script

PPSERVER_WORKERS = 3


def test_jobs_run_in_parallel_on_all_workers(pp_client, ppserver):
    """N one-second jobs on a server with N workers run on N distinct worker
    processes and all overlap in time (max(start) < min(end))."""
    assert_all_workers_in_parallel(pp_client, ppserver.nworkers)


def test_two_clients_at_once(ppserver, tmp_path):
    """Two independent ppft client processes, connected at the same time and
    submitting together, both get all their results, correct and their own.
    (Their job functions live in __main__, so ppft ships them as source.)"""
    procs = [
        run_client_script("run_jobs.py", ppserver.id, ppserver.secret, tag, 40, tmp_path, 2)
        for tag in ("alpha", "beta")
    ]
    reports = []
    for proc in procs:
        code, out, err = finish_client_script(proc)
        assert code == 0, "client failed (%s)\nstdout:\n%s\nstderr:\n%s" % (code, out, err)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [(r["tag"], r["njobs"], r["bad"]) for r in reports] == [
        ("alpha", 40, []),
        ("beta", 40, []),
    ]
    all_pids = set(reports[0]["pids"]) | set(reports[1]["pids"])
    assert 1 <= len(all_pids) <= ppserver.nworkers, all_pids


NAP_SOURCE = "def nap(seconds):\n    import time\n    time.sleep(seconds)\n    return seconds\n"


def test_workers_freed_after_client_disconnects_mid_job(pp_client, ppserver):
    """Clients that vanish while their jobs run (one job per worker, socket
    closed right after sending) do not leak workers: afterwards all N workers
    still run N jobs in parallel."""
    sfunc = ppwire.function_package("nap", [NAP_SOURCE])
    for _ in range(ppserver.nworkers):
        sock = ppwire.open_session(ppserver.host, ppserver.port, ppserver.secret, "EXEC")
        ppwire.send_job(sock, sfunc, (0.5,))
        sock.close()
    assert_all_workers_in_parallel(pp_client, ppserver.nworkers)
