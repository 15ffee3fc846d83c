"""The rendered nginx config: what varies from one rendering to the next."""

from __future__ import annotations

import re

import pytest

from lmgate.nginx_conf import render
from lmgate.settings import load_settings
from tests.unit.conftest import SHIPPED_CONFIG

pytestmark = pytest.mark.unit


def _request_id_formats(text: str) -> list[str]:
    """The request id the spool lines carry (both log formats name it), as rendered."""
    formats = re.findall(r"log_format lmgate_spool\w* escape=\w+ '\{\"rid\":\"\$(\w+)\"", text)
    return [re.search(rf"map \$pid \${name} {{\s*default \"([^\"]*)\"", text).group(1) for name in formats]


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


def _location(text: str, head: str) -> str:
    """The block of the location whose opening line is `head`, nested blocks included."""
    start = text.index(head + " {")
    depth, i = 0, start
    while True:
        opening, closing = text.find("{", i), text.index("}", i)
        i = opening if 0 <= opening < closing else closing
        depth += 1 if text[i] == "{" else -1
        i += 1
        if depth == 0:
            return text[start:i]


def _rewrite_lines(block: str) -> list[str]:
    """The lines of the block's rewrite phase (if / return / set / rewrite), nested locations left out."""
    inside = block[block.index("{") + 1:block.rindex("}")]
    outer = re.sub(r"\n\s*location [^{]*\{.*?\n            \}", "", inside, flags=re.S)
    return [line.strip() for line in outer.splitlines()
            if re.match(r"\s*(if |return |set |rewrite |\}$)", line)]


def test_stream_usage_locations_repeat_the_provider_locations_rewrite_phase(tmp_path):
    """A nested location runs only its own rewrite-phase lines: the path check and the auth cache
    key of `location /openai/` must be repeated there, the same."""
    text = render(load_settings(SHIPPED_CONFIG, environ={}), tmp_path, njs_module=None)
    parent = _rewrite_lines(_location(text, "location /openai/"))
    assert any("$lmgate_raw_prefix" in line for line in parent) and any("set " in line for line in parent)
    for path in ("/openai/v1/chat/completions", "/openai/v1/completions"):
        nested = _location(text, f"location = {path}")
        assert "proxy_set_body $lmgate_stream_body_out;" in nested
        assert _rewrite_lines(nested)[:len(parent)] == parent, path
    for other in ("anthropic", "gemini", "google"):
        assert "proxy_set_body" not in _location(text, f"location /{other}/")


def test_stream_usage_off_renders_no_rewrite(tmp_path):
    settings = load_settings(SHIPPED_CONFIG, environ={"LMGATE_STATS__ENSURE_STREAM_USAGE": "false"})
    text = render(settings, tmp_path, njs_module=None)
    assert "proxy_set_body" not in text and "location = /openai/v1/chat/completions" not in text


def test_websocket_locations_check_the_key_as_their_provider_location():
    """The relay's location runs the same /auth check as the provider's (a nested location would
    not inherit the rewrite that leads there): its auth lines must stay the same."""
    text = render(load_settings(SHIPPED_CONFIG, environ={}), None, njs_module=None)
    auth = re.compile(r"\s*(set \$lmgate_auth_key|auth_request|error_page 403|error_page 500)")
    for provider in ("openai", "anthropic", "gemini", "google"):
        parent = re.sub(r"\n\s*location [^{]*\{.*?\n            \}", "", _location(text, f"location /{provider}/"),
                        flags=re.S)   # without its nested locations
        relay = _location(text, f"location = /_lmgate_ws/{provider}")
        lines = [line.strip() for line in parent.splitlines() if auth.match(line)]
        assert len(lines) >= 6 and lines == [line.strip() for line in relay.splitlines() if auth.match(line)]
        assert f"rewrite ^ /_lmgate_ws/{provider} last;" in parent
        assert "internal;" in relay and "access_log off;" in relay
