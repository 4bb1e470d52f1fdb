"""An unmodified pp client that finds several servers by autodiscovery and
spreads its jobs over them.

Usage: cluster_jobs.py PORT SECRET NJOBS NSERVERS

Creates ``Server(ncpus=0, ppservers=("*:PORT",), secret=SECRET)`` (no server
address given: UDP broadcast discovery), prints ``started``, waits (bounded)
until it is connected to NSERVERS servers (a STAT connection and 2 EXEC
connections per worker each), then submits NJOBS jobs (defined here in
__main__, so their source is shipped) and prints one JSON line:
{"results": [[i, i*i, node, pid], ...] (None for a failed job),
"servers": {"host:port": {"ncpus", "njobs"}}}. Exits 0 after closing its
connections.
"""

import json
import sys

from ppclient import close, pp, wait_for


def square_where(i):
    """i, i squared, and which server ran it: each server of the test is
    started with its own PPTEST_NODE, which its workers inherit. The nap
    keeps a job on its server while the client submits the next ones, so
    the first jobs go to different servers."""
    import os
    import time

    time.sleep(0.2)
    return i, i * i, os.environ.get("PPTEST_NODE"), os.getpid()


def connected(js, nservers):
    """The remote servers of js with all their connections open (None until
    there are nservers of them)."""
    try:
        stats = js.get_stats()
    except RuntimeError:
        # "dictionary changed size during iteration": get_stats() iterates
        # the client's server table while discovery threads add to it.
        return None
    stats = {k: s for k, s in stats.items() if k != "local"}
    ready = {k: s for k, s in stats.items()
             if s.ncpus and js.autopp_list.get(k, 0) >= 2 * s.ncpus}
    return ready if len(ready) >= nservers else None


def main():
    port, secret, njobs, nservers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    js = pp.Server(ncpus=0, ppservers=("*:%s" % port,), secret=secret)
    print("started", flush=True)
    # Submitting only once every server is connected gives each of them a
    # job at once: the client hands each new job to the first free
    # connection, and a job naps long enough to keep its connection busy.
    wait_for(lambda: connected(js, nservers), "%d servers to be discovered" % nservers,
             timeout=60)
    jobs = [js.submit(square_where, (i,)) for i in range(njobs)]
    results = [job() for job in jobs]
    servers = {k: {"ncpus": s.ncpus, "njobs": s.njobs}
               for k, s in js.get_stats().items() if k != "local"}
    print(json.dumps({"results": [list(r) if r else None for r in results],
                      "servers": servers}), flush=True)
    close(js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
