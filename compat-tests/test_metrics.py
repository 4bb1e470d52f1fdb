"""--metrics: Prometheus metrics at /metrics and a summary at /status.

- After a known run (200 jobs from a real client, one failed login, one
  oversize job) the counters say exactly that, the histograms hold 200
  samples, and `promtool check metrics` accepts the page.
- The pages answer while every worker is busy, and /status lists the
  running jobs.

No wall-clock thresholds: every wait is a generous upper bound.
"""

import shutil
import subprocess
import urllib.request

import pytest

import pphelpers
import ppwire
import serverprocs as sp
from procs import wait_for_children, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(reason="ppft's server has no metrics"),
]

def _started(launch, *flags, nworkers=2):
    port = pphelpers.free_port()
    server = launch("--metrics", "127.0.0.1:%d" % port, *flags, nworkers=nworkers)
    server.metrics_port = port
    return server


def square(x):
    return x * x


def test_counters_match_a_known_run(launch):
    server = _started(launch, "--memory-limit", "2M")
    js = pphelpers.connect_client(server)
    try:
        jobs = [js.submit(square, (i,)) for i in range(200)]
        assert [job() for job in jobs] == [i * i for i in range(200)]
    finally:
        pphelpers.close_client(js)
    assert sp.handshake_reply(server, "wrong secret") == b"FAILED"
    result, text = sp.raw_job(server, "add", sp.ADD_SOURCE, (b"z" * (4 << 20), b""))
    assert result is None and "--memory-limit" in text

    # Both workers are up: the 200 jobs may all have run on the first while
    # the second was still starting.
    got = {}

    def both_workers_up():
        got["type"], got["page"] = pphelpers.metrics_get(server.metrics_port, "/metrics")
        s = pphelpers.metric_samples(got["page"])
        return s[("ppserver_workers", '{state="idle"}')] + s[("ppserver_workers",
                                                            '{state="busy"}')] == 2

    assert wait_until(both_workers_up, timeout=60), got["page"]
    content_type, page = got["type"], got["page"]
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    s = pphelpers.metric_samples(page)
    # Every per-job series is by user; without --users, the one user is
    # "default".
    user = '{user="default"}'
    assert s[("ppserver_jobs_received_total", user)] == 201, page
    assert s[("ppserver_jobs_answered_total", user)] == 200, page
    assert s[("ppserver_job_run_seconds_count", user)] == 200, page
    assert s[("ppserver_job_queue_wait_seconds_count", user)] == 200, page
    assert s[("ppserver_jobs_server_answered_total",
              '{reason="oversize",user="default"}')] == 1, page
    assert s[("ppserver_jobs_server_answered_total",
              '{reason="worker_died",user="default"}')] == 0, page
    assert s[("ppserver_failed_logins_total", "")] == 1, page
    assert s[("ppserver_received_bytes_total", "")] > 4 << 20, page
    assert s[("ppserver_workers", '{state="idle"}')] + s[("ppserver_workers", '{state="busy"}')] == 2
    assert s[("ppserver_memory_limit_bytes", "")] == 2 << 20
    assert s[("ppserver_package_cache_entries", "")] >= 1

    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=page, text=True,
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    else:
        pytest.skip("promtool is not installed (scripts/test.sh installs it); counters checked")

    content_type, om = pphelpers.metrics_get(
        server.metrics_port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert om.rstrip().endswith("# EOF")


def test_pages_answer_while_every_worker_is_busy(launch, tmp_path):
    server = _started(launch)
    launch.workers.extend(wait_for_children(server, 2))
    first, pid1 = sp.start_marked_nap(server, tmp_path / "a", seconds=600)
    second, pid2 = sp.start_marked_nap(server, tmp_path / "b", seconds=600)
    try:
        _, page = pphelpers.metrics_get(server.metrics_port, "/metrics")
        s = pphelpers.metric_samples(page)
        assert s[("ppserver_jobs_running", "")] == 2, page
        assert s[("ppserver_workers", '{state="busy"}')] == 2, page
        assert s[("ppserver_connections", '{kind="exec"}')] == 2, page
        _, status = pphelpers.metrics_get(server.metrics_port, "/status")
        assert "running jobs (2)" in status, status
        assert "pid %d" % pid1 in status and "pid %d" % pid2 in status, status
        assert "127.0.0.1: 2 EXEC" in status, status
    finally:
        first.close()
        second.close()


def test_other_paths_and_methods_are_refused(launch):
    server = _started(launch, nworkers=1)
    with pytest.raises(urllib.error.HTTPError) as err:
        pphelpers.metrics_get(server.metrics_port, "/nothing")
    assert err.value.code == 404
    sock = ppwire.connect("127.0.0.1", server.metrics_port)
    try:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 405")
    finally:
        sock.close()
    # Still serving after both: a page asked for afterwards is answered.
    assert pphelpers.metrics_get(server.metrics_port, "/metrics")[1], "no page after a 405"
    assert server.proc.poll() is None, server.log_tail()
