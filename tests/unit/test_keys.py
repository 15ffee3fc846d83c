"""lmgate.keys: the one key a request carries, from any of the places each SDK puts it."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from multidict import CIMultiDict

from lmgate.keys import KeyProblem, extract_key

pytestmark = pytest.mark.unit

KEY = "sk-proj-Secret0123456789"
OTHER = "sk-proj-Other9876543210"


def headers(*pairs: tuple[str, str]) -> CIMultiDict:
    """Request headers as aiohttp hands them over: case-insensitive, repeatable."""
    return CIMultiDict(pairs)


def problem(hdrs: CIMultiDict, query: str = "", *secrets: str) -> str:
    with pytest.raises(KeyProblem) as info:
        extract_key(hdrs, query)
    message = str(info.value)
    assert message
    for secret in secrets or (KEY, OTHER):
        assert secret not in message
        assert secret[-6:] not in message
    return message


# ---------------------------------------------------------------- each source

@pytest.mark.parametrize("hdrs,query", [
    (headers(("Authorization", f"Bearer {KEY}")), ""),
    (headers(("authorization", f"bearer {KEY}")), ""),
    (headers(("AUTHORIZATION", f"BEARER {KEY}")), ""),
    (headers(("Authorization", f"  Bearer   {KEY}  ")), ""),
    (headers(("x-api-key", KEY)), ""),
    (headers(("X-Api-Key", f" {KEY} ")), ""),
    (headers(("x-goog-api-key", KEY)), ""),
    (headers(("X-Goog-Api-Key", KEY)), ""),
    (headers(), f"key={KEY}"),
    (headers(), f"alt=sse&key={KEY}"),
    (headers(), f"key={KEY}&alt=sse"),
], ids=["bearer", "bearer-lower", "bearer-upper", "bearer-spaces", "x-api-key", "x-api-key-padded",
        "x-goog-api-key", "x-goog-api-key-case", "query", "query-second", "query-first"])
def test_each_source(hdrs, query):
    assert extract_key(hdrs, query) == KEY


def test_query_key_is_percent_decoded():
    assert extract_key(headers(), "key=abc%2Fdef%3D%3D") == "abc/def=="


def test_other_query_parameters_named_like_key_are_not_keys():
    message = problem(headers(), f"apikey={KEY}&monkey={OTHER}&key_id=3")
    assert "no API key" in message


def test_unrelated_headers_ignored():
    hdrs = headers(("x-api-key", KEY), ("Cookie", f"key={OTHER}"), ("x-goog-user-project", OTHER),
                   ("X-LMGate-ID", "admin"), ("anthropic-version", "2023-06-01"))
    assert extract_key(hdrs, "alt=sse") == KEY


# Every place a provider reads a credential from (lmgate.providers), beside a listed key in a
# header: each must be seen, or an unchecked credential reaches the provider.
@pytest.mark.parametrize("hdrs,query", [
    (headers(("x-api-key", KEY)), f"%6Bey={OTHER}"),
    (headers(("x-api-key", KEY)), f"k%65y={OTHER}"),
    (headers(("x-api-key", KEY)), f"%6b%65%79={OTHER}"),
    (headers(("x-api-key", KEY)), f"access_token={OTHER}"),
    (headers(("x-api-key", KEY)), f"oauth_token={OTHER}"),
    (headers(("x-api-key", KEY)), f"access%5Ftoken={OTHER}"),
    (headers(("x-api-key", KEY)), f"alt=sse;key={OTHER}"),
    (headers(("x-goog-api-key", KEY)), f"x=%27&key={OTHER}"),
    (headers(("Authorization", f"Bearer {KEY}"), ("api-key", OTHER)), ""),
    (headers(("api-key", KEY), ("api-key", OTHER)), ""),
    (headers(("x-api-key", KEY), ("Authorization", f"Bearer {OTHER}")), ""),
    # Google's system-parameter form, $name, encoded or not.
    (headers(("x-goog-api-key", KEY)), f"$key={OTHER}"),
    (headers(("x-goog-api-key", KEY)), f"%24key={OTHER}"),
    (headers(("x-goog-api-key", KEY)), f"$access_token={OTHER}"),
    # OpenAI Realtime's key in a WebSocket subprotocol.
    (headers(("Authorization", f"Bearer {KEY}"),
             ("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{OTHER}")), ""),
])
def test_a_second_credential_in_any_place_a_provider_reads_is_refused(hdrs, query):
    assert "more than one" in problem(hdrs, query)


@pytest.mark.parametrize("hdrs,query", [
    (headers(("api-key", KEY)), ""),
    (headers(), f"access_token={KEY}"),
    (headers(), f"oauth_token={KEY}"),
    (headers(), f"%6Bey={KEY}"),
    (headers(("x-goog-api-key", KEY)), f"k%65y={KEY}&alt=sse"),
    (headers(), f"%24key={KEY}"),
    (headers(("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{KEY}, openai-beta.realtime-v1")), ""),
    (headers(("Authorization", f"Bearer {KEY}"), ("Sec-WebSocket-Protocol", "realtime")), ""),
])
def test_each_credential_place_alone_is_read(hdrs, query):
    assert extract_key(hdrs, query) == KEY


# ---------------------------------------------------------------- agreement

@pytest.mark.parametrize("hdrs,query", [
    (headers(("Authorization", f"Bearer {KEY}"), ("x-api-key", KEY)), ""),
    (headers(("x-api-key", KEY), ("x-goog-api-key", KEY)), ""),
    (headers(("x-goog-api-key", KEY)), f"key={KEY}"),
    (headers(("Authorization", f"Bearer {KEY}"), ("x-api-key", KEY), ("x-goog-api-key", KEY)), f"key={KEY}"),
    (headers(), f"key={KEY}&key={KEY}"),
    (headers(("x-api-key", KEY), ("x-api-key", KEY)), ""),
])
def test_same_key_in_several_places_is_fine(hdrs, query):
    assert extract_key(hdrs, query) == KEY


@pytest.mark.parametrize("hdrs,query", [
    (headers(("Authorization", f"Bearer {KEY}"), ("x-api-key", OTHER)), ""),
    (headers(("Authorization", f"Bearer {KEY}"), ("x-goog-api-key", OTHER)), ""),
    (headers(("Authorization", f"Bearer {KEY}")), f"key={OTHER}"),
    (headers(("x-api-key", KEY), ("x-goog-api-key", OTHER)), ""),
    (headers(("x-goog-api-key", KEY)), f"key={OTHER}"),
    (headers(), f"key={KEY}&key={OTHER}"),
], ids=["bearer-xapi", "bearer-goog", "bearer-query", "xapi-goog", "goog-query", "query-twice"])
def test_two_different_keys_refused(hdrs, query):
    message = problem(hdrs, query)
    assert "more than one" in message


@pytest.mark.parametrize("name,first,second", [
    ("Authorization", f"Bearer {KEY}", f"Bearer {OTHER}"),
    ("x-api-key", KEY, OTHER),
    ("x-goog-api-key", KEY, OTHER),
])
def test_repeated_header_with_two_different_keys_refused(name, first, second):
    problem(headers((name, first), (name, second)))


# ---------------------------------------------------------------- malformed / empty

@pytest.mark.parametrize("value", [
    KEY,                        # no scheme
    f"Basic {KEY}",
    f"Token {KEY}",
    "Bearer",
    "Bearer ",
    "Bearer    ",
    f"Bearer {KEY} {OTHER}",
    f"Bearer {KEY} extra",
    "",
    "   ",
    f"Bearer:{KEY}",
])
def test_malformed_authorization(value):
    message = problem(headers(("Authorization", value)))
    assert "Bearer" in message


def test_malformed_authorization_refused_even_with_a_good_key_elsewhere():
    problem(headers(("Authorization", f"Basic {OTHER}"), ("x-api-key", KEY)))


@pytest.mark.parametrize("hdrs,query", [
    (headers(), ""),
    (headers(), "alt=sse"),
    (headers(), "key="),
    (headers(), "key"),
    (headers(("x-api-key", "")), ""),
    (headers(("x-api-key", "   ")), ""),
    (headers(("x-goog-api-key", "")), "key="),
    (headers(("Content-Type", "application/json")), ""),
])
def test_no_key(hdrs, query):
    assert "no API key" in problem(hdrs, query)


def test_empty_value_next_to_a_real_key_is_ignored():
    assert extract_key(headers(("x-api-key", ""), ("x-goog-api-key", KEY)), "key=") == KEY


def test_plain_dict_headers_work():
    assert extract_key({"x-api-key": KEY}, "") == KEY


@given(a=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40),
       b=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40))
def test_messages_never_contain_a_key(a, b):
    a, b = "sk-" + a, "sk-" + b   # key-like, so no drawn text can be a word of a fixed message
    cases = [
        (headers(("Authorization", f"Bearer {a}"), ("x-api-key", b)), ""),
        (headers(("Authorization", f"Basic {a}")), ""),
        (headers(("Authorization", f"Bearer {a} {b}")), ""),
        (headers(("x-goog-api-key", a), ("x-api-key", b)), ""),
    ]
    for hdrs, query in cases:
        try:
            found = extract_key(hdrs, query)
        except KeyProblem as exc:
            assert a not in str(exc) and b not in str(exc)
        else:
            assert a == b and found == a   # only possible when the two drawn keys agree
