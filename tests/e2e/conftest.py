"""Fixtures for the e2e tests: real mosquitto and prometheus-pushgateway
processes on free loopback ports (process helpers in tests/brokers.py; daemon
fixtures live in the test modules and in tests/conftest.py)."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from tests.brokers import MOSQUITTO, PUSHGATEWAY, Process, mosquitto, pushgateway
from tests.helpers import end_leftover_daemons, free_port


@pytest.fixture(scope="module", autouse=True)
def no_daemon_left_behind() -> Iterator[None]:
    """After each module (its own fixtures are torn down first), stop any daemon
    that a failed test left running."""
    yield
    end_leftover_daemons()


def _need(binary: str, package: str) -> None:
    if not os.path.exists(binary):
        pytest.skip(f"{binary} not installed (Debian package {package})")


@pytest.fixture(scope="module")
def mosquitto_factory(tmp_path_factory) -> Iterator[Callable[..., Process]]:
    """make(persistent=False) -> a stopped mosquitto Process on a free port;
    every one made is stopped at the end of the module."""
    _need(MOSQUITTO, "mosquitto")
    made: list[Process] = []

    def make(persistent: bool = False) -> Process:
        proc = mosquitto(tmp_path_factory.mktemp("mosquitto"), free_port(), persistent=persistent)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="module")
def mqtt_broker(mosquitto_factory) -> Process:
    """One running mosquitto for a test module."""
    return mosquitto_factory().start()


@pytest.fixture()
def pushgateway_factory(tmp_path_factory) -> Iterator[Callable[[], Process]]:
    """make() -> a stopped prometheus-pushgateway Process on a free port."""
    _need(PUSHGATEWAY, "prometheus-pushgateway")
    made: list[Process] = []

    def make() -> Process:
        proc = pushgateway(tmp_path_factory.mktemp("pushgateway"), free_port())
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()
