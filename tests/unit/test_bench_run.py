"""`floodwall bench`: the summary gathers every suite's results and plots, and a suite that
fails is reported as failed (with its log), never silently dropped."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import run
from proxy.cli import main
from proxy.config import REPO_ROOT


def test_summary_from_the_committed_results(tmp_path: Path) -> None:
    for f in (REPO_ROOT / "bench" / "results").iterdir():
        if f.suffix in (".json", ".md", ".png") and f.stem != "summary":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "rate_limit.png").unlink()  # a suite with no plot of its own: drawn here
    assert main(["bench", "--summary-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    for suite in run.SUITES:
        assert f"| {suite} | ok" in text
        # Every suite has a plot: its own, or the summary's bars of its numbers.
        assert (tmp_path / f"{suite}.png").stat().st_size > 1000, suite
    assert "![jobs](jobs.png)" in text and "\n## Drain" not in text  # headings demoted
    assert "### Drain" in text


def test_a_failing_suite_is_reported(tmp_path: Path) -> None:
    ran = run.run(["no_such_suite"], tmp_path, quick=True)
    assert ran["no_such_suite"]["exit"] != 0
    assert "No module named" in (tmp_path / "no_such_suite.log").read_text()
    shutil.copy(REPO_ROOT / "bench" / "results" / "jobs.md", tmp_path / "jobs.md")
    text = run.summary(tmp_path, {**ran, "jobs": {"exit": 3, "seconds": 1.0}})
    assert "| jobs | failed" in text


def test_the_interval_of_a_paired_median() -> None:
    from bench.gateway_overhead import median_ci

    # 12 pairs: x_(3)..x_(10) holds the median with 96% (x_(4)..x_(9): only 85%).
    assert median_ci([float(x) for x in range(12, 0, -1)]) == (3.0, 10.0)
    assert median_ci([float(x) for x in range(1, 21)]) == (6.0, 15.0)
    assert median_ci([2.0, 1.0, 3.0]) == (1.0, 3.0)  # too few pairs: the whole range
