"""Property-based fuzzing of config loading: the shipped local config with a value replaced,
a key dropped or an unknown key added, anywhere in it, is either accepted or refused with a
``ConfigError`` (the one-line error `floodwall up` and `check` print), never a traceback from
parsing, building the filters or rendering Envoy's bootstrap.

Derandomized for CI; ``FLOODWALL_FUZZ_EXAMPLES`` and ``FLOODWALL_FUZZ_SEED`` search further.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from proxy.bootstrap import render
from proxy.config import ConfigError, parse_config
from proxy.process import build_chain
from tests.fuzzing import mutated
from tests.helpers import local_config_dict

EXAMPLES = int(os.environ.get("FLOODWALL_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("FLOODWALL_FUZZ_SEED", "0"))
LOCAL = local_config_dict()


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED == 0, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=mutated(st.just(LOCAL), edits=(1, 1, 2)))
def test_a_broken_config_is_a_config_error(data: Any) -> None:
    try:
        cfg = parse_config(data)
        chain = build_chain(cfg)
        render(cfg, chain, Path("/tmp/floodwall-fuzz"))
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), str(e)  # one line, as printed
        event("refused")
        return
    event("accepted")
