"""Checks of README.md's benchmark paragraph: bench/bench.py's rendering of
it from a run's figures, and `bench.py --readme` rewriting a README copy
between its marker lines (and leaving it alone without them).

Runs nothing but bench.py itself, on temporary files, in a second:

    /work/main/compat-tests/.venv/bin/python -m pytest bench/test_readme.py -q

(any python with pytest; bench.py needs only the standard library here).
"""

import json
import subprocess
import sys
from pathlib import Path

import bench

BENCH_PY = Path(__file__).resolve().parent / "bench.py"

# The figures of bench/results.md's run at commit 3fc086e, as a run would
# write them to results.json (only what the paragraph reads, plus the rest
# of a machine entry).
DATA = {
    "only": None,
    "machine": {"cpu": "AMD EPYC", "cores": "2 online, 2 usable by this process",
                "cpus": 2, "kernel": "Linux 6.18.44", "python": "3.11.7",
                "rustc": "rustc 1.95.0", "commit": "3fc086e", "load": 2.32,
                "date": "2026-12-07 03:35 UTC", "load_before": 1.17},
    "total_s": 253.0,
    "pickles": {"2": {"wire_mb": 24.0, "dumps": 150.0, "loads": 140.0},
                "4": {"wire_mb": 16.0, "dumps": 3000.0, "loads": 4000.0}},
    "results": [
        {"key": "ours-ppft", "client_version": "1.7.8", "tiny_jobs_per_s": 1799.2,
         "bulk_mb_per_s": 84.7, "errors": []},
        {"key": "ppft-py", "client_version": "1.7.8", "tiny_jobs_per_s": 45.0,
         "bulk_mb_per_s": 79.1, "errors": []},
        {"key": "local", "client_version": "1.7.8", "tiny_jobs_per_s": 2500.4,
         "bulk_mb_per_s": 97.5, "errors": []},
    ],
    "fresh": {"r": [
        {"key": "ours-ppft-r-fork", "client_version": "1.7.8", "tiny_jobs_per_s": 182.3,
         "errors": []},
        {"key": "ppft-py-r", "client_version": "1.7.8", "tiny_jobs_per_s": 13.1,
         "errors": []},
    ], "replace": [], "memory": []},
}

PARAGRAPH = (
    "Latest `scripts/bench` run (2026-12-07, AMD EPYC, 2 cores, commit 3fc086e): "
    "1799 tiny jobs/s with the ppft 1.7.8 client against 45 for ppft's Python "
    "ppserver (40x) and 2500 with no server; bulk 85 MB/s against 79; `-r` by fork "
    "182 jobs/s against 13. Full tables: [bench/results.md](bench/results.md).")

BEFORE = "# ppserver\n\n## Speed\n\nSome text.\n\n"
AFTER = "\nMore text, kept as it is.\n| a | table |\n"
README = (BEFORE + bench.README_BEGIN + "\nAn older run's paragraph,\non two lines.\n"
          + bench.README_END + AFTER)


def run_readme(tmp_path, data, readme_text):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    proc = subprocess.run([sys.executable, str(BENCH_PY), "--readme", "--results",
                           str(results), "--readme-file", str(readme)],
                          capture_output=True, text=True, timeout=60)
    return proc, readme.read_text()


def test_paragraph_has_the_runs_figures_in_short_lines():
    text = bench.readme_paragraph(DATA)
    assert text.replace("\n", " ") == PARAGRAPH
    assert len(text.splitlines()) <= 4
    assert all(len(line) <= 78 for line in text.splitlines())


def test_missing_figures_read_na():
    data = dict(DATA, results=[], fresh={"r": [], "replace": [], "memory": []})
    data["machine"] = dict(DATA["machine"], commit="3fc086e (with uncommitted changes)")
    text = bench.readme_paragraph(data).replace("\n", " ")
    assert "commit 3fc086e with uncommitted changes):" in text
    assert "n/a tiny jobs/s" in text and "against n/a;" in text
    assert "(" not in text.split("):", 1)[1].split("Full tables")[0]


def test_readme_rewritten_between_markers_only(tmp_path):
    proc, text = run_readme(tmp_path, DATA, README)
    assert proc.returncode == 0, proc.stderr
    assert text.startswith(BEFORE + bench.README_BEGIN + "\n")
    assert text.endswith("\n" + bench.README_END + AFTER)
    middle = text[len(BEFORE + bench.README_BEGIN + "\n"):-len(bench.README_END + AFTER)]
    assert middle.replace("\n", " ").strip() == PARAGRAPH
    assert "older run" not in text
    # Again from the same figures: the same file.
    proc, again = run_readme(tmp_path, DATA, text)
    assert proc.returncode == 0, proc.stderr
    assert again == text


def test_readme_without_a_marker_pair_is_left_alone(tmp_path):
    for broken in (BEFORE + AFTER,
                   BEFORE + bench.README_BEGIN + "\n" + AFTER,
                   BEFORE + bench.README_END + "\nold\n" + bench.README_BEGIN + AFTER,
                   README + README,
                   README + bench.README_END + "\n",
                   # A marker inside a line is not a marker line.
                   BEFORE + "see " + bench.README_BEGIN + " x " + bench.README_END + AFTER):
        proc, text = run_readme(tmp_path, DATA, broken)
        assert proc.returncode == 1
        assert "warning" in proc.stderr
        assert text == broken


def test_figures_of_a_limited_run_are_refused(tmp_path):
    proc, text = run_readme(tmp_path, dict(DATA, only=["ours-ppft"]), README)
    assert proc.returncode != 0
    assert "--only" in proc.stderr
    assert text == README
