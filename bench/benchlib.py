"""What the benchmark scripts share: paths, processes, /proc, servers, clients.

bench/bench.py, bench/churn.py, bench/latency.py and bench/profile.py
import this module, and bench/client.py takes its marker and CPU reader
from it; it imports none of them. It holds:

  - the paths (repo, venvs, release binary) and the settings every server
    under test gets (address, secret, worker count);
  - process handling: every process is started in a session of its own and
    remembered, so that it and all its children can be killed as a group on
    the way out (normal end, exception, Ctrl-C, SIGTERM or the global
    deadline, see ``arm``);
  - /proc readers: stat fields, CPU ticks, descendants, status fields, the
    load average, and what the machine is;
  - servers (``start_server``, ``Server.stop``) and bench/client.py
    processes (``Client``, ``wait_all``, ``client_cfg``);
  - the report's small helpers: ``fmt``, ``mib``, ``ratio``, ``percentile``,
    ``tiny_cells``.
"""

import datetime
import json
import math
import os
import platform
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CLIENT = BENCH / "client.py"
BINARY = REPO / "target" / "release" / "ppserver"
PY_PPFT = BENCH / ".venv-ppft" / "bin" / "python"
PY_PP = BENCH / ".venv-pp" / "bin" / "python"

HOST = "127.0.0.1"
SECRET = "bench;secret 0f ppserver"  # punctuation and a space, like pp's default
WORKERS = 2
WARMUP_JOBS = 30  # tiny jobs a client runs before anything is timed

SERVER_START_TIMEOUT = 30
STOP_GRACE = 5
CLIENT_TIMEOUT = 120  # one client: warm-up, then tiny runs or one bulk run


class BenchError(Exception):
    """A measurement could not be made; the message says why."""


# ---------------------------------------------------------------- processes

# Every process group started here, so that cleanup can kill what is left.
_LIVE = {}


def spawn(argv, log_path, **kw):
    """Start argv in a new session (so it and all its children form one
    process group we can kill as a unit) and remember it for cleanup."""
    logf = open(log_path, "ab")
    logf.write(("$ %s\n" % " ".join(map(str, argv))).encode())
    logf.flush()
    if kw.get("stdout") == "log":  # stdout and stderr into the same log
        kw["stdout"] = logf
    proc = subprocess.Popen([str(a) for a in argv], stderr=logf, start_new_session=True,
                            **kw)
    proc._bench_log = logf
    _LIVE[proc.pid] = proc
    return proc


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(proc, timeout):
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def finish(proc):
    """Kill whatever is left of proc's process group and forget it."""
    kill_group(proc)
    reap(proc, 5)
    for f in (proc.stdin, proc.stdout, proc._bench_log):
        if f:
            try:
                f.close()
            except OSError:
                pass
    _LIVE.pop(proc.pid, None)


def cleanup_all():
    for proc in list(_LIVE.values()):
        kill_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for proc in list(_LIVE.values()):
        reap(proc, max(0.1, deadline - time.monotonic()))
        finish(proc)


# ---------------------------------------------------------------- /proc

def _stat(pid):
    """The fields of /proc/PID/stat from the state on (fields[0] is field 3);
    OSError if pid is gone. The command name may hold spaces or parentheses,
    so the fields are counted from the last ')'."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def stat_fields(pid):
    """_stat(pid), or None if pid is gone."""
    try:
        return _stat(pid)
    except OSError:
        return None


def proc_stat(pid):
    """(ppid, starttime) of pid, or None if it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return int(fields[1]), int(fields[19])


def cpu_ticks(pid):
    """(utime, stime) of one process (all its threads, not its children) in
    clock ticks. Raises OSError if pid is gone: a CPU figure around a run is
    meaningless without both ends."""
    fields = _stat(pid)
    # utime and stime are fields 14 and 15.
    return int(fields[11]), int(fields[12])


def descendants(root):
    """{pid: starttime} of every live descendant of root (the workers a
    server forked), read from /proc. starttime guards against pid reuse."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st:
                children.setdefault(st[0], []).append((int(entry), st[1]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def proc_status(pid, key):
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def load_average():
    """1-minute load average: other work on the machine skews every figure,
    so the report says how busy it was."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_info():
    """What the machine is, the build and the date, for a report's header."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                  cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    commit = cmd(["git", "rev-parse", "--short", "HEAD"])
    if cmd(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    return {
        "cpu": model,
        "cores": "%d online, %d usable by this process" % (os.cpu_count(),
                                                           len(os.sched_getaffinity(0))),
        "cpus": len(os.sched_getaffinity(0)),  # usable: the README's "N cores"
        "kernel": "%s %s" % (platform.system(), platform.release()),
        "python": platform.python_version(),
        "rustc": cmd(["rustc", "--version"]),
        "commit": commit,
        "load": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ------------------------------------------------------------------ servers

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    leftovers: list = field(default_factory=list)

    @property
    def address(self):
        return "%s:%d" % (HOST, self.port)

    def log_tail(self, lines=15):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        """SIGTERM the server alone first (a clean shutdown is part of what
        a drop-in server must do), then SIGKILL its group and any worker that
        escaped it. Records workers that outlived the grace period."""
        workers = descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        reap(self.proc, STOP_GRACE)
        # Give workers the same grace to notice their pipes closed.
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(
                (proc_stat(p) or (0, None))[1] == s for p, s in workers.items()):
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.leftovers.append("server pid %d ignored SIGTERM" % self.proc.pid)
        for pid, start in workers.items():
            st = proc_stat(pid)
            if st and st[1] == start:
                self.leftovers.append("worker pid %d outlived the server" % pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finish(self.proc)


def start_server(name, argv, logdir, cwd):
    port = free_port()
    log_path = logdir / ("server-%s.log" % name)
    argv = [a if a != "{port}" else str(port) for a in argv]
    env = dict(os.environ)
    # Job functions are shipped as source; nothing must leak in from the
    # caller's environment. ppft's server prepends its cwd to the workers'
    # PYTHONPATH itself; ours inherits it.
    env.pop("PYTHONPATH", None)
    proc = spawn(argv, log_path, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout="log")
    server = Server(name, proc, port, log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            server.stop()
            raise BenchError("%s exited with code %s at startup:\n%s"
                             % (name, proc.returncode, server.log_tail()))
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise BenchError("%s did not accept connections within %ds:\n%s"
                             % (name, SERVER_START_TIMEOUT, server.log_tail()))
        time.sleep(0.05)


# ------------------------------------------------------------------ clients

MARKER = "BENCH-JSON "


class Client:
    """One bench/client.py process; reads its BENCH-JSON lines."""

    def __init__(self, python, cfg, log_path, cwd):
        self.log_path = log_path
        self.proc = spawn([python, "-u", CLIENT, json.dumps(cfg)], log_path, cwd=cwd,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.messages = []
        self.eof = False

    def pump(self):
        """Read what is available; parse complete lines."""
        try:
            data = self.proc.stdout.read()
        except BlockingIOError:
            data = None
        if data == b"":
            self.eof = True
        elif data:
            self.buf += data
            *lines, self.buf = self.buf.split(b"\n")
            for line in lines:
                line = line.decode(errors="replace")
                if line.startswith(MARKER):
                    self.messages.append(json.loads(line[len(MARKER):]))
                else:
                    # Anything else the client prints (pp warnings) goes to
                    # its log for diagnosis.
                    self.proc._bench_log.write((line + "\n").encode())

    def has(self, kind):
        return next((m for m in self.messages if m["kind"] == kind), None)

    def go(self):
        self.proc.stdin.write(b"GO\n")
        self.proc.stdin.flush()

    def close(self):
        # The client exits by itself after printing its result; give it a
        # moment, then kill its group (which includes local workers).
        reap(self.proc, 10)
        finish(self.proc)

    def log_tail(self, lines=15):
        self.proc._bench_log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_all(clients, kind, timeout):
    """Wait until every client has printed a `kind` message. Raises
    BenchError with the log of the first client that died or was too slow."""
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.proc.stdout, selectors.EVENT_READ, c)
    deadline = time.monotonic() + timeout
    try:
        while True:
            pending = [c for c in clients if not c.has(kind)]
            if not pending:
                return [c.has(kind) for c in clients]
            dead = [c for c in pending if c.eof]
            if dead:
                c = dead[0]
                reap(c.proc, 2)
                raise BenchError("client exited (code %s) before '%s':\n%s"
                                 % (c.proc.returncode, kind, c.log_tail()))
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("%d of %d clients gave no '%s' within %ds:\n%s"
                                 % (len(pending), len(clients), kind, timeout,
                                    pending[0].log_tail()))
            for key, _ in sel.select(timeout=min(left, 1.0)):
                key.data.pump()
    finally:
        sel.close()


def client_cfg(server, ncpus, **kw):
    cfg = {"server": server.address if server else None, "secret": SECRET,
           "ncpus": ncpus, "server_pid": server.proc.pid if server else None,
           "warmup": WARMUP_JOBS, "barrier": False, "phases": []}
    cfg.update(kw)
    return cfg


@dataclass
class Config:
    """One configuration under test: the client's interpreter, and the
    server's argv ("{port}" stands for the port chosen at start)."""
    key: str
    label: str
    client_python: Path
    server_argv: list = None  # None: no server (local workers)

    @property
    def ncpus(self):
        return 0 if self.server_argv else WORKERS


# ------------------------------------------------------------ interruption

def arm(deadline):
    """Ctrl-C, SIGTERM, SIGHUP and the global deadline (in seconds) all
    raise KeyboardInterrupt, so that they unwind through the caller's
    `finally`, which kills every process group started here."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    def alarm(signum, frame):
        raise KeyboardInterrupt("global deadline of %ds reached" % deadline)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(deadline)


# --------------------------------------------------------------- reporting

def fmt(value, spec="%.0f", none="n/a"):
    return none if value is None else spec % value


def mib(kib):
    return None if kib is None else kib / 1024


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100, 99.9 too) of a non-empty list.
    The rank is computed exactly: in floats, 99.9 / 100 * 1000 rounds up to
    a rank past the right one."""
    s = sorted(values)
    return s[max(0, math.ceil(Fraction(str(q)) * len(s) / 100) - 1)]


def tiny_cells(r):
    """The "tiny jobs" and "tiny jobs/s" cells of a result row: the count
    (times the runs), and the median rate (with its range over the runs)."""
    reps = r["tiny_reps"]
    if reps == 1:
        return "%d" % r["tiny_n"], fmt(r["tiny_jobs_per_s"])
    return ("%d x%d" % (r["tiny_n"], reps),
            "%s (%s-%s)" % (fmt(r["tiny_jobs_per_s"]), fmt(min(r["tiny_rates"])),
                            fmt(max(r["tiny_rates"]))))
