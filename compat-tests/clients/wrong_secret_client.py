"""A ppft client with a (presumably) wrong secret, run as its own process.

Usage: wrong_secret_client.py HOST:PORT SECRET

Waits until the client's connection thread has given up (bounded), then prints
one JSON line: the nodes the client got connected to and whether the server
shows up in its statistics.
"""

import json
import sys
import threading
import time

from ppclient import pp


def main():
    server_id, secret = sys.argv[1], sys.argv[2]
    js = pp.Server(ncpus=0, ppservers=(server_id,), secret=secret)
    deadline = time.monotonic() + 60
    while any(t.name == "connect1" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "connect1 thread still running after 60 s"}))
            return 2
        time.sleep(0.05)
    print(
        json.dumps(
            {
                "active_nodes": js.get_active_nodes(),
                "in_stats": server_id in js.get_stats(),
            }
        )
    )
    js.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
