"""The longest pause a client sees when the server reloads (SIGUSR2) under load.

Run through scripts/bench-reload, which creates the venv and builds the
release binary first; this file runs with bench/.venv-ppft's python (any
python with ppft 1.7.8 will do: `python bench/reload.py`) and uses
bench/benchlib.py's process handling.

One server (-w 2, ppft 1.7.8 workers) and one in-process ppft client that
keeps OUTSTANDING jobs submitted without a pause: tiny jobs, and every
LONG_EVERY-th a job that sleeps LONG_SECONDS, the longest job. While it
streams, the server is reloaded RELOADS times: SIGUSR2 to the process the
pid file names, then a wait until the new process is in the pid file and
the old one has exited, then STEADY seconds of streaming before the next.
The same length of streaming without a reload, first, gives the baseline.

For each reload: how long until the new process took over (the pid file
names it), how long the old one took to drain and exit, and the longest
pause between two answers from the SIGUSR2 to STEADY seconds after the
old process's exit. The issue's bound: the longest job plus 1 s.

Writes bench/reload.md. Every process started here is in its own process
group and killed on the way out; everything that can block has a deadline.
No figure is checked against a threshold: this measures, it does not test.
"""

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402  (processes, servers)

import ppft  # noqa: E402

RELOADS = 5
OUTSTANDING = 8
LONG_EVERY = 10
LONG_SECONDS = 1.0
STEADY = 2.0  # seconds of streaming after an old process exited
GLOBAL_DEADLINE = 120
STEP_TIMEOUT = 60  # a take-over, an old process's exit, the last answers


def nap(seconds):
    import time
    time.sleep(seconds)
    return seconds


class Stream(threading.Thread):
    """Keeps OUTSTANDING jobs submitted; records when each is answered."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.cond = threading.Condition()
        self.sent = 0
        self.answers = []  # (when, result, expected)
        self.stopping = False

    def run(self):
        while True:
            with self.cond:
                self.cond.wait_for(
                    lambda: self.stopping or self.sent - len(self.answers) < OUTSTANDING)
                if self.stopping:
                    return
                seconds = LONG_SECONDS if self.sent % LONG_EVERY == LONG_EVERY - 1 else 0.0
                self.sent += 1
            self.client.submit(nap, (seconds,), callback=self.done, callbackargs=(seconds,))

    def done(self, expected, result):
        with self.cond:
            self.answers.append((time.monotonic(), result, expected))
            self.cond.notify_all()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.join(STEP_TIMEOUT)
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.answers) >= self.sent, STEP_TIMEOUT):
                raise B.BenchError("%d of %d jobs never answered" % (
                    self.sent - len(self.answers), self.sent))

    def longest_pause(self, start, end):
        """The longest time between two answers (or the window's start and
        the first) in [start, end]."""
        with self.cond:
            times = [start] + [t for t, _, _ in self.answers if start <= t <= end]
        return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else end - start


def pid_in(path):
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(probe, what, timeout=STEP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise B.BenchError("no %s within %ds" % (what, timeout))
        time.sleep(0.01)


def gone(pid):
    st = B.stat_fields(pid)
    return st is None or st[0] in ("Z", "X")


def measure(binary, workdir):
    pid_file = workdir / "ppserver.pid"
    server = B.start_server("reload", [binary, "-i", B.HOST, "-p", "{port}", "-w", B.WORKERS,
                                       "-s", B.SECRET, "-P", pid_file, "--python",
                                       sys.executable], workdir, workdir)
    client = ppft.Server(ncpus=0, ppservers=(server.address,), secret=B.SECRET)
    stream = Stream(client)
    rows = []
    try:
        wait_for(lambda: client.autopp_list.get(server.address, 0) >= 2 * B.WORKERS,
                 "fully connected client")
        stream.start()
        wait_for(lambda: len(stream.answers) >= 50, "warm-up answers")
        t0 = time.monotonic()
        time.sleep(STEADY * 3)
        baseline = stream.longest_pause(t0, time.monotonic())
        for _ in range(RELOADS):
            old = wait_for(lambda: pid_in(pid_file), "pid file")
            sent = time.monotonic()
            os.kill(old, signal.SIGUSR2)
            new = wait_for(lambda: pid_in(pid_file) not in (None, old) and pid_in(pid_file),
                           "new process in the pid file")
            took_over = time.monotonic()
            wait_for(lambda: gone(old), "exit of the old process")
            old_exit = time.monotonic()
            time.sleep(STEADY)
            rows.append({
                "old": old, "new": new,
                "takeover": took_over - sent,
                "drain": old_exit - took_over,
                "pause": stream.longest_pause(sent, time.monotonic()),
            })
        stream.stop()
    finally:
        try:
            client.destroy()
        except Exception:
            pass
        # The last generation is in the first one's process group.
        server.stop()
    wrong = [a for a in stream.answers if a[1] != a[2]]
    if wrong:
        raise B.BenchError("%d wrong or None answers, e.g. %r" % (len(wrong), wrong[:3]))
    return baseline, rows, len(stream.answers)


def report(info, baseline, rows, answered):
    lines = [
        "# Reload under load",
        "",
        "Written by `scripts/bench-reload` (bench/reload.py): the longest pause a ppft "
        "1.7.8 client sees between two answers while the server (-w %d) is reloaded with "
        "SIGUSR2, %d times, under a stream of jobs (%d outstanding: tiny ones and every "
        "%dth a %.0f s one, the longest job). The issue's bound: the longest job plus 1 s."
        % (B.WORKERS, RELOADS, OUTSTANDING, LONG_EVERY, LONG_SECONDS),
        "",
        "- machine: %s, %s; %s" % (info["cpu"], info["cores"], info["kernel"]),
        "- commit: %s, %s; load average before: %s" % (info["commit"], info["date"],
                                                      info["load"]),
        "- jobs answered: %d, every one right" % answered,
        "- longest pause without a reload (%.0f s of streaming): %.2f s" % (STEADY * 3,
                                                                          baseline),
        "",
        "| reload | take-over s | old process drained and exited s | longest pause s |",
        "|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append("| %d | %.2f | %.2f | %.2f |" % (i, r["takeover"], r["drain"], r["pause"]))
    worst = max(r["pause"] for r in rows)
    lines += [
        "",
        "Longest pause over the reloads: %.2f s (bound: %.1f s). Take-over: SIGUSR2 to the "
        "new process in the pid file (its start: the interpreter probe, the fork-server, a "
        "worker up); meanwhile the old one serves. Drain: from then until the old process "
        "exited, at most the longest job it was running." % (worst, LONG_SECONDS + 1),
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=str(B.BINARY))
    parser.add_argument("--output", default=str(B.BENCH / "reload.md"))
    args = parser.parse_args()
    B.arm(GLOBAL_DEADLINE)
    info = B.machine_info()
    try:
        with tempfile.TemporaryDirectory(prefix="ppserver-bench-reload-") as tmp:
            baseline, rows, answered = measure(args.binary, Path(tmp))
    finally:
        B.cleanup_all()
    text = report(info, baseline, rows, answered)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
