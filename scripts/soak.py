"""Soak test for ppserver: real ppft clients, mixed jobs, workers killed at
random; every job must be answered, and answered right.

Run through scripts/soak (which builds the release binary and the venv),
or directly with compat-tests/.venv/bin/python scripts/soak.py [options].

The driver starts target/release/ppserver with a few workers, starts
--clients separate ppft client processes (this file, in client mode) that
submit a sliding window of jobs for --duration seconds, SIGKILLs a random
worker every --kill-every seconds, sends a trickle of misbehaving raw
connections (wrong secrets, oversize headers, half headers, abandoned jobs),
optionally holds a flood of silent sockets from another source address
(--flood, from 127.0.0.2) and sends big-argument jobs of random bytes, each
answered with their sha256 and checked against what was sent (--big-every,
--big-size; with --memory-limit for the server), and samples the server's
VmRSS, fd count and worker count.

Every job's answer is checked against a value the client computes itself:
- correct: exactly the expected result (for the job kind that raises: None
  with the job's own traceback, which is the correct answer);
- answered with error: None with ppserver's own text (the worker died, or
  could not be started); expected when its worker was killed;
- wrong: anything else (including another job's result);
- lost: no answer within --job-deadline seconds of submission.
Exit status: 0 only if nothing was lost or wrong, the server survived, every
client finished, and the server's fds and workers settled back at the end.
"""

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KB, MB = 1 << 10, 1 << 20
WORKER_MODULES = ("ppft", "pp._worker")


# --- job functions (shipped by ppft as source: they live in __main__) ----------


def isprime(n):
    """True if n is prime."""
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def job_echo(tag, blob):
    import hashlib

    return tag, len(blob), hashlib.md5(blob).hexdigest(), blob[:16]


def job_reverse(tag, blob):
    return tag, blob[::-1]


def job_primes(tag, n):
    return tag, sum(x for x in range(2, n) if isprime(x))


def job_sleep(tag, seconds):
    import os
    import time

    time.sleep(seconds)
    return tag, seconds, os.getpid() > 0


def job_print(tag, times):
    for k in range(times):
        print("soak-line %s %d" % (tag, k))
    return tag, times * 3


def job_raise(tag):
    raise ValueError("soak-raise %s" % tag)


KINDS = ("echo", "reverse", "primes", "sleep", "print", "raise")
KIND_WEIGHTS = (30, 15, 15, 20, 12, 8)


def payload_size(rng, max_payload):
    """0 to max_payload bytes, most of them small."""
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.45:
        return rng.randrange(1, KB)
    if r < 0.75:
        return rng.randrange(KB, 64 * KB)
    return rng.randrange(64 * KB, max_payload + 1)


def make_job(rng, tag, max_payload):
    """(kind, func, args, depfuncs, modules, check) for one job; check(result,
    text) says whether the answer is the correct one."""
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    if kind == "echo":
        blob = rng.randbytes(payload_size(rng, max_payload))
        want = (tag, len(blob), hashlib.md5(blob).hexdigest(), blob[:16])
        return kind, job_echo, (tag, blob), (), (), lambda r, t: r == want
    if kind == "reverse":
        blob = rng.randbytes(payload_size(rng, max_payload))
        want = (tag, blob[::-1])
        return kind, job_reverse, (tag, blob), (), (), lambda r, t: r == want
    if kind == "primes":
        n = rng.randrange(100, 20000)
        want = (tag, sum(x for x in range(2, n) if isprime(x)))
        return kind, job_primes, (tag, n), (isprime,), (), lambda r, t: r == want
    if kind == "sleep":
        seconds = round(rng.uniform(0.01, 0.4), 3)
        want = (tag, seconds, True)
        return kind, job_sleep, (tag, seconds), (), (), lambda r, t: r == want
    if kind == "print":
        times = rng.randrange(1, 20)
        want = (tag, times * 3)
        lines = ["soak-line %s %d" % (tag, k) for k in range(times)]
        return kind, job_print, (tag, times), (), (), \
            lambda r, t: r == want and all(line in t for line in lines)
    want_text = "soak-raise %s" % tag
    return kind, job_raise, (tag,), (), (), \
        lambda r, t: r is None and "ValueError" in t and want_text in t


def is_server_error(result, text):
    """None with ppserver's own text: the job's worker died (or no worker
    could be started for it)."""
    return result is None and "ppserver:" in text and (
        "died" in text or "could not be started" in text)


# --- client mode ---------------------------------------------------------------


def client_main(argv):
    """soak.py client HOST:PORT NAME SEED DURATION DEADLINE WINDOW MAXPAYLOAD OUT
    (the secret comes in $SOAK_SECRET)."""
    try:
        import ppft as pp
    except ImportError:  # pp 1.7.0
        import pp

    server_id, name, seed, duration, deadline, window, max_payload, out = argv
    seed, duration, deadline = int(seed), float(duration), float(deadline)
    window, max_payload = int(window), int(max_payload)
    rng = random.Random(seed)
    counts = collections.Counter()
    per_kind = collections.defaultdict(collections.Counter)
    problems = []

    def report(final=False):
        data = {"name": name, "final": final, "counts": dict(counts),
                "per_kind": {k: dict(v) for k, v in per_kind.items()},
                "problems": problems[:50], "outstanding": len(pending)}
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, out)

    pending = collections.deque()
    js = pp.Server(ncpus=0, ppservers=(server_id,), secret=os.environ["SOAK_SECRET"])
    connected_by = time.monotonic() + 60
    while js.autopp_list.get(server_id, 0) < 2:
        if time.monotonic() > connected_by:
            problems.append("could not connect to %s" % server_id)
            report(final=True)
            os._exit(2)
        time.sleep(0.05)

    end = time.monotonic() + duration
    last_report = 0.0
    n = 0
    while True:
        now = time.monotonic()
        while now < end and len(pending) < window:
            tag = "%s-%d" % (name, n)
            n += 1
            kind, func, args, deps, mods, check = make_job(rng, tag, max_payload)
            job = js.submit(func, args, deps, mods)
            pending.append((time.monotonic(), tag, kind, check, job))
            counts["submitted"] += 1
            per_kind[kind]["submitted"] += 1
        if not pending:
            break
        submitted, tag, kind, check, job = pending.popleft()
        while not job.finished and time.monotonic() - submitted < deadline:
            time.sleep(0.002)
        if not job.finished:
            counts["lost"] += 1
            per_kind[kind]["lost"] += 1
            problems.append("%s (%s): no answer within %.0f s" % (tag, kind, deadline))
        else:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink):
                result = job()
            text = sink.getvalue()
            counts["answered"] += 1
            if check(result, text):
                outcome = "correct"
            elif is_server_error(result, text):
                outcome = "error"
            else:
                outcome = "wrong"
                problems.append("%s (%s): wrong answer %r / %r"
                                % (tag, kind, repr(result)[:200], text[-300:]))
            counts[outcome] += 1
            per_kind[kind][outcome] += 1
        if time.monotonic() - last_report > 1.0:
            report()
            last_report = time.monotonic()
    report(final=True)
    # ppft's destroy() can wait on connections; a lost job would block it.
    os._exit(0)


# --- driver: the server from outside --------------------------------------------


def stat_fields(pid):
    try:
        data = Path("/proc/%d/stat" % pid).read_bytes()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[1])


def children(pid):
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields and fields[1] == pid:
                found[int(entry)] = fields[0]
    return found


def is_worker(pid):
    try:
        argv = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in argv]
    return "-m" in argv and argv.index("-m") + 1 < len(argv) \
        and argv[argv.index("-m") + 1] in WORKER_MODULES


def workers_of(pid):
    kids = children(pid)
    live = {p for p, s in kids.items() if s != "Z" and is_worker(p)}
    zombies = {p for p, s in kids.items() if s == "Z"}
    return live, zombies


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def rss_kib(pid):
    try:
        for line in Path("/proc/%d/status" % pid).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame(payload):
    return struct.pack("!Q", len(payload)) + payload


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_frame(sock):
    (n,) = struct.unpack("!Q", recv_exact(sock, 8))
    return recv_exact(sock, n)


NAP_PACKAGE = None


def churn_once(port, secret, rng):
    """One misbehaving connection; returns its kind. Any error from the
    server closing on us is fine: only the server surviving matters."""
    global NAP_PACKAGE
    try:
        import dill
    except ImportError:  # pp 1.7.0 pickles with pickle
        import pickle as dill
    if NAP_PACKAGE is None:
        NAP_PACKAGE = dill.dumps(
            ("nap", ["def nap(s):\n    import time\n    time.sleep(s)\n"], ()), 2)
    kind = rng.choice(["wrong secret", "oversize header", "half header", "abandoned job",
                       "silent"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if kind == "silent":
                return kind
            recv_frame(sock)
            nonce = recv_frame(sock)
            if kind == "oversize header":
                sock.sendall(struct.pack("!Q", 1 << 62))
                return kind
            if kind == "half header":
                sock.sendall(b"\0\0\0\0")
                return kind
            good = hashlib.sha1(nonce + secret.encode()).hexdigest().encode()
            if kind == "wrong secret":
                sock.sendall(frame(hashlib.sha1(nonce + b"nope").hexdigest().encode()))
                recv_frame(sock)
                return kind
            sock.sendall(frame(good))
            recv_frame(sock)
            sock.sendall(frame(b"EXEC"))
            sock.sendall(frame(b"N" + NAP_PACKAGE) + frame(dill.dumps((0.1,), 2)))
            return kind
    except (OSError, EOFError):
        return kind + " (closed early)"


DIGEST_PACKAGE = None


def raw_session(port, secret, source=None, timeout=30):
    """An authenticated EXEC connection over a plain socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    recv_frame(sock)
    nonce = recv_frame(sock)
    sock.sendall(frame(hashlib.sha1(nonce + secret.encode()).hexdigest().encode()))
    if recv_frame(sock) != b"OK":
        raise OSError("login refused")
    sock.sendall(frame(b"EXEC"))
    return sock


def big_job_once(port, secret, size):
    """One job whose argument is `size` random bytes, answered with their
    sha256, checked against what was sent; returns "ok", "wrong", "none:
    REASON" (a job the server answered with None and its reason, such as a
    killed worker) or "failed: ..." (connection trouble counts as failed,
    not lost: the point is that the server answers what it accepted)."""
    global DIGEST_PACKAGE
    try:
        import dill
    except ImportError:
        import pickle as dill
    if DIGEST_PACKAGE is None:
        DIGEST_PACKAGE = dill.dumps(
            ("digest", ["def digest(blob):\n    import hashlib\n"
                        "    return hashlib.sha256(blob).hexdigest()\n"], ()), 2)
    blob = os.urandom(size)
    expected = hashlib.sha256(blob).hexdigest()
    try:
        with raw_session(port, secret, timeout=300) as sock:
            sock.sendall(frame(b"N" + DIGEST_PACKAGE))
            sock.sendall(frame(dill.dumps((blob,), 2)))
            del blob
            result, text = dill.loads(recv_frame(sock))
            if result is None and text:
                low = text.lower()
                reason = "worker died" if "died" in low else low.split(":")[0][:40]
                return "none: %s" % reason
            return "ok" if result == expected else "wrong"
    except (OSError, EOFError) as exc:
        return "failed: %s" % type(exc).__name__


class Flood:
    """Holds `count` silent sockets from `source`, opening a new one for
    every one the server closes: a host without the secret trying to keep
    real clients out."""

    def __init__(self, port, count, source="127.0.0.2"):
        self.port, self.count, self.source = port, count, source
        self.opened = 0
        self.refused = 0
        self.socks = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open_one(self):
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                            source_address=(self.source, 0))
            sock.setblocking(False)
            self.socks.append(sock)
            self.opened += 1
        except OSError:
            self.refused += 1

    def run(self):
        import select
        while not self.stop.is_set():
            while len(self.socks) < self.count and not self.stop.is_set():
                self.open_one()
            readable, _, _ = select.select(self.socks, [], [], 0.5) if self.socks else ([], [], [])
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:  # closed by the server: reopen
                    self.socks.remove(sock)
                    sock.close()
        for sock in self.socks:
            sock.close()


class Soak:
    def __init__(self, opts):
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="ppserver-soak-"))
        self.secret = secrets.token_hex(16)
        self.server = None
        self.clients = []
        self.seen_workers = set()
        self.kills = []
        self.samples = []
        self.churn = collections.Counter()
        self.big = collections.Counter()
        self.flood = None
        self.failures = []
        self.stop_event = threading.Event()

    # -- lifecycle --

    def start_server(self):
        port = free_port()
        argv = [str(self.opts.binary), "-i", "127.0.0.1", "-p", str(port),
                "-w", str(self.opts.workers), "--python", self.opts.python]
        if self.opts.memory_limit:
            argv += ["--memory-limit", self.opts.memory_limit]
        env = dict(os.environ, PPSERVER_SECRET=self.secret, PYTHONPATH=str(self.tmp))
        self.log_path = self.tmp / "server.log"
        with open(self.log_path, "wb") as log:
            self.server = subprocess.Popen(argv, cwd=str(self.tmp), env=env,
                                           stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        self.port = port
        deadline = time.monotonic() + 30
        while True:
            if self.server.poll() is not None:
                raise SystemExit("server exited at startup:\n" + self.log_tail())
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not listen within 30 s:\n" + self.log_tail())
                time.sleep(0.1)
        self.wait_pool(60)

    def wait_pool(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            live, zombies = workers_of(self.server.pid)
            self.seen_workers |= live
            if len(live) == self.opts.workers and not zombies:
                return live
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def start_clients(self):
        env = dict(os.environ, SOAK_SECRET=self.secret)
        env.pop("PYTHONPATH", None)
        for i in range(self.opts.clients):
            name = "c%d" % i
            out = self.tmp / ("%s.json" % name)
            argv = [self.opts.python, str(Path(__file__).resolve()), "client",
                    "127.0.0.1:%d" % self.port, name, str(self.opts.seed * 1000 + i),
                    str(self.opts.duration), str(self.opts.job_deadline), str(self.opts.window),
                    str(self.opts.max_payload), str(out)]
            errf = open(self.tmp / ("%s.stderr" % name), "wb")
            proc = subprocess.Popen(argv, cwd=str(self.tmp), env=env, stdin=subprocess.DEVNULL,
                                    stdout=errf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            errf.close()
            self.clients.append((name, proc, out))

    def cleanup(self):
        """Stop everything this run started; safe to call twice."""
        self.stop_event.set()
        for _, proc, _ in self.clients:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.server is not None:
            if self.server.poll() is None:
                self.seen_workers |= workers_of(self.server.pid)[0]
                self.server.send_signal(signal.SIGTERM)
                try:
                    self.server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.server.kill()
                    self.server.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.server.pid, signal.SIGKILL)
        for pid in self.seen_workers:
            fields = stat_fields(pid)
            if fields and fields[0] != "Z" and is_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # -- during the run --

    def churn_loop(self):
        port, rng = self.port, random.Random(self.opts.seed + 1)
        while not self.stop_event.wait(self.opts.churn_every):
            self.churn[churn_once(port, self.secret, rng)] += 1

    def big_loop(self):
        while not self.stop_event.wait(self.opts.big_every):
            outcome = big_job_once(self.port, self.secret, self.opts.big_size)
            self.big[outcome] += 1
            if outcome == "wrong":
                self.failures.append("a big job was answered wrongly")

    def answered_so_far(self):
        total = 0
        for _, _, out in self.clients:
            with contextlib.suppress(OSError, ValueError):
                total += json.loads(out.read_text())["counts"].get("answered", 0)
        return total

    def sample(self, t0):
        pid = self.server.pid
        live, zombies = workers_of(pid)
        self.seen_workers |= live
        self.samples.append({"t": time.monotonic() - t0, "rss_kib": rss_kib(pid),
                             "fds": fd_count(pid), "workers": len(live),
                             "zombies": len(zombies), "answered": self.answered_so_far()})
        s = self.samples[-1]
        if not self.opts.quiet:
            print("  t=%6.1fs  rss=%7.1f MiB  fds=%4d  workers=%d  zombies=%d  answered=%d"
                  % (s["t"], s["rss_kib"] / 1024, s["fds"], s["workers"], s["zombies"],
                     s["answered"]), flush=True)

    def kill_one(self, t0):
        live, _ = workers_of(self.server.pid)
        self.seen_workers |= live
        if not live:
            return
        victim = self.rng.choice(sorted(live))
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
            self.kills.append((time.monotonic() - t0, victim))

    def run(self):
        o = self.opts
        print("soak: %s, %d workers, %d clients, %.0f s, kill every %s s, payloads 0..%d bytes"
              % (o.binary, o.workers, o.clients, o.duration, o.kill_every or "never",
                 o.max_payload), flush=True)
        print("soak: work dir %s" % self.tmp, flush=True)
        self.start_server()
        pid = self.server.pid
        time.sleep(0.5)
        fd_start, rss_start = fd_count(pid), rss_kib(pid)
        t0 = time.monotonic()
        self.sample(t0)
        self.start_clients()
        churn = None
        if o.churn_every > 0:
            churn = threading.Thread(target=self.churn_loop, daemon=True)
            churn.start()
        big = None
        if o.big_every > 0:
            big = threading.Thread(target=self.big_loop, daemon=True)
            big.start()
        if o.flood > 0:
            self.flood = Flood(self.port, o.flood)
            self.flood.thread.start()
        next_kill = t0 + (o.kill_every or float("inf"))
        next_sample = t0 + o.sample_every
        end = t0 + o.duration
        server_died = False
        while time.monotonic() < end:
            if self.server.poll() is not None:
                server_died = True
                break
            now = time.monotonic()
            if now >= next_kill:
                self.kill_one(t0)
                next_kill += o.kill_every
            if now >= next_sample:
                self.sample(t0)
                next_sample += o.sample_every
            time.sleep(0.05)
        self.stop_event.set()
        if churn:
            churn.join(15)
        if big:
            big.join(600)
        if self.flood:
            self.flood.stop.set()
            self.flood.thread.join(15)

        # Clients stop submitting at the end of the duration and drain; a
        # lost job costs each at most --job-deadline more seconds.
        client_deadline = time.monotonic() + o.job_deadline + 60
        for name, proc, _ in self.clients:
            try:
                proc.wait(timeout=max(1.0, client_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.failures.append("client %s did not finish (killed)" % name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.returncode not in (0, None):
                self.failures.append("client %s exited with %s" % (name, proc.returncode))
        if self.server.poll() is not None:
            server_died = True
        if server_died:
            self.failures.append("the server exited (code %s) during the run"
                                 % self.server.returncode)

        fd_end = rss_end = None
        if not server_died:
            self.sample(t0)
            if self.wait_pool(60) is None:
                live, zombies = workers_of(pid)
                self.failures.append("pool not back to %d workers at the end (live %s, "
                                     "zombies %s)" % (o.workers, sorted(live), sorted(zombies)))
            # Closed connections are noticed when next read: let fds settle.
            deadline = time.monotonic() + 20
            while fd_count(pid) > fd_start + 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            fd_end, rss_end = fd_count(pid), rss_kib(pid)
            if fd_end > fd_start + 2:
                self.failures.append("fd count %d at the end, %d at the start" % (fd_end, fd_start))
        return self.report(fd_start, fd_end, rss_start, rss_end)

    def report(self, fd_start, fd_end, rss_start, rss_end):
        counts = collections.Counter()
        per_kind = collections.defaultdict(collections.Counter)
        problems, outstanding = [], 0
        for name, _, out in self.clients:
            try:
                data = json.loads(out.read_text())
            except (OSError, ValueError):
                self.failures.append("client %s left no report" % name)
                continue
            counts.update(data["counts"])
            for k, v in data["per_kind"].items():
                per_kind[k].update(v)
            problems += data["problems"]
            if not data["final"]:
                outstanding += data["outstanding"]
                self.failures.append("client %s did not finish: %d jobs unaccounted for"
                                     % (name, data["outstanding"]))
        lost = counts["lost"] + outstanding
        print()
        print("== ppserver soak report ==")
        print("duration %.0f s, %d workers, %d clients, %d worker kills, kill every %s s"
              % (self.opts.duration, self.opts.workers, self.opts.clients, len(self.kills),
                 self.opts.kill_every or "never"))
        print("jobs submitted           %7d" % counts["submitted"])
        print("answered                 %7d" % counts["answered"])
        print("  correct                %7d" % counts["correct"])
        print("  answered with error    %7d   (None + worker-died text)" % counts["error"])
        print("  wrong                  %7d" % counts["wrong"])
        print("lost                     %7d" % lost)
        print("per kind (submitted/correct/error/wrong/lost):")
        for kind in KINDS:
            c = per_kind.get(kind, collections.Counter())
            print("  %-8s %6d %6d %6d %6d %6d" % (kind, c["submitted"], c["correct"],
                                                  c["error"], c["wrong"], c["lost"]))
        print("misbehaving connections: %s" % (dict(self.churn) or "none"))
        if self.opts.big_every > 0:
            print("big jobs (%d random bytes each, answered with their sha256, checked): %s"
                  % (self.opts.big_size, dict(self.big) or "none"))
        if self.flood:
            print("flood from %s: %d silent sockets held, %d opened in all, %d refused"
                  % (self.flood.source, self.flood.count, self.flood.opened,
                     self.flood.refused))
        print("server RSS over time (MiB): %s" % ", ".join(
            "%.0fs:%.1f" % (s["t"], s["rss_kib"] / 1024) for s in self.samples))
        print("server RSS start %.1f MiB, end %s MiB, max %.1f MiB" % (
            rss_start / 1024, "%.1f" % (rss_end / 1024) if rss_end else "-",
            max(s["rss_kib"] for s in self.samples) / 1024))
        print("server fds start %d, end %s; max during run %d" % (
            fd_start, fd_end if fd_end is not None else "-", max(s["fds"] for s in self.samples)))
        print("worker pids seen: %d" % len(self.seen_workers))
        if counts["submitted"] != counts["answered"] + counts["lost"] + outstanding:
            self.failures.append("submitted != answered + lost")
        if lost:
            self.failures.append("%d jobs lost" % lost)
        if counts["wrong"]:
            self.failures.append("%d wrong answers" % counts["wrong"])
        if counts["submitted"] == 0:
            self.failures.append("no job was submitted")
        if self.opts.kill_every and counts["error"] > len(self.kills):
            self.failures.append("more error answers (%d) than kills (%d)"
                                 % (counts["error"], len(self.kills)))
        for p in problems[:20]:
            print("  problem: %s" % p)
        if self.failures:
            print("FAIL: " + "; ".join(self.failures))
            print("--- server log tail (%s) ---\n%s" % (self.log_path, self.log_tail()))
            return 1
        print("PASS")
        return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description="ppserver soak test (see the module docstring)")
    p.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    p.add_argument("--kill-every", type=float, default=3.0,
                   help="SIGKILL a random worker every this many seconds (0: never; default 3)")
    p.add_argument("--workers", type=int, default=3, help="server workers (default 3)")
    p.add_argument("--clients", type=int, default=4, help="ppft client processes (default 4)")
    p.add_argument("--window", type=int, default=8, help="jobs in flight per client (default 8)")
    p.add_argument("--max-payload", type=int, default=MB, help="largest payload (default 1 MiB)")
    p.add_argument("--job-deadline", type=float, default=60.0,
                   help="a job not answered this many seconds after submission is lost")
    p.add_argument("--sample-every", type=float, default=5.0, help="sampling period (s)")
    p.add_argument("--churn-every", type=float, default=0.5,
                   help="one misbehaving raw connection every this many s (0: none)")
    p.add_argument("--flood", type=int, default=0,
                   help="silent sockets held from 127.0.0.2, reopened when closed (default 0)")
    p.add_argument("--big-every", type=float, default=0.0,
                   help="one job with a --big-size argument every this many s (0: none)")
    p.add_argument("--big-size", type=int, default=64 * MB,
                   help="argument bytes of the big jobs (default 64 MiB)")
    p.add_argument("--memory-limit", default=None,
                   help="the server's --memory-limit (default: its own default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "ppserver")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for workers and clients (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    p.add_argument("--quiet", action="store_true", help="no per-sample lines")
    return p.parse_args(argv)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        return client_main(sys.argv[2:])
    opts = parse_args(sys.argv[1:])
    if not opts.binary.exists():
        raise SystemExit("no server binary at %s (cargo build --release)" % opts.binary)
    soak = Soak(opts)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)

    # Explicitly: a shell starting us in the background may have left
    # SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 1
    try:
        code = soak.run()
    except KeyboardInterrupt:
        print("\nsoak: interrupted; stopping everything", flush=True)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        soak.cleanup()
        if opts.keep or code != 0:
            print("soak: logs kept in %s" % soak.tmp)
        else:
            shutil.rmtree(soak.tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
