"""docs/configuration.md is what `floodwall config-reference` generates from the typed
config today (so a new or changed field cannot go undocumented)."""

from __future__ import annotations

from proxy.config import REPO_ROOT
from proxy.reference import reference


def test_the_committed_reference_is_current() -> None:
    text = reference()
    committed = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert committed == text, "stale: run `floodwall config-reference > docs/configuration.md`"
    # Comments from the source made it in, constraints and defaults too.
    assert "| `max_depth` | int | `10000` | ≥ 1 | Unfinished jobs" in text
    assert "### jobs.params.worker" in text and "### processor" in text
