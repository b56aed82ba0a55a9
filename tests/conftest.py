"""Shared fixtures: one real upstream per session, one real proxy per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.proxy_process import ProxyProcess, running_proxy
from tests.upstream import Upstream, running_upstream


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with running_upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


@pytest.fixture(scope="session")
def untrusted_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with running_upstream(tmp_path_factory.mktemp("untrusted"), untrusted=True) as up:
        yield up


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[ProxyProcess]:
    """The proxy as the issue describes it: four loopback egress addresses, private allowed."""
    with running_proxy(tmp_path_factory.mktemp("state"), upstream_ca=upstream.ca_pem_path) as p:
        yield p
