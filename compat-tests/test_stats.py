"""Job statistics a ppft client reads from the server (STAT connection).

Three workers, so a hard-coded worker count cannot pass.
"""

import time

PPSERVER_WORKERS = 3


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_get_stats_reports_workers_and_job_time(pp_client, ppserver):
    """get_stats()["host:port"] has ncpus == the server's worker count and a
    float job time >= 0, which is > 0 once jobs that sleep have run."""
    stats = pp_client.get_stats()
    assert ppserver.id in stats, "server missing from get_stats(): %r" % list(stats)
    entry = stats[ppserver.id]
    assert entry.ncpus == ppserver.nworkers
    assert isinstance(entry.time, float)
    assert entry.time >= 0.0

    jobs = [pp_client.submit(nap, (0.2,), modules=("time",)) for _ in range(6)]
    assert [job() for job in jobs] == [0.2] * 6

    entry = pp_client.get_stats()[ppserver.id]
    assert entry.ncpus == ppserver.nworkers
    assert isinstance(entry.time, float)
    assert entry.time > 0.0
    assert entry.njobs == 6  # counted by the client, sanity check of the setup


def test_print_stats_names_the_server(pp_client, ppserver, capsys):
    """print_stats() prints a row for the server (it only lists servers that
    ran jobs), with the time the server reports."""
    jobs = [pp_client.submit(nap, (0.05,), modules=("time",)) for _ in range(4)]
    assert [job() for job in jobs] == [0.05] * 4
    capsys.readouterr()
    pp_client.print_stats()
    out = capsys.readouterr().out
    assert "Job execution statistics" in out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(ppserver.id)]
    assert len(rows) == 1, out
    fields = [f.strip() for f in rows[0].split("|")]
    assert int(fields[0]) == 4  # job count
    assert float(fields[2]) > 0.0  # job time sum, as reported by the server
