"""examples/slurm/ppserver.sbatch on a real Slurm: Debian's slurm-wlm and
munge, slurmctld and two slurmd nodes on this host (slurmcluster.py).

Three batch jobs run at once, each with one server per node (2 workers
each: --cpus-per-task=2) and a real pp client (clients/slurm_jobs.py)
that reads the servers' addresses from PPSERVERS:

- ``results``: 20 jobs; every answer is right, and both nodes ran jobs.
  The script stops the servers once the client is done.
- ``scancel``: 4 jobs, one per worker, each running until its worker gets
  SIGTERM; once all four run, ``scancel``. Slurm sends SIGTERM to every
  process of the job: the client (which goes on collecting), srun, the
  servers and their workers (which ignore it). Each job must be answered
  with its real result, by a worker that got the signal: the servers'
  drain.
- ``time limit``: as ``scancel``, but the job ends at its time limit.
  Waiting for a limit of a minute (Slurm's least) would make this test a
  minute long, so once the jobs run the limit is moved close with
  ``scontrol update EndTime``: slurmctld's time-limit check (every 30 s)
  ends the job, with state TIMEOUT and SIGTERM sent twice in a row.

After each job, no process of it is left (ppserver, worker, or the
``sleep`` every pp job starts): none has the job's SLURM_JOB_ID in its
environment. At the end the daemons stop, and nothing the cluster started
is left. No wall-clock thresholds: every wait is a generous bound.

Needs root and the commands of slurm-wlm and munge; skipped otherwise
(scripts/test.sh installs them as root with apt-get).
"""

import json
import os
import shutil
import sys
import tempfile
import time

import pytest

from pphelpers import FAMILY, HERE, IMPL, REPO, rust_binary
from procs import wait_until
from slurmcluster import KILL_WAIT, Cluster, missing_commands, wait_for_files

NODES = ("n1", "n2")
WORKERS = 2  # per server: the jobs' --cpus-per-task
SCRIPT = REPO / "examples" / "slurm" / "ppserver.sbatch"
CLIENT = HERE / "clients" / "slurm_jobs.py"
NJOBS = 20  # the results job's
HELD = len(NODES) * WORKERS  # one held job per worker: all of them run at once
# A job's end: the servers' drain and Slurm's KillWait, then room to spare.
JOB_END = KILL_WAIT + 90
SECRET = "slurm;test secret"

pytestmark = [
    pytest.mark.server_behaviour,
    # One cluster whose three batch jobs the tests share: all of them on
    # one xdist process, or another process's fixture starts a second
    # cluster and the first is stopped under jobs still running.
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(IMPL != "rust", reason="the script starts the Rust binary"),
    pytest.mark.skipif(FAMILY != "ppft-1.7.8", reason="runs once, with the ppft 1.7.8 family"),
    # Daemons, then three batch jobs at once, one of them ended by
    # slurmctld's time-limit check: each wait is bounded on its own.
    pytest.mark.timeout(400),
]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons run as root here")
    missing = missing_commands()
    if missing:
        pytest.skip("slurm-wlm and munge are not installed (missing %s; scripts/test.sh "
                    "installs them as root)" % ", ".join(missing))
    root = tempfile.mkdtemp(prefix="ppserver-slurm-", dir="/tmp")
    cluster = Cluster(root, NODES)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, "processes left after the cluster stopped:\n%s" % "\n".join(
        cluster.left_described)


class Job:
    """One batch job of ppserver.sbatch running clients/slurm_jobs.py."""

    def __init__(self, cluster, name, njobs, mode, *sbatch_options):
        self.cluster = cluster
        self.name = name
        root = cluster.root / name
        root.mkdir()
        self.marks = root / "marks"
        self.marks.mkdir()
        self.report = root / "report.json"
        self.output = root / "job.out"
        secret = root / "secret"
        secret.write_text(SECRET + "\n")
        env = dict(cluster.env, PPSERVER=str(rust_binary()), PPSERVER_PYTHON=sys.executable,
                   PPSERVER_SECRET_FILE=str(secret), PPSERVER_RUN_DIR=str(root / "run"))
        self.id = cluster.submit(
            "--job-name=%s" % name, "--nodes=%d" % len(NODES), "--ntasks-per-node=1",
            "--cpus-per-task=%d" % WORKERS, "--output=%s" % self.output, *sbatch_options,
            SCRIPT, sys.executable, CLIENT, self.report, njobs, mode, self.marks, env=env)

    def log(self):
        try:
            return self.output.read_text(errors="replace")
        except OSError as exc:
            return "<no job output: %s>" % exc

    def wait_running(self, count):
        """Wait (bounded) until `count` held jobs run on workers."""
        started = wait_for_files(self.marks, "started.*[0-9]", count, timeout=120)
        assert len(started) >= count, "%d of %d jobs started\n%s\n%s" % (
            len(started), count, self.log(), self.cluster.logs())

    def finish(self):
        """Wait for the batch job's end; its final state and the client's
        report. Then nothing of it may be left."""
        state = self.cluster.wait_finished(self.id, JOB_END)
        assert self.report.exists(), "the client wrote no report (job %s)\n%s" % (
            state, self.log())
        report = json.loads(self.report.read_text())
        assert wait_until(lambda: not self.cluster.marked_processes(self.id), timeout=30), (
            "processes of job %s left after it ended: %r"
            % (self.id, self.cluster.marked_processes(self.id)))
        return state, report

    def assert_servers_stopped_by_themselves(self):
        """Each server task logged its stop and none was killed."""
        log = self.log()
        lines = log.splitlines()
        for task in range(len(NODES)):
            assert any(line.startswith("%d: " % task) and "shutting down: stopping workers" in line
                       for line in lines), "server %d did not stop by itself\n%s" % (task, log)
        assert "Killed" not in log and "killed by signal" not in log, log


@pytest.fixture(scope="module")
def jobs(cluster):
    """The three batch jobs, submitted together. Once the time-limit job's
    pp jobs run, its end time is moved to two seconds ahead: the next
    time-limit check ends it, while the other tests go on."""
    submitted = {
        "results": Job(cluster, "results", NJOBS, "quick"),
        "scancel": Job(cluster, "scancel", HELD, "held"),
        "time limit": Job(cluster, "timelimit", HELD, "held", "--time=10"),
    }
    limited = submitted["time limit"]
    limited.wait_running(HELD)
    end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 2))
    cluster.run("scontrol", "update", "JobId=%d" % limited.id, "EndTime=%s" % end)
    return submitted


def _assert_results(report, held):
    results = report["results"]
    assert all(results), "jobs answered with None: %r" % results
    assert [r[:2] for r in results] == [[i, i * i] for i in range(len(results))], results
    assert {r[2] for r in results} == set(NODES), "not every node ran jobs: %r" % results
    if held:
        assert all(r[4] is True for r in results), (
            "jobs that ended before their worker got SIGTERM: %r" % results)


def test_the_servers_run_a_clients_jobs_across_all_nodes(jobs):
    job = jobs["results"]
    state, report = job.finish()
    assert state == "COMPLETED", (state, job.log())
    assert len(report["results"]) == NJOBS and not report["sigterm"], report
    _assert_results(report, held=False)
    assert "ppserver.sbatch: servers ready at" in job.log(), job.log()
    job.assert_servers_stopped_by_themselves()


def test_scancel_drains_the_running_jobs(jobs, cluster):
    job = jobs["scancel"]
    job.wait_running(HELD)
    cluster.run("scancel", job.id)
    state, report = job.finish()
    assert state == "CANCELLED", (state, job.log())
    assert len(report["results"]) == HELD and report["sigterm"], report
    _assert_results(report, held=True)
    assert job.log().count("draining: answering the jobs already received") == len(NODES), (
        job.log())
    job.assert_servers_stopped_by_themselves()


def test_the_time_limit_drains_like_scancel(jobs):
    job = jobs["time limit"]
    state, report = job.finish()
    assert state == "TIMEOUT", (state, job.log())
    # Every worker got the time limit's SIGTERM while its job ran, and
    # answered it (held=True). Whether the client, a background process of
    # the batch script, also saw it depends on when slurmstepd reached it
    # under load, so unlike scancel it is not required here.
    assert len(report["results"]) == HELD, report
    _assert_results(report, held=True)
    assert job.log().count("draining: answering the jobs already received") == len(NODES), (
        job.log())
    job.assert_servers_stopped_by_themselves()
