"""The PyPy family (requirements-pypy.txt: ppft 1.7.8 and dill in a venv
made by Debian's pypy3): what is PyPy's own, beside the protocol and job
modules scripts/test.sh runs with it as with every family.

- The server under test (``--python`` this PyPy venv's python) runs its
  workers on PyPy: a job says which interpreter runs it.
- The wheel installed with pip into a fresh PyPy venv, ppft first: its
  ``bin/ppserver`` run with no ``--python`` and a PATH without the venv
  finds the venv's ``python3`` (a link to pypy3) beside itself, its workers
  are PyPy processes, and a PyPy client's jobs (source shipped from its
  ``__main__``) all come back right.

Runs only under PyPy; the wheel test also needs ``PPSERVER_WHEEL``, as
test_wheel.py does.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import pphelpers
import procs
from pphelpers import HERE, IMPL, INTERPRETER, SECRET, free_port, server_env

WHEEL = os.environ.get("PPSERVER_WHEEL") and str(Path(os.environ["PPSERVER_WHEEL"]).resolve())

pytestmark = pytest.mark.skipif(INTERPRETER != "pypy", reason="the PyPy family's own tests: "
                                "run with compat-tests/.venv-pypy")

PIP_TIMEOUT = 240.0  # seconds for one pip command (downloads from PyPI)
PINS = HERE / "requirements-pypy.txt"
NJOBS = 20


def interpreter():
    """A job: the interpreter that runs it."""
    import sys

    return sys.implementation.name


def test_workers_run_on_pypy(pp_client):
    jobs = [pp_client.submit(interpreter) for _ in range(4)]
    assert [job() for job in jobs] == ["pypy"] * 4


def _run(argv, timeout=PIP_TIMEOUT):
    done = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout,
                          env=server_env(pythonpath=None))
    assert done.returncode == 0, "%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
        shlex.join(map(str, argv)), done.returncode, done.stdout, done.stderr)
    return done


@pytest.mark.skipif(IMPL != "rust", reason="the wheel packages the Rust server")
@pytest.mark.skipif(not WHEEL, reason="PPSERVER_WHEEL is not set (scripts/test.sh sets it "
                    "to the wheel scripts/wheel builds)")
@pytest.mark.timeout(300)
def test_wheel_in_a_pypy_venv_runs_its_workers_with_that_pypy(tmp_path):
    # The interpreter itself (/usr/bin/pypy3.9), as a user runs `pypy3 -m
    # venv`: from this venv's python, the new venv's links would lead
    # through this venv.
    pypy = os.path.realpath(sys.executable)
    venv = tmp_path / "pypy-venv"
    _run([pypy, "-m", "venv", "--without-pip", venv])
    # This venv's pip installs into the new one (pip --python runs it with
    # that venv's interpreter): the same files as the venv's own pip would
    # install, without ensurepip's time. ppft first, so that the wheel owns
    # bin/ppserver.
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
           "--disable-pip-version-check", "-q", "install", "-c", PINS]
    _run([*pip, "ppft", "dill"])
    _run([*pip, WHEEL])

    # PATH without the new venv and without this family's: python3 on PATH
    # (if any) cannot run ppft, so only the interpreter beside the binary can.
    skip = {str(venv / "bin"), str(Path(sys.executable).parent)}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in skip]
    port = free_port()
    argv = [str(a) for a in (venv / "bin" / "ppserver", "-v", "-i", "127.0.0.1", "-p", port,
                             "-w", 2, "-s", SECRET)]
    server = pphelpers.setup_or_fail(
        pphelpers.launch, argv, tmp_path / "server.log", port=port, nworkers=2,
        env=server_env({"PATH": os.pathsep.join(path)}, pythonpath=None), cwd=tmp_path)
    try:
        python3 = venv / "bin" / "python3"
        startup = "(%s -u -m ppft), advertising pp version 1.7.8" % python3
        # The startup line may follow the listening socket by a moment.
        line = server.logged(startup)
        # The fork-server runs on PyPy too (without gc.freeze, which PyPy
        # has not): the workers are forked, not spawned.
        assert "workers forked from a fork-server" in line, server.log()

        barrier = tmp_path / "barrier"
        barrier.mkdir()
        client = subprocess.Popen(
            [sys.executable, str(HERE / "clients" / "run_jobs.py"), server.id, SECRET, "pypy",
             str(NJOBS), str(barrier), "1"],
            cwd=str(HERE), env=server_env(pythonpath=None), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        code, out, err = pphelpers.finish_client_script(client)
        assert code == 0, "client exited %d\nstdout:\n%s\nstderr:\n%s\nserver log:\n%s" % (
            code, out, err, server.log_tail())
        result = json.loads(out.strip().splitlines()[-1])
        assert result["njobs"] == NJOBS and not result["bad"], result

        workers = procs.worker_pids(server)
        assert workers, server.log()
        for pid in workers:
            # `python -u -c BOOTSTRAP -m ppft`: the bootstrap that keeps
            # the worker alive through a SIGTERM sent to the whole tree.
            argv = procs.cmdline(pid)
            assert argv[:2] == [str(python3), "-u"] and argv[-2:] == ["-m", "ppft"], argv
            assert os.path.realpath("/proc/%d/exe" % pid) == pypy
    finally:
        pphelpers.stop_server(server)
