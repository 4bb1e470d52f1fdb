"""Sharing a server between users (--users): what it costs.

Run through scripts/bench-users, which creates the venv and builds the
release binary first; this file runs with bench/.venv-ppft's python and
uses bench/benchlib.py's process handling and servers and bench/client.py's
clients (real ppft 1.7.8 clients, tiny jobs: a function returning its
argument, 2000 submitted at once, then collected and checked).

Three measurements, on -w 2 with ppft workers:

  two users   a server with a users file of two users (so --isolate user,
              the default): one client alone runs its tiny jobs, then two
              clients, one per user, released together, each run theirs;
              their total jobs/s from the first start to the last end
              against the one's. Workers go from one user to the other only
              by being replaced by fresh ones, so this is what isolation
              costs under fair share. Target: at least 50%.
  1000 users  tiny jobs/s of one client on a server with 1000 users in its
              users file (the client is the last user) against a server
              without a users file, and the server's CPU per 1000 jobs for
              both. Target: within 10%.
  logins      2000 handshakes one after the other on each of those two
              servers, answered with the last user's secret; the server's
              CPU time (utime + stime from /proc/PID/stat) over the run, per
              login. Target: at most 1 ms with 1000 users.

Rounds alternate between the configurations so that whatever else loads the
machine falls on all of them alike; figures are medians over the rounds.
Writes bench/users.md. Every process started here is in its own process
group and killed on the way out; everything that can block has a deadline.
"""

import argparse
import hashlib
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402  (processes, servers, clients)

ROUNDS = 5
TINY_JOBS = 2000
LOGINS = 2000
MANY_USERS = 1000
GLOBAL_DEADLINE = 5 * 60
CLIENT_TIMEOUT = 120
HEADER = struct.Struct("!Q")

TWO_USERS_MIN = 0.5  # two users' jobs/s against one alone
MANY_USERS_MIN = 0.9  # 1000 users' jobs/s against no users file
LOGIN_MAX_MS = 1.0


def secret_of(i):
    return "user %d's secret" % i


def users_file(path, count):
    with open(path, "w") as f:
        for i in range(count):
            f.write("[u%d]\nsecret = %s\n" % (i, secret_of(i)))
    os.chmod(path, 0o600)
    return path


def server_argv(*extra):
    return [str(B.BINARY), "-i", B.HOST, "-p", "{port}", "-w", str(B.WORKERS),
            "--python", str(B.PY_PPFT), "--worker-module", "ppft", *extra]


def tiny_run(servers, secrets, logdir, name):
    """One client per secret, all warmed up and released together, each
    running TINY_JOBS tiny jobs; (total jobs/s, wrong answers)."""
    clients = []
    try:
        for i, (server, secret) in enumerate(zip(servers, secrets)):
            cfg = B.client_cfg(server, 0, secret=secret, barrier=True,
                               phases=[{"name": "tiny", "n": TINY_JOBS, "reps": 1}])
            clients.append(B.Client(B.PY_PPFT, cfg, logdir / ("%s-%d.log" % (name, i)),
                                    logdir))
        B.wait_all(clients, "ready", CLIENT_TIMEOUT)
        for c in clients:
            c.go()
        results = B.wait_all(clients, "result", CLIENT_TIMEOUT)
    finally:
        for c in clients:
            c.close()
    runs = [r["tiny"][0] for r in results]
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    jobs = sum(r["n"] for r in runs)
    # The server's CPU over one client's run, per 1000 jobs (one client
    # only: two clients' windows overlap).
    cpu = runs[0]["server_cpu_s"] / runs[0]["n"] * 1e6 if len(runs) == 1 else None
    return jobs / wall, sum(r["wrong"] for r in runs), cpu


def recv_frame(sock):
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise B.BenchError("the server closed the connection in a handshake")
            data += chunk
        return data
    (length,) = HEADER.unpack(exact(HEADER.size))
    return exact(length)


def logins(server, secret, count):
    """Server CPU ms per login over `count` handshakes, one after the other."""
    ticks = os.sysconf("SC_CLK_TCK")
    before = sum(B.cpu_ticks(server.proc.pid))
    for _ in range(count):
        with socket.create_connection((B.HOST, server.port), timeout=30) as sock:
            recv_frame(sock)  # version
            nonce = recv_frame(sock)
            answer = hashlib.sha1(nonce + secret.encode()).hexdigest().encode()
            sock.sendall(HEADER.pack(len(answer)) + answer)
            reply = recv_frame(sock)
            if reply != b"OK":
                raise B.BenchError("login refused: %r" % reply)
            sock.sendall(HEADER.pack(4) + b"STAT")
            recv_frame(sock)  # the worker count
    after = sum(B.cpu_ticks(server.proc.pid))
    return (after - before) / ticks / count * 1000


def render(res, machine, seconds):
    def check(value, ok):
        return "PASS" if ok else "FAIL"

    two = res["two_users"] / res["one_user"]
    many = res["many_users"] / res["no_users"]
    lines = [
        "# Sharing a server between users: the cost",
        "",
        "Written by `scripts/bench-users` (bench/users.py) in %.0f s on %s, %s, commit %s, "
        "%s; load %s before the run. Medians of %d rounds; -w %d, ppft 1.7.8 clients and "
        "workers; tiny jobs: %d submitted at once per client, then collected."
        % (seconds, machine["cpu"], machine["cores"], machine["commit"], machine["date"],
           B.fmt(machine["load"], "%.2f"), ROUNDS, B.WORKERS, TINY_JOBS),
        "",
        "| measurement | figure | target | |",
        "|---|---|---|---|",
        "| one user alone, users file of 2 (--isolate user) | %s jobs/s, server CPU %s ms "
        "/ 1000 jobs | | |" % (B.fmt(res["one_user"]), B.fmt(res["one_user_cpu_ms"])),
        "| two users at once, each its own client | %s jobs/s (%.0f%%, %d user_switch "
        "replacements) | >= 50%% | %s |"
        % (B.fmt(res["two_users"]), two * 100, res["switches"], check(two, two >= TWO_USERS_MIN)),
        "| no users file | %s jobs/s, server CPU %s ms / 1000 jobs | | |"
        % (B.fmt(res["no_users"]), B.fmt(res["no_users_cpu_ms"])),
        "| %d users in the users file | %s jobs/s (%.0f%%), server CPU %s ms / 1000 jobs "
        "| >= 90%% | %s |"
        % (MANY_USERS, B.fmt(res["many_users"]), many * 100, B.fmt(res["many_users_cpu_ms"]),
           check(many, many >= MANY_USERS_MIN)),
        "| server CPU per login, no users file | %.3f ms | | |" % res["login_one"],
        "| server CPU per login, %d users | %.3f ms | <= %.0f ms | %s |"
        % (MANY_USERS, res["login_many"], LOGIN_MAX_MS,
           check(res["login_many"], res["login_many"] <= LOGIN_MAX_MS)),
        "",
        "Rounds (jobs/s): one user %s; two users %s; no users file %s; %d users %s."
        % (rates(res["one_user_runs"]), rates(res["two_users_runs"]),
           rates(res["no_users_runs"]), MANY_USERS, rates(res["many_users_runs"])),
        "",
        "Server CPU per 1000 jobs is the server's utime + stime over one client's run "
        "(/proc/PID/stat), which moves less than jobs/s on a shared 2-core machine; "
        "the two users' rate is against one user alone on the same server.",
        "",
        "A login with users computes every user's answer (sha1 of the nonce and the "
        "secret) and compares them all in constant time, so its cost grows with the "
        "users and does not depend on which one logs in; a login here is a whole "
        "handshake and a STAT connection's first answer, %d of them one after the other."
        % LOGINS,
        "",
    ]
    return "\n".join(lines)


def rates(values):
    return ", ".join(B.fmt(v) for v in values)


def user_switches(server):
    """user_switch replacements the server logged (-d)."""
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return 0
    return text.count("replaced by a fresh one for")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(B.BENCH / "users.md"), metavar="FILE")
    args = parser.parse_args()
    if not B.PY_PPFT.exists():
        sys.exit("missing %s: run scripts/bench-users, which sets it up" % B.PY_PPFT)
    B.arm(GLOBAL_DEADLINE)
    started = time.monotonic()
    machine = B.machine_info()
    logdir = Path(tempfile.mkdtemp(prefix="ppusers-"))
    res = {k: [] for k in ("one_user_runs", "two_users_runs", "no_users_runs",
                           "many_users_runs", "one_user_cpu", "two_users_cpu",
                           "no_users_cpu", "many_users_cpu")}
    try:
        two = B.start_server("two", server_argv(
            "-d", "--users", str(users_file(logdir / "two.users", 2))), logdir, logdir)
        many = B.start_server("many", server_argv(
            "--users", str(users_file(logdir / "many.users", MANY_USERS))), logdir, logdir)
        plain = B.start_server("plain", server_argv("-s", B.SECRET), logdir, logdir)
        last = secret_of(MANY_USERS - 1)
        for round_no in range(ROUNDS):
            print("round %d of %d" % (round_no + 1, ROUNDS), flush=True)
            for key, servers, secrets in [
                ("one_user_runs", [two], [secret_of(0)]),
                ("two_users_runs", [two, two], [secret_of(0), secret_of(1)]),
                ("no_users_runs", [plain], [B.SECRET]),
                ("many_users_runs", [many], [last]),
            ]:
                rate, wrong, cpu = tiny_run(servers, secrets, logdir, "%s-%d" % (key, round_no))
                if wrong:
                    raise B.BenchError("%s: %d wrong answers" % (key, wrong))
                res[key].append(rate)
                res[key.replace("_runs", "_cpu")].append(cpu)
        res["login_one"] = logins(plain, B.SECRET, LOGINS)
        res["login_many"] = logins(many, last, LOGINS)
        res["switches"] = user_switches(two)
        for server in (two, many, plain):
            server.stop()
    finally:
        B.cleanup_all()
    for key in ("one_user", "two_users", "no_users", "many_users"):
        res[key] = statistics.median(res[key + "_runs"])
        cpu = [c for c in res[key + "_cpu"] if c is not None]
        res[key + "_cpu_ms"] = statistics.median(cpu) if cpu else None
    text = render(res, machine, time.monotonic() - started)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
