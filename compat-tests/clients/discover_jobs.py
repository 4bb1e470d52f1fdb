"""An unmodified pp client that finds its server by autodiscovery.

Usage: discover_jobs.py PORT SECRET NJOBS

Creates ``Server(ncpus=0, ppservers=("*:PORT",), secret=SECRET)`` (UDP
broadcast discovery, no server address given), prints ``started``, submits
NJOBS jobs (defined here in __main__, so their source is shipped), waits
(bounded) until a server has been found, collects the results and prints one
JSON line {"results", "bad", "servers"}; exits 0 if every result is right.
"""

import json
import sys
import time

from ppclient import pp


def cube(i):
    import os

    return i, i ** 3, os.getpid()


def main():
    port, secret, njobs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    js = pp.Server(ncpus=0, ppservers=("*:%d" % port,), secret=secret)
    print("started", flush=True)
    jobs = [js.submit(cube, (i,)) for i in range(njobs)]

    deadline = time.monotonic() + 60
    while not any(count for count in js.autopp_list.values()):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "no server discovered within 60 s",
                              "autopp_list": js.autopp_list}), flush=True)
            return 2
        time.sleep(0.05)

    results = [job() for job in jobs]
    bad = [[i, repr(r)] for i, r in enumerate(results) if r is None or tuple(r[:2]) != (i, i ** 3)]
    servers = sorted(k for k in js.get_stats() if k != "local")
    print(json.dumps({"results": len(results), "bad": bad, "servers": servers,
                      "pids": sorted({r[2] for r in results if r})}), flush=True)
    js.destroy()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
