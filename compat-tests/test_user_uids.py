"""Workers as their user's uid (`uid` in the users file), as root, with
numeric uids that have no passwd entry (64001, 64002): nothing is made
in /etc.

- A user's jobs run as its uid and gid (real, effective and saved), with
  no supplementary groups, HOME=/ and no USER of the server's, their
  death signal still set; no way back to root works. Forked and spawned.
- A file one uid's job writes with mode 0600 cannot be read by the
  other's.
- Under --worker-memory-limit 100M, a job can neither lift its cgroup's
  limit nor move its worker out of the cgroup (permission errors), and a
  300 MB allocation is answered with the memory limit: by cgroup, and by
  polling (the server reads another uid's worker's memory as root).
- Startup errors: a uid in a server that is not root; a uid that cannot
  reach the interpreter (under a directory of mode 0700); a uid that
  cannot enter the server's working directory.

Other uids cannot reach what root's own interpreter often lives under
(pyenv's in /root, mode 0700), so the module makes a directory every uid
can read (mode 0755, under /tmp): the client's own ppft, pp and dill and
uidjobs.py copied into site/ (all pure Python: no pip, no network), the
server binary, and a home per uid. The workers run with an interpreter
of the client's version that uid 64001 can run (the client's own if it
can, else /usr/bin/python3.X): found by running it as that uid, or the
module is skipped. Servers run in that directory with PYTHONPATH=site/.
"""

import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import pphelpers
import uidjobs
from procs import wait_until

pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(reason="ppft's server runs every job as its own uid"),
]

ALICE, BOB = 64001, 64002
PROMPT = 60.0  # bound of every wait for something the server should do soon


@dataclass
class Shared:
    top: Path
    site: Path
    python: str
    binary: Path
    homes: dict


def as_uid(uid):
    """subprocess arguments that run a child as `uid` (gid the same, no
    supplementary groups)."""
    return {"user": uid, "group": uid, "extra_groups": []}


def python_for_all(cwd):
    """An interpreter of this Python's version that uid ALICE can run:
    this one's real file, else the system's python3.X; None if neither."""
    version = "%d.%d" % sys.version_info[:2]
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python" + version,
                  shutil.which("python" + version)]
    for candidate in candidates:
        if not candidate or not os.path.exists(candidate):
            continue
        try:
            ran = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                cwd=str(cwd), capture_output=True, text=True, **as_uid(ALICE))
        except OSError:
            continue
        if ran.returncode == 0 and ran.stdout.strip() == version:
            return candidate
    return None


@pytest.fixture(scope="module")
def shared():
    if os.geteuid() != 0:
        pytest.skip("needs root: only a root server runs workers as other uids")
    top = Path(tempfile.mkdtemp(prefix="ppserver-uids-", dir="/tmp"))
    try:
        top.chmod(0o755)
        site = top / "site"
        site.mkdir()
        for name in ("ppft", "pp", "dill"):
            try:
                package = importlib.import_module(name)
            except ImportError:
                continue
            shutil.copytree(Path(package.__file__).parent, site / name,
                            ignore=shutil.ignore_patterns("__pycache__", "tests"))
        shutil.copy(Path(uidjobs.__file__), site)
        binary = top / "ppserver"
        shutil.copy(pphelpers.rust_binary(), binary)
        for path in [top, site, binary, *site.rglob("*")]:
            path.chmod(0o755 if path.is_dir() or path == binary else 0o644)
        python = python_for_all(top)
        if python is None:
            pytest.skip("no Python %d.%d that uid %d can run" % (*sys.version_info[:2], ALICE))
        homes = {}
        for uid in (ALICE, BOB):
            home = homes[uid] = top / ("home-%d" % uid)
            home.mkdir(mode=0o755)
            os.chown(home, uid, uid)
        yield Shared(top, site, python, binary, homes)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def users_file(directory, users, owner=None):
    """A users file of `users` ((name, uid) pairs), each with the secret
    NAME-secret, mode 0600 (owned by `owner` if given)."""
    path = directory / ("users-%s" % uuid.uuid4().hex)
    path.write_text("".join("[%s]\nsecret = %s-secret\nuid = %d\n\n" % (name, name, uid)
                            for name, uid in users))
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def serve(launch, tmp_path, shared, users, *flags, name=None, nworkers=1, env=None):
    """A server for `users`, run in the shared directory with its Python."""
    return launch("--users", users_file(tmp_path, users), *flags, name=name, nworkers=nworkers,
                  with_secret=False, secret=users[0][0] + "-secret", cwd=shared.top,
                  pythonpath=(shared.site,), python=shared.python, env=env)


def run(server, user, func, args=()):
    """One job of `user`'s from a ppft client of its own."""
    js = pphelpers.connect_client(server, secret=user + "-secret")
    try:
        return js.submit(func, args)()
    finally:
        pphelpers.close_client(js)


def proc_ids(pid, field):
    """The ids on /proc/PID/status's `field` line (Uid, Gid): real,
    effective, saved, filesystem."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(field + ":"):
            return tuple(int(x) for x in line.split()[1:])
    raise AssertionError("no %s line for pid %d" % (field, pid))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_users_jobs_run_as_its_uid_and_cannot_get_root_back(launch, tmp_path, shared, start):
    server = serve(launch, tmp_path, shared, [("alice", ALICE)], "--worker-start", start)
    js = pphelpers.connect_client(server, secret="alice-secret")
    try:
        uids, gids, groups, home, user, deathsig, pid = js.submit(uidjobs.who)()
        assert (uids, gids) == ((ALICE,) * 3, (ALICE,) * 3), server.log_tail()
        assert groups in ([], [ALICE]), groups
        assert (home, user) == ("/", None), "no passwd entry: no home, no name of root's"
        assert deathsig == 9, "the death signal is set after the drop, which clears it"
        # Seen from outside: the filesystem uid too.
        assert proc_ids(pid, "Uid") == (ALICE,) * 4
        assert proc_ids(pid, "Gid") == (ALICE,) * 4
        assert js.submit(uidjobs.take_root)() == ["PermissionError"] * 5
    finally:
        pphelpers.close_client(js)


def test_a_file_one_uids_job_writes_with_mode_0600_is_not_the_other_uids(launch, tmp_path,
                                                                         shared):
    alice = serve(launch, tmp_path, shared, [("alice", ALICE)], name="alice")
    bob = serve(launch, tmp_path, shared, [("bob", BOB)], name="bob")
    private = str(shared.homes[ALICE] / ("private-%s" % uuid.uuid4().hex))
    assert run(alice, "alice", uidjobs.write_private, (private, "alice's")) == (ALICE, "0o600")
    assert run(bob, "bob", uidjobs.read_text, (private,)) == "PermissionError"
    assert run(alice, "alice", uidjobs.read_text, (private,)) == "alice's"


def test_two_users_of_one_server_run_as_their_own_uids(tmp_path, shared):
    """-w 1: one slot, whose worker must be replaced by one of the other
    user's uid between their jobs."""
    path = users_file(tmp_path, [("alice", ALICE), ("bob", BOB)])
    server = pphelpers.start_server(1, tmp_path / "both.log", "--users", path,
                                    with_secret=False, secret="alice-secret",
                                    cwd=shared.top, pythonpath=(shared.site,),
                                    python=shared.python)
    try:
        private = str(shared.homes[ALICE] / ("private-%s" % uuid.uuid4().hex))
        assert run(server, "alice", uidjobs.who)[0] == (ALICE,) * 3
        assert run(server, "bob", uidjobs.who)[0] == (BOB,) * 3
        assert run(server, "alice", uidjobs.write_private, (private, "a")) == (ALICE, "0o600")
        assert run(server, "bob", uidjobs.read_text, (private,)) == "PermissionError"
    finally:
        pphelpers.stop_server(server)


@pytest.mark.parametrize("method", ["default", "polling"])
def test_a_uids_job_cannot_lift_or_leave_its_memory_cgroup_and_is_held_to_the_limit(
        launch, tmp_path, shared, capsys, method):
    """With a cgroup per slot (default, as root here), and with polling
    (PPSERVER_WORKER_MEMORY_CGROUP=0: the server, as root, reads the
    memory of a worker of another uid)."""
    polling = {"PPSERVER_WORKER_MEMORY_CGROUP": "0" if method == "polling" else None}
    server = serve(launch, tmp_path, shared, [("alice", ALICE)], "--worker-memory-limit", "100M",
                   env=pphelpers.server_env(polling, pythonpath=(shared.site,)))
    line = server.logged("worker memory limit 100M by ")
    if ("by polling" in line) != (method == "polling"):
        pytest.skip("no memory cgroup here: %s" % line)
    js = pphelpers.connect_client(server, secret="alice-secret")
    try:
        tried, after = js.submit(uidjobs.escape_cgroup)()
        assert {"move to parent", "move to root"} <= set(tried), tried
        assert {"memory.limit_in_bytes", "memory.max"} & set(tried), tried
        assert set(tried.values()) == {"PermissionError"}, tried
        capsys.readouterr()
        assert js.submit(uidjobs.hog, (300, PROMPT))() is None
        out = capsys.readouterr().out
        assert "job exceeded --worker-memory-limit of 100M on %s" % socket.gethostname() in out, (
            out, server.log_tail())
        assert js.submit(uidjobs.who)()[0] == (ALICE,) * 3, "the next worker is alice's too"
    finally:
        pphelpers.close_client(js)


def start_error(shared, log_path, users, *, cwd=None, python=None, **popen):
    """Starts the shared binary with a users file of `users` (and `popen`:
    another uid) where it is expected to refuse to start; waits (bounded)
    until it exits, and returns its exit code and output. A server that
    listens instead fails the test."""
    port = pphelpers.free_port()
    owner = popen.get("user")
    argv = [str(shared.binary), "-i", "127.0.0.1", "-p", str(port), "-w", "1",
            "--users", str(users_file(shared.top, users, owner=owner)),
            "--python", python or shared.python]
    env = pphelpers.server_env(pythonpath=(shared.site,))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=str(cwd or shared.top), env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)

    def state():
        if proc.poll() is not None:
            return "exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return "listening"
        except OSError:
            return None

    found = wait_until(state, timeout=PROMPT)
    if found != "exited":
        proc.kill()
        proc.wait()
    output = Path(log_path).read_text(errors="replace")
    assert found == "exited", "the server %s:\n%s" % (found or "neither exited nor listened",
                                                      output)
    return proc.returncode, output


def test_a_uid_in_a_server_that_is_not_root_is_a_startup_error(tmp_path, shared):
    code, out = start_error(shared, tmp_path / "log", [("bob", BOB)], **as_uid(ALICE))
    assert code == 1, out
    assert ('user "bob" has uid = %d, and only a server running as root can run workers as '
            'another uid (this one runs as uid %d)' % (BOB, ALICE)) in out, out


def test_a_uid_that_cannot_reach_the_interpreter_is_a_startup_error(tmp_path, shared):
    private = shared.top / ("private-%s" % uuid.uuid4().hex)
    private.mkdir(mode=0o700)
    try:
        python = private / "python3"
        python.symlink_to(shared.python)
        code, out = start_error(shared, tmp_path / "log", [("alice", ALICE)], python=str(python))
    finally:
        shutil.rmtree(private)
    assert code == 1, out
    assert ('user "alice" (uid = %d): uid %d cannot search %s, on the way to the workers\' '
            'interpreter %s; the usual cause is a venv or interpreter under a home directory '
            'of mode 0700, such as /root' % (ALICE, ALICE, private, python)) in out, out


def test_a_uid_that_cannot_enter_the_working_directory_is_a_startup_error(tmp_path, shared):
    closed = shared.top / ("closed-%s" % uuid.uuid4().hex)
    closed.mkdir(mode=0o700)
    try:
        code, out = start_error(shared, tmp_path / "log", [("alice", ALICE)], cwd=closed)
    finally:
        closed.rmdir()
    assert code == 1, out
    assert ('user "alice" (uid = %d): uid %d cannot enter %s, the server\'s working directory, '
            'where the workers run' % (ALICE, ALICE, closed)) in out, out
