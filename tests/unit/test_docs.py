"""The filter-author guide's code runs as written (a doc that drifts from the API is worse
than none): its example filter is defined, then its harness test is run against it."""

from __future__ import annotations

import re
from typing import Any

from proxy.config import REPO_ROOT


async def test_writing_a_filter_examples_run() -> None:
    text = (REPO_ROOT / "docs" / "writing-a-filter.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "writing-a-filter.md", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_")]
    assert tests
    for test in tests:
        await test()
