"""--users: several users, each with a secret of their own.

- Two users with their own secrets run jobs at once from real clients; a
  third secret is refused; the log and the metrics name each user.
- The -s secret is one more user, "default"; without it only the file's
  users log in.
- A mistake in the users file stops the server at startup, naming the
  file, the line and the user; a file others can read is a warning.
"""

import os
import subprocess
import threading

import pytest

import pphelpers
import serverprocs as sp

pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(reason="ppft's server has one secret"),
]


def users_file(tmp_path, text, mode=0o600):
    path = tmp_path / "users"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def square(x):
    return x * x


def run_jobs(server, secret, n, out, key):
    js = pphelpers.connect_client(server, secret=secret)
    try:
        jobs = [js.submit(square, (i,)) for i in range(n)]
        out[key] = [job() for job in jobs]
    finally:
        pphelpers.close_client(js)


def test_two_users_run_jobs_at_once_and_a_third_secret_is_refused(launch, tmp_path):
    path = users_file(tmp_path, "[alice]\nsecret = alice-secret\n\n[bob]\nsecret = bob-secret\n")
    port = pphelpers.free_port()
    server = launch("--users", path, "--metrics", "127.0.0.1:%d" % port, "-d",
                    nworkers=2, with_secret=False, secret="alice-secret")
    results = {}
    threads = [threading.Thread(target=run_jobs, args=(server, s, 30, results, s))
               for s in ("alice-secret", "bob-secret")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = [i * i for i in range(30)]
    assert results == {"alice-secret": expected, "bob-secret": expected}, server.log_tail()
    assert sp.handshake_reply(server, "carol-secret") == b"FAILED"
    # No -s: pp's public default secret is nobody's.
    assert sp.handshake_reply(server, "epo20pdosl;dksldkmm") == b"FAILED"

    server.logged("2 users from %s" % path)
    # Logged before the startup line if at all: with --users and no -s,
    # pp's public secret is refused, so there is nothing to warn about.
    assert "public default secret" not in server.log(), server.log_tail()
    server.logged("alice@127.0.0.1:")
    server.logged("bob@127.0.0.1:")
    _, page = pphelpers.metrics_get(port, "/metrics")
    s = pphelpers.metric_samples(page)
    assert s[("ppserver_jobs_received_total", '{user="alice"}')] == 30, page
    assert s[("ppserver_jobs_answered_total", '{user="bob"}')] == 30, page
    assert ("ppserver_jobs_received_total", '{user="default"}') not in s, page
    assert s[("ppserver_failed_logins_total", "")] == 2, page


def test_the_s_secret_is_the_default_user(launch, tmp_path):
    path = users_file(tmp_path, "[alice]\nsecret = alice-secret\n")
    server = launch("--users", path)
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0] == 42
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (1, 2), secret="alice-secret")[0] == 3
    assert sp.handshake_reply(server, "bob-secret") == b"FAILED"
    server.logged("2 users from %s (default, alice)" % path)


@pytest.mark.parametrize("text, where", [
    ("[alice]\nsecret = same\n[bob]\nsecret = same\n", 'line 4, user "bob": the same secret'),
    ("[alice]\nsecret = a\nmax_worker = 2\n", 'line 3, user "alice": unknown key "max_worker"'),
    ("[alice]\nweight = 2\n", 'line 1, user "alice": no secret'),
    ("[alice]\nsecret = a\nweight = many\n", 'line 3, user "alice": weight = "many"'),
])
def test_a_mistake_in_the_users_file_is_a_startup_error(tmp_path, text, where):
    path = users_file(tmp_path, text)
    argv = pphelpers.server_command("-p", "0", "--users", path)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "users file %s, %s" % (path, where) in done.stderr, done.stderr


def test_a_users_file_others_can_read_is_a_warning(launch, tmp_path):
    path = users_file(tmp_path, "[alice]\nsecret = alice-secret\n", mode=0o644)
    server = launch("--users", path)
    server.logged("can be read by group or others")
