"""Shared helpers for the unit tests (temp files only, no network)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "lmgate.yaml"



@pytest.fixture(scope="session")
def shipped_raw() -> dict[str, Any]:
    """The shipped config/lmgate.yaml as a plain dict (copy it before changing it)."""
    return yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))


@pytest.fixture
def write_config(tmp_path: Path, shipped_raw: dict[str, Any]) -> Callable[..., Path]:
    """write_config(mutate) -> path of a YAML file holding the shipped config after mutate(raw)."""
    counter = iter(range(1_000_000))

    def write(mutate: Callable[[dict[str, Any]], Any] | None = None) -> Path:
        raw = copy.deepcopy(shipped_raw)
        if mutate is not None:
            mutate(raw)
        path = tmp_path / f"lmgate-{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    return write


def _set_mtime(path: Path, seconds_ago: float) -> None:
    when = time.time_ns() - int(seconds_ago * 1e9)
    os.utime(path, ns=(when, when))


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    assert message.strip(), "empty error message"
    return message


@pytest.fixture
def set_mtime() -> Callable[[Path, float], None]:
    """set_mtime(path, seconds_ago): give a file an mtime in the past (negative: the future)."""
    return _set_mtime


@pytest.fixture
def one_line() -> Callable[[BaseException], str]:
    """one_line(exc) -> str(exc), asserting it is a single non-empty line."""
    return _one_line
