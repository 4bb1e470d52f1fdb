"""Jobs submitted by an unmodified ppft client run correctly on the server.

How the job functions travel: ppft's client builds the function package with
dill.source.importable, which ships a function that lives in an importable
module (like the ones below) as ``from test_jobs import name``, so the workers
import this module (compat-tests/ is on the server's PYTHONPATH). Functions
defined in a script's ``__main__`` travel as source, with their dependent
functions: see test_sum_primes_script_ships_source and clients/run_jobs.py.
"""

import hashlib
import json
import math
import random
import threading

from pphelpers import finish_client_script, run_client_script
from userclasses import Polynomial, ScaledPolynomial

# --- job functions (their source travels to the workers) ---------------------


def isprime(n):
    """Returns True if n is prime and False otherwise"""
    if not isinstance(n, int):
        raise TypeError("argument passed to is_prime is not of 'int' type")
    if n < 2:
        return False
    if n == 2:
        return True
    max = int(math.ceil(math.sqrt(n)))
    i = 2
    while i <= max:
        if n % i == 0:
            return False
        i += 1
    return True


def sum_primes(n):
    """Calculates sum of all primes below given integer n"""
    return sum([x for x in range(2, n) if isprime(x)])


def square(x):
    return x * x


def tagged_square(i):
    return (i, i * i)


def evaluate_at(poly, x):
    return poly.evaluate(x)


def talk(n):
    print("job %d says hello" % n)
    print("second line from job %d" % n)
    return n + 1


def fail(message):
    raise ValueError(message)


def digest(data):
    return len(data), hashlib.sha256(data).hexdigest(), data[::-1]


# --- tests --------------------------------------------------------------------


def test_sum_primes_with_depfuncs_and_modules(pp_client):
    """ppft's own sum_primes example: a job with a dependent function
    (depfuncs) and a module to import (modules) gives the locally computed
    result for several inputs."""
    inputs = (100, 1000, 20000, 20100, 20200, 20300)
    jobs = [(n, pp_client.submit(sum_primes, (n,), (isprime,), ("math",))) for n in inputs]
    for n, job in jobs:
        assert job() == sum_primes(n), "sum of primes below %d" % n


def test_sum_primes_script_ships_source(ppserver, tmp_path):
    """The same from a client script whose job and dependent function live in
    __main__ (so their source is shipped, with modules=("math",)): every
    result equals the one the script computes locally."""
    proc = run_client_script("run_jobs.py", ppserver.id, ppserver.secret, "solo", 12, tmp_path, 1)
    code, out, err = finish_client_script(proc)
    assert code == 0, "client failed (%s)\nstdout:\n%s\nstderr:\n%s" % (code, out, err)
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["tag"], report["njobs"], report["bad"]) == ("solo", 12, [])


def test_callbacks_receive_callbackargs_and_result(pp_client):
    """callback(*callbackargs, result) runs for every job; all callbacks have
    run once wait() returns."""
    lock = threading.Lock()
    collected = {}

    def on_done(tag, factor, result):
        with lock:
            collected[tag] = (factor, result)

    expected = {}
    for i in range(12):
        tag = "job-%d" % i
        expected[tag] = (i % 3, i * i)
        pp_client.submit(square, (i,), callback=on_done, callbackargs=(tag, i % 3))
    pp_client.wait()
    assert collected == expected


def test_user_class_instances_as_arguments(pp_client):
    """Instances of user-defined classes (and a subclass) from a helper
    module work as job arguments: the job calls their method remotely."""
    cases = [
        (Polynomial([1, 2, 3]), 5),
        (Polynomial([0, 0, 0, 1]), -4),
        (ScaledPolynomial([7, -1], 3), 10),
    ]
    jobs = [pp_client.submit(evaluate_at, (poly, x)) for poly, x in cases]
    results = [job() for job in jobs]
    assert results == [poly.evaluate(x) for poly, x in cases]
    assert results == [86, -64, -9]


def test_user_class_module_imported_on_worker(pp_client):
    """The same with the helper module named in modules=: the worker imports
    it instead of receiving the class source."""
    poly = ScaledPolynomial([1, 1], 2)
    job = pp_client.submit(evaluate_at, (poly, 9), modules=("userclasses",))
    assert job() == 20


def test_job_stdout_reaches_client(pp_client, capsys):
    """What a job prints travels back with its result, and the client prints
    it when it unpickles the result."""
    capsys.readouterr()
    job = pp_client.submit(talk, (41,))
    assert job() == 42
    out = capsys.readouterr().out
    assert "job 41 says hello" in out
    assert "second line from job 41" in out


def test_job_exception_gives_none_and_server_keeps_working(pp_client, capsys, ppserver):
    """A job that raises yields None and the traceback text is printed by the
    client; later jobs on the same server (every worker) still work."""
    capsys.readouterr()
    n = 2 * ppserver.nworkers
    failing = [pp_client.submit(fail, ("boom-%d" % i,)) for i in range(n)]
    assert [job() for job in failing] == [None] * n
    out = capsys.readouterr().out
    assert "ValueError" in out
    assert "Traceback" in out
    for i in range(n):
        assert "boom-%d" % i in out

    good = [pp_client.submit(square, (i,)) for i in range(3 * n)]
    assert [job() for job in good] == [i * i for i in range(3 * n)]


def test_500_tiny_jobs_in_submission_order(pp_client):
    """500 tiny jobs all complete, and each result matches its own job when
    collected in submission order."""
    jobs = [pp_client.submit(tagged_square, (i,)) for i in range(500)]
    assert [job() for job in jobs] == [(i, i * i) for i in range(500)]


def test_8mb_argument_round_trip(pp_client):
    """An 8 MB bytes argument reaches the worker intact, and an 8 MB result
    comes back intact."""
    data = random.Random(1234).randbytes(8 * 1024 * 1024)
    job = pp_client.submit(digest, (data,), modules=("hashlib",))
    result = job()
    assert result is not None, "job failed on the worker"
    length, hexdigest, reversed_data = result
    assert length == len(data)
    assert hexdigest == hashlib.sha256(data).hexdigest()
    assert reversed_data == data[::-1]
