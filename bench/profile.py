"""Where a server's time goes on the bulk run: perf or strace attached to it.

Usage (after scripts/bench has set up the venvs and built the binary):

    bench/.venv-ppft/bin/python bench/profile.py KEY TOOL [--rounds N] [--binary PATH]

KEY is a configuration of bench/bench.py with a server (ours-ppft, ppft-py,
pp170-py, ours-pp170); TOOL is `perf` (`perf record -g` on the server
process, then `perf report` by symbol), `strace` (`strace -c -f`: syscall
counts and times; slows the server down, so its rates mean nothing) or
`none` (the figures alone). It starts that server, attaches the tool, runs
one client doing N timed bulk runs (16 jobs of 16 MB each), and prints the
rates, the server's CPU time per job and its memory: peak, right after the
runs and once the server has been idle for a second. bench/profile.md says
what these showed.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the configurations and the bulk run's size)
import benchlib as B  # noqa: E402  (processes, servers, clients)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("key")
    parser.add_argument("tool", choices=("perf", "strace", "none"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", help="our server binary (default target/release/ppserver)")
    parser.add_argument("--output", default=None, help="perf.data / strace output path")
    args = parser.parse_args()

    cfg = {c.key: c for c in bench.configs()}[args.key]
    if not cfg.server_argv:
        sys.exit("%s has no server to profile" % args.key)
    argv = list(cfg.server_argv)
    if args.binary and argv[0] == B.BINARY:
        argv[0] = args.binary
    logdir = Path(tempfile.mkdtemp(prefix="ppprofile-"))
    workdir = logdir / "cwd"
    workdir.mkdir()
    out = args.output or str(logdir / ("perf.data" if args.tool == "perf" else "strace.txt"))
    server = B.start_server(args.key, argv, logdir, workdir)
    monitor = None
    try:
        pid = server.proc.pid
        if args.tool == "perf":
            monitor = subprocess.Popen(["perf", "record", "-F", "4000", "-g", "-o", out,
                                        "-p", str(pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif args.tool == "strace":
            monitor = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                                       stderr=subprocess.DEVNULL)
        time.sleep(1)
        user0, sys0 = B.cpu_ticks(pid)
        client_cfg = B.client_cfg(server, 0, phases=[
            {"name": "bulk", "jobs": bench.BULK_JOBS, "mb": bench.BULK_MB, "reps": args.rounds}])
        client = B.Client(cfg.client_python, client_cfg, logdir / "client.log", workdir)
        try:
            result = B.wait_all([client], "result", 300)[0]
        finally:
            client.close()
        user1, sys1 = B.cpu_ticks(pid)
        rss_now = B.proc_status(pid, "VmRSS")
        time.sleep(1)
        rss_idle = B.proc_status(pid, "VmRSS")
        if monitor:
            monitor.send_signal(2)
            monitor.wait(timeout=60)
        rates = [b["jobs"] * b["mb"] / b["seconds"] for b in result["bulk"]]
        # The client also sends one untimed bulk job first.
        jobs = args.rounds * bench.BULK_JOBS + 1
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        print("bulk MB/s: %s (median %.0f)" % (", ".join("%.0f" % r for r in rates),
                                              statistics.median(rates)))
        print("server CPU per %d MB job: %.1f ms (user %.1f, system %.1f)" % (
            bench.BULK_MB, (user1 + sys1 - user0 - sys0) * tick_ms / jobs,
            (user1 - user0) * tick_ms / jobs, (sys1 - sys0) * tick_ms / jobs))
        print("server memory: peak %.1f MiB, right after %.1f MiB, after 1 s idle %.1f MiB"
              % (B.proc_status(pid, "VmHWM") / 1024, rss_now / 1024, rss_idle / 1024))
    finally:
        if monitor and monitor.poll() is None:
            monitor.kill()
        server.stop()
        B.cleanup_all()
    if args.tool == "perf":
        report = subprocess.run(["perf", "report", "-i", out, "--no-children", "--sort", "sym",
                                 "--stdio", "-g", "none", "--percent-limit", "1"],
                                capture_output=True, text=True)
        print("\n".join(line for line in report.stdout.splitlines()
                        if line.strip() and not line.startswith("#")))
    elif args.tool == "strace":
        print(Path(out).read_text())


if __name__ == "__main__":
    main()
