"""The wheel (pyproject.toml, built by scripts/wheel) installed with pip into
fresh venvs, the way Python users install the server.

- ppft first, then the wheel: ``bin/ppserver`` and ``bin/ppserver-rs`` are
  both the wheel's binary; ``bin/ppserver`` run with no ``--python`` and a
  PATH without the venv runs its workers with the venv's python (the
  startup line and the workers' command lines say so) and a real ppft
  1.7.8 client's jobs all come back right; no warning about the name.
- The wheel with the ``[pp]`` extra: ``bin/ppserver-rs`` runs pp 1.7.0
  workers with the venv's python, advertises 1.7.0, and a pp 1.7.0 client
  (the venv's python running clients/run_jobs.py) gets every result.
- The wheel alone, then ppft: first ``ppserver-rs`` exits saying the exact
  pip command; that command (run as given) adds ppft, whose wheel then owns
  ``bin/ppserver`` (a Python script); ``ppserver-rs -v`` warns that
  ``bin/ppserver`` is another program, and runs jobs. Uninstalling the
  wheel leaves ppft importable and its worker (``python -m ppft``) running.
- Uninstalling ppft from the first venv: ``bin/ppserver`` goes with it (it
  was ours, but ppft's record lists it), ``bin/ppserver-rs`` stays ours and
  names the pip command again.

The venvs are built here (pip needs PyPI for the pinned client packages of
requirements.txt and requirements-pp170.txt, used as constraints; the wheel
is a local file). Needs ``PPSERVER_WHEEL``, the wheel's path (scripts/test.sh
builds it with scripts/wheel); skipped without it, for ``PPSERVER_IMPL=python``,
and in all client families but ppft 1.7.8: the tests build their own venvs,
so one run is enough. The first venv's tests run in file order: the last
one uninstalls ppft from it.
"""

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pphelpers
import procs
import serverprocs as sp
from pphelpers import FAMILY, HERE, IMPL, SECRET, free_port, server_env

WHEEL = os.environ.get("PPSERVER_WHEEL") and str(Path(os.environ["PPSERVER_WHEEL"]).resolve())

pytestmark = [
    pytest.mark.skipif(IMPL != "rust", reason="the wheel packages the Rust server"),
    pytest.mark.skipif(not WHEEL, reason="PPSERVER_WHEEL is not set (scripts/test.sh sets it "
                       "to the wheel scripts/wheel builds)"),
    pytest.mark.skipif(FAMILY != "ppft-1.7.8", reason="the wheel tests build their own venvs "
                       "and run once, with the ppft 1.7.8 family"),
    # Fixtures create venvs and install from PyPI.
    pytest.mark.timeout(300),
]

# Under xdist, the two tests of the venv ppft_then_ours makes run on one
# process, in this order (the second changes the venv); the others anywhere.
SHARED_VENV = pytest.mark.xdist_group("wheel")

PIP_TIMEOUT = 240.0  # seconds for one pip command (downloads, pp 1.7.0's sdist build)
PPFT_PINS = HERE / "requirements.txt"
PP170_PINS = HERE / "requirements-pp170.txt"
NJOBS = 20
DIST = "ppserver-rs"


def _run(argv, timeout=PIP_TIMEOUT):
    done = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout,
                          env=server_env(pythonpath=None))
    assert done.returncode == 0, "%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
        shlex.join(map(str, argv)), done.returncode, done.stdout, done.stderr)
    return done


def _pip(venv, *args):
    return _run([venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q",
                 *args])


def _new_venv(path):
    _run([sys.executable, "-m", "venv", path])
    return path


@functools.lru_cache(maxsize=None)
def _wheel_files():
    """{script name: bytes} of the binaries the wheel installs."""
    with zipfile.ZipFile(WHEEL) as whl:
        return {Path(n).name: whl.read(n) for n in whl.namelist()
                if re.search(r"\.data/scripts/[^/]+$", n)}


def _is_ours(path, name):
    """`path` is byte for byte the wheel's `name`."""
    return path.is_file() and path.read_bytes() == _wheel_files()[name]


def _env_without(venv):
    """The servers' environment: PATH without this venv's bin/ nor the
    suite's own venv (so python3 on PATH has no ppft from either), no
    PYTHONPATH."""
    skip = {str(venv / "bin"), str(Path(sys.executable).parent)}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in skip]
    return server_env({"PATH": os.pathsep.join(path)}, pythonpath=None)


def _start(venv, name, tmp_path, *flags):
    """<venv>/bin/NAME -v -i 127.0.0.1 -p PORT -w 2 -s SECRET: no --python."""
    port = free_port()
    argv = [str(a) for a in (venv / "bin" / name, "-v", "-i", "127.0.0.1", "-p", port, "-w", 2,
                             "-s", SECRET, *flags)]
    return pphelpers.setup_or_fail(
        pphelpers.launch, argv, tmp_path / ("%s-%s.log" % (venv.name, name)), port=port,
        nworkers=2, env=_env_without(venv), cwd=tmp_path)


def _run_jobs(python, server, tmp_path):
    """clients/run_jobs.py with `python` (its pp client family): NJOBS jobs,
    each right."""
    barrier = tmp_path / ("barrier-%d" % server.port)
    barrier.mkdir()
    proc = subprocess.Popen(
        [str(python), str(HERE / "clients" / "run_jobs.py"), server.id, SECRET, "wheel",
         str(NJOBS), str(barrier), "1"],
        cwd=str(HERE), env=server_env(pythonpath=None), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = pphelpers.finish_client_script(proc)
    assert code == 0, "client exited %d\nstdout:\n%s\nstderr:\n%s\nserver log:\n%s" % (
        code, out, err, server.log_tail())
    result = json.loads(out.strip().splitlines()[-1])
    assert result["njobs"] == NJOBS and not result["bad"], result


def _assert_runs_jobs(venv, name, tmp_path, client_python, module, version):
    """Start bin/NAME, check the interpreter it chose and its workers, run
    jobs; returns the server's log."""
    server = _start(venv, name, tmp_path)
    try:
        python = venv / "bin" / "python3"
        startup = "(%s -u -m %s), advertising pp version %s" % (python, module, version)
        # The log is written by a thread of its own: the line may follow
        # the listening socket by a moment.
        assert procs.wait_until(lambda: startup in server.log(), timeout=30), server.log()
        _run_jobs(client_python, server, tmp_path)
        workers = procs.worker_pids(server)
        assert workers, server.log()
        for pid in workers:
            # `python -u -c <bootstrap> -m MODULE` (src/workers/worker_bootstrap.py)
            argv = procs.cmdline(pid)
            assert argv[:3] == [str(python), "-u", "-c"] and argv[4:] == ["-m", module], argv
        return server.log()
    finally:
        pphelpers.stop_server(server)


def _foreign_warning(venv):
    return "%s is another program, not this server" % (venv / "bin" / "ppserver")


def _hint(venv):
    return "%s -m pip install '%s[ppft]'" % (venv / "bin" / "python3", DIST)


def _refused_for_want_of_ppft(venv, tmp_path):
    """bin/ppserver-rs with neither ppft nor pp beside it and no python3 on
    PATH exits 1; returns its stderr."""
    argv = [str(venv / "bin" / "ppserver-rs"), "-i", "127.0.0.1", "-p", str(free_port()),
            "-s", SECRET]
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    code, out, err = sp.run_to_exit(argv, env=server_env({"PATH": str(empty)},
                                                         pythonpath=None))
    assert code == 1, "exited %r\nstdout:\n%s\nstderr:\n%s" % (code, out, err)
    return err


@pytest.fixture(scope="module")
def ppft_then_ours(tmp_path_factory):
    """A venv with ppft 1.7.8 and dill, then the wheel installed into it."""
    venv = _new_venv(tmp_path_factory.mktemp("wheel") / "ppft-then-ours")
    _pip(venv, "install", "-c", PPFT_PINS, "ppft", "dill")
    _pip(venv, "install", "-c", PPFT_PINS, WHEEL + "[ppft]")
    return venv


@SHARED_VENV
def test_installed_after_ppft_ppserver_is_ours_and_runs_workers_with_the_venv_python(
        ppft_then_ours, tmp_path):
    venv = ppft_then_ours
    for name in ("ppserver", "ppserver-rs"):
        assert _is_ours(venv / "bin" / name, name), "bin/%s is not the wheel's" % name
    log = _assert_runs_jobs(venv, "ppserver", tmp_path, sys.executable, "ppft", "1.7.8")
    assert _foreign_warning(venv) not in log, log


def test_pp_extra_runs_pp170_workers_with_the_venv_python(tmp_path):
    venv = _new_venv(tmp_path / "pp-extra")
    _pip(venv, "install", "-c", PP170_PINS, WHEEL + "[pp]")
    assert _is_ours(venv / "bin" / "ppserver-rs", "ppserver-rs")
    log = _assert_runs_jobs(venv, "ppserver-rs", tmp_path, venv / "bin" / "python",
                            "pp._worker", "1.7.0")
    # pip installs an extra's packages after the wheel, so pp's script may
    # own bin/ppserver: the warning says so exactly when it does.
    foreign = not _is_ours(venv / "bin" / "ppserver", "ppserver")
    assert (_foreign_warning(venv) in log) == foreign, log


def test_installed_before_ppft_ppserver_rs_is_ours_warns_and_uninstalls_cleanly(tmp_path):
    venv = _new_venv(tmp_path / "ours-then-ppft")
    _pip(venv, "install", WHEEL)
    err = _refused_for_want_of_ppft(venv, tmp_path)
    assert _hint(venv) in err, err

    # The command the message gives, as given (pinned to the suite's ppft).
    _run([*shlex.split(_hint(venv)), "--disable-pip-version-check", "-q", "-c", PPFT_PINS])
    ppserver = venv / "bin" / "ppserver"
    assert ppserver.read_bytes().startswith(b"#!"), "bin/ppserver is not ppft's script"
    assert _is_ours(venv / "bin" / "ppserver-rs", "ppserver-rs")
    log = _assert_runs_jobs(venv, "ppserver-rs", tmp_path, sys.executable, "ppft", "1.7.8")
    assert _foreign_warning(venv) in log and "`ppserver-rs` is always this server" in log, log

    _pip(venv, "uninstall", "-y", DIST)
    assert not (venv / "bin" / "ppserver-rs").exists()
    # pip removes every file the wheel's record lists: ppft's script too.
    assert not ppserver.exists()
    python = venv / "bin" / "python"
    _run([python, "-c", "import ppft, dill; assert ppft.__version__ == '1.7.8'"])
    worker = subprocess.run([str(python), "-u", "-m", "ppft"], input=b"", capture_output=True,
                            timeout=60, env=server_env(pythonpath=None))
    # A ppft worker starts by announcing its pid in one frame.
    header, pid = worker.stdout[:8], worker.stdout[8:]
    assert header and int.from_bytes(header, "big") == len(pid) and pid.isdigit(), worker


def test_man_pages_are_installed_where_man_finds_them(tmp_path):
    """The wheel alone (no extra: nothing from PyPI) puts ppserver(1) and
    ppserver.conf(5), the repository's generated pages, under the venv's
    share/man, where `man -M <venv>/share/man` (and `man` with the venv's
    bin/ on PATH) finds them; bin/ppserver-rs --version is the wheel's."""
    venv = _new_venv(tmp_path / "man-pages")
    _pip(venv, "install", WHEEL)
    root = HERE.parent
    for page, source in (("man1/ppserver.1", "docs/man/ppserver.1"),
                         ("man5/ppserver.conf.5", "docs/man/ppserver.conf.5")):
        installed = venv / "share" / "man" / page
        assert installed.is_file(), "%s is not installed" % installed
        assert installed.read_bytes() == (root / source).read_bytes(), page
    version = _run([venv / "bin" / "ppserver-rs", "--version"]).stdout
    assert re.fullmatch(r"ppserver \d+\.\d+\.\d+\n", version), version
    if not shutil.which("man"):
        return  # the pages are where man looks; no man here to read them
    for name, needle in (("ppserver", "--worker-memory-limit"),
                         ("ppserver.conf", "max_handshakes_per_address")):
        done = subprocess.run(["man", "-M", str(venv / "share" / "man"), name],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="200"))
        assert done.returncode == 0, done.stderr
        # In a UTF-8 locale groff may render a minus as U+2212.
        text = done.stdout.replace("\u2010", "-").replace("\u2212", "-")
        assert needle in text, text[:2000]


@SHARED_VENV
def test_uninstalling_ppft_takes_ppserver_and_leaves_ppserver_rs(ppft_then_ours, tmp_path):
    """Runs after the first test: it changes the shared venv."""
    venv = ppft_then_ours
    _pip(venv, "uninstall", "-y", "ppft")
    assert not (venv / "bin" / "ppserver").exists()
    assert _is_ours(venv / "bin" / "ppserver-rs", "ppserver-rs")
    err = _refused_for_want_of_ppft(venv, tmp_path)
    assert _hint(venv) in err, err
