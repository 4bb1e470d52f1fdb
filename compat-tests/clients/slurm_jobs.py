"""A pp client as a user runs it under examples/slurm/ppserver.sbatch: the
servers' addresses come from PPSERVERS, the secret from the file named by
PPSERVER_SECRET_FILE.

Usage: slurm_jobs.py OUT NJOBS MODE MARKS

Connects to every server listed (a STAT connection and 2 EXEC connections
per worker each), submits NJOBS jobs (defined here in __main__, so their
source is shipped) and writes one JSON object to OUT:
{"results": [[i, i*i, node, pid, saw_sigterm], ...] (None for a job
answered with None), "sigterm": whether this client got SIGTERM}. Each job
runs on the worker as it comes: its node is the Slurm node name its server
runs on (SLURMD_NODENAME, from the server's task), and it leaves a process
of its own behind (`sleep`, in its worker's process group) that must not
outlive the Slurm job.

MODE ``quick``: each job naps 0.2 s (so that the first jobs go to
different servers).

MODE ``held``: each job writes MARKS/started.I once it runs, then waits
until its worker gets SIGTERM (at most 120 s): scancel or the time limit,
aimed at every process of the job. Its SIGTERM handler passes the signal
on to the worker's own handler, or does what the default does (the worker
dies), so the job ends only after its worker has outlived the signal.

On SIGTERM the client goes on collecting the answers of the jobs it has
submitted (the servers' drain sends them), then writes OUT and exits 0.
"""

import json
import os
import signal
import sys

from ppclient import close, pp, wait_for

got_sigterm = []


def quick_job(i, marks):
    import os
    import subprocess
    import time

    subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    return i, i * i, os.environ.get("SLURMD_NODENAME"), os.getpid(), None


def held_job(i, marks):
    import os
    import signal
    import subprocess
    import time

    subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    seen = []
    before = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        seen.append(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        path = os.path.join(marks, "started.%d" % i)
        with open(path + ".tmp", "w") as f:
            f.write("%s %d" % (os.environ.get("SLURMD_NODENAME"), os.getpid()))
        os.rename(path + ".tmp", path)
        deadline = time.time() + 120
        while not seen and time.time() < deadline:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, before)
    return i, i * i, os.environ.get("SLURMD_NODENAME"), os.getpid(), bool(seen)


def connected(js, servers):
    """True once js has every server's connections open."""
    try:
        stats = js.get_stats()
    except RuntimeError:  # the client's table changed while it was read
        return False
    return all(s in stats and stats[s].ncpus and js.autopp_list.get(s, 0) >= 2 * stats[s].ncpus
               for s in servers)


def main():
    out, njobs, mode, marks = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    signal.signal(signal.SIGTERM, lambda signum, frame: got_sigterm.append(signum))
    servers = tuple(os.environ["PPSERVERS"].split(","))
    with open(os.environ["PPSERVER_SECRET_FILE"]) as f:
        secret = f.readline().strip()
    js = pp.Server(ncpus=0, ppservers=servers, secret=secret)
    # Submitting once every server is connected gives each of them jobs:
    # the client hands each job to the first free connection.
    wait_for(lambda: connected(js, servers), "the servers %s" % (servers,))
    job = {"quick": quick_job, "held": held_job}[mode]
    jobs = [js.submit(job, (i, marks)) for i in range(njobs)]
    results = [j() for j in jobs]
    with open(out + ".tmp", "w") as f:
        json.dump({"results": [list(r) if r else None for r in results],
                   "sigterm": bool(got_sigterm)}, f)
    os.rename(out + ".tmp", out)
    close(js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
