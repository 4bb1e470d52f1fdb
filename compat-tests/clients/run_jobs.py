"""A separate ppft client process that submits jobs and checks the results.

Usage: run_jobs.py HOST:PORT SECRET TAG NJOBS BARRIER_DIR NCLIENTS

The job functions are defined here, in __main__, so ppft's client ships their
source (with the dependent function) instead of an import statement.

Once fully connected, the client writes BARRIER_DIR/ready-TAG and waits until
NCLIENTS such files exist, so that all clients submit at the same time. Prints
one JSON line {"tag", "njobs", "bad", "pids"} and exits 0 if every result is
correct.
"""

import json
import math
import sys

from ppclient import connected_server, start_together

try:
    from dill.source import importable
except ImportError:  # pp 1.7.0 has no dill and always ships inspect's source
    importable = None


def isprime(n):
    """Returns True if n is prime and False otherwise"""
    if n < 2:
        return False
    i = 2
    while i <= int(math.sqrt(n)):
        if n % i == 0:
            return False
        i += 1
    return True


def work(tag, i):
    """Sum of primes below 500 + i, labelled so mixed-up results show."""
    # Imported here, not used as globals: dill.source would otherwise inline
    # the whole source of the os module into the shipped package.
    import os
    import time

    time.sleep(0.02)
    return tag, i, sum(x for x in range(2, 500 + i) if isprime(x)), os.getpid()


def main():
    # Self-check: this script is meant to exercise the source-shipping path.
    for func in (work, isprime) if importable else ():
        shipped = importable(func)
        assert "def %s(" % func.__name__ in shipped and " import %s" % func.__name__ \
            not in shipped, shipped

    server_id, secret, tag, njobs, barrier, nclients = sys.argv[1:7]
    njobs, nclients = int(njobs), int(nclients)
    js = connected_server(server_id, secret)
    start_together(barrier, tag, nclients)

    jobs = [js.submit(work, (tag, i), (isprime,), ("math",)) for i in range(njobs)]
    results = [job() for job in jobs]
    bad, pids = [], set()
    for i, result in enumerate(results):
        expected = sum(x for x in range(2, 500 + i) if isprime(x))
        if result is None or tuple(result[:3]) != (tag, i, expected):
            bad.append([i, repr(result)])
        else:
            pids.add(result[3])
    print(json.dumps({"tag": tag, "njobs": len(results), "bad": bad, "pids": sorted(pids)}))
    js.destroy()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
