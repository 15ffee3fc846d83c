"""The rendered nginx config: what varies from one rendering to the next."""

from __future__ import annotations

import re

import pytest

from lmgate.nginx_conf import render
from lmgate.settings import load_settings
from tests.unit.conftest import SHIPPED_CONFIG

pytestmark = pytest.mark.unit


def _request_id_formats(text: str) -> list[str]:
    return re.findall(r"log_format lmgate_spool\w* escape=\w+\n\s*'\{\"rid\":\"([^\"]*)\"", text)


def test_each_rendering_gets_its_own_instance_id_in_the_request_id(tmp_path):
    """nginx starts its connection serial numbers from 1 at each start and reload: the request id
    stays unique only if each rendering (one per start, and one before each reload) differs."""
    settings = load_settings(SHIPPED_CONFIG, environ={})
    first, second = (render(settings, tmp_path, njs_module=None) for _ in range(2))
    ids = [_request_id_formats(text) for text in (first, second)]
    assert [len(i) for i in ids] == [2, 2], "both spool log formats carry the request id"
    for formats in ids:
        assert formats[0] == formats[1]
        assert re.fullmatch(r"[0-9a-f]{16}-\$pid-\$connection-\$connection_requests", formats[0]), formats[0]
    assert ids[0][0] != ids[1][0]
    assert first.replace(ids[0][0], "") == second.replace(ids[1][0], ""), "nothing else differs"
