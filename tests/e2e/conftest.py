from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.runtime import Stack
from tests.helpers import echo_server, stack_config, start_stack

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Gateway:
    stack: Stack

    @property
    def url(self) -> str:
        c = self.stack.cfg.listener
        return f"http://{c.address}:{c.port}"

    @property
    def grpc_target(self) -> str:
        c = self.stack.cfg.listener
        return f"{c.address}:{c.port}"

    @property
    def metrics_url(self) -> str:
        p = self.stack.cfg.processor
        return f"http://{p.admin_address}:{p.admin_port}/metrics"

    @property
    def triton_url(self) -> str:
        assert self.stack.cfg.triton is not None
        return f"http://127.0.0.1:{self.stack.cfg.triton.http_port}"

    def child(self, name: str) -> object:
        return next(c for c in self.stack.children if c.name == name)


@pytest.fixture(scope="session")
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, echo_port: int) -> Iterator[Gateway]:
    """The whole local stack (real Redis, Triton, processor, Envoy) on free ports."""
    from proxy import models

    models.build()
    d = tmp_path_factory.mktemp("gw")
    stack = start_stack(stack_config(d / "run", echo_port), d / "floodwall.yaml")
    try:
        yield Gateway(stack)
    finally:
        stack.stop()
