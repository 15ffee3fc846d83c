"""Per-key policy columns in the allow-list and the owners file: parsing, one-line errors naming
the line and the column, and the model patterns' translation (the same in Python and njs)."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import time

import pytest

from lmgate.allowlist import (AllowListError, AllowListHolder, Limits, models_regex, parse_allowlist,
                              parse_owners)

pytestmark = pytest.mark.unit

KEY_A = "sk-alice-0123456789abcdef"
KEY_B = "sk-bob-fedcba9876543210"
HEADER = ("id,api_key,owner,added,expires,disabled,providers,models,rpm,tpm,budget_usd_day,"
          "budget_usd_month,budget_tokens_month\n")


def parse(text: str):
    return parse_allowlist(text.encode(), "keys.csv")


def error(text: str, parser=parse) -> str:
    with pytest.raises(AllowListError) as info:
        parser(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_column_is_parsed():
    lists = parse(HEADER + f"alice,{KEY_A},a@x,2026,2026-12-31,false,openai|anthropic,gpt-4o-mini*|claude-haiku-*,"
                           "60,10000,5.5,100,2000000\n")
    entry = lists.lookup(KEY_A)
    policy = entry.policy
    assert policy.expires == dt.datetime(2026, 12, 31, tzinfo=dt.timezone.utc).timestamp()
    assert policy.disabled is False
    assert policy.providers == frozenset({"openai", "anthropic"})
    assert policy.models == ("gpt-4o-mini*", "claude-haiku-*")
    assert policy.limits == Limits(rpm=60, tpm=10000, budget_usd_day=5.5, budget_usd_month=100.0,
                                   budget_tokens_month=2000000)
    assert lists.with_policy == [entry]


def test_a_date_time_is_utc_unless_it_says_otherwise():
    lists = parse(HEADER.replace(",disabled,providers,models,rpm,tpm,budget_usd_day,budget_usd_month,"
                                 "budget_tokens_month", "")
                  + f"alice,{KEY_A},a@x,2026,2026-12-31T18:00:00\n"
                  + f"bob,{KEY_B},b@x,2026,2026-12-31T18:00:00+02:00\n")
    assert lists.lookup(KEY_A).policy.expires == dt.datetime(2026, 12, 31, 18, tzinfo=dt.timezone.utc).timestamp()
    assert lists.lookup(KEY_B).policy.expires == dt.datetime(2026, 12, 31, 16, tzinfo=dt.timezone.utc).timestamp()


def test_empty_cells_and_a_file_without_policy_columns_mean_no_policy():
    lists = parse(HEADER + f"alice,{KEY_A},a@x,2026,,,,,,,,,\n" + f"bob,{KEY_B},b@x,2026,,false,,,,,,,\n")
    assert lists.lookup(KEY_A).policy is None and lists.lookup(KEY_B).policy is None
    assert lists.with_policy == []
    plain = parse("id,api_key,owner,added\n" + f"alice,{KEY_A},a@x,2026\n")
    assert plain.lookup(KEY_A).policy is None and plain.owners == {}


def test_disabled_alone_is_a_policy():
    lists = parse("id,api_key,owner,added,disabled\n" + f"alice,{KEY_A},a@x,2026,TRUE\n")
    assert lists.lookup(KEY_A).policy.disabled is True


@pytest.mark.parametrize("column, cell, says", [
    ("expires", "31/12/2026", "must be a date"),
    ("disabled", "yes", "must be true or false"),
    ("providers", "openai|azure", "unknown provider 'azure'"),
    ("models", "gpt-[45]*", "with * and ? as wildcards"),
    ("models", "gpt-4o||", "must be printable ASCII"),
    ("models", "|".join(["gpt-4o-mini-2024-07-18"] * 50), "is too long"),
    ("models", "*?" * 300, "is too long"),
    ("rpm", "-1", "whole number"),
    ("rpm", "\u00b2", "whole number"),                          # a digit to str.isdigit, not to int
    ("tpm", "1.5", "whole number"),
    ("budget_usd_day", "five", "amount in USD"),
    ("budget_usd_month", "-3", ">= 0"),
    ("budget_tokens_month", "1e6", "whole number"),
])
def test_a_bad_cell_is_one_line_naming_the_file_line_and_column(column, cell, says):
    cells = {"expires": "", "disabled": "", "providers": "", "models": "", "rpm": "", "tpm": "",
             "budget_usd_day": "", "budget_usd_month": "", "budget_tokens_month": ""}
    cells[column] = cell
    text = HEADER + f"bob,{KEY_B},b@x,2026,,,,,,,,,\n" + f"alice,{KEY_A},a@x,2026," + ",".join(cells.values()) + "\n"
    message = error(text)
    assert message.startswith(f"keys.csv:3: column {column}: ")
    assert says in message


def test_owners_file():
    owners = parse_owners(b"owner,rpm,budget_usd_month,note\nteam@x,100,50,hi\nsolo@x,,,\n", "owners.csv")
    assert owners == {"team@x": Limits(rpm=100, budget_usd_month=50.0)}


@pytest.mark.parametrize("text, says", [
    ("rpm,tpm\n", "owners.csv:1: header must name the column owner"),
    ("owner,rpm\na@x,1\na@x,2\n", "owners.csv:3: duplicate owner 'a@x' (first on line 2)"),
    ("owner,rpm\na@x,lots\n", "owners.csv:2: column rpm: 'lots' must be a whole number"),
    ("owner,rpm\n,1\n", "owners.csv:2: empty owner"),
    ("", "owners.csv:1: empty file"),
])
def test_owners_file_errors(text, says):
    assert says in error(text, lambda t: parse_owners(t.encode(), "owners.csv"))


def test_a_bad_edit_of_the_owners_file_keeps_the_previous_lists(tmp_path):
    keys, owners = tmp_path / "keys.csv", tmp_path / "owners.csv"
    keys.write_text("id,api_key,owner,added\n" + f"alice,{KEY_A},a@x,2026\n")
    owners.write_text("owner,rpm\na@x,5\n")
    old = time.time() - 10
    import os
    os.utime(keys, (old, old))
    os.utime(owners, (old, old))
    holder = AllowListHolder(keys, 30, owners)
    assert holder.current.owners == {"a@x": Limits(rpm=5)}
    owners.write_text("owner,rpm\na@x,five\n")
    os.utime(owners, (old + 1, old + 1))
    assert holder.check() is False
    assert holder.last_error == f"{owners}:2: column rpm: 'five' must be a whole number >= 0"
    assert holder.current.owners == {"a@x": Limits(rpm=5)}
    owners.write_text("owner,rpm\na@x,7\n")
    os.utime(owners, (old + 2, old + 2))
    assert holder.check() is True and holder.current.owners == {"a@x": Limits(rpm=7)}


PATTERNS = ("gpt-4o-mini*", "claude-haiku-?-5", "models/gemini-2.5-*", "a.b+c(d)$^", "x\\y")


@pytest.mark.parametrize("model", [
    "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "gpt-4o", "xgpt-4o-mini", "claude-haiku-4-5",
    "claude-haiku-45", "claude-haiku-4-5-20251001", "models/gemini-2.5-pro", "a.b+c(d)$^", "aXb+c(d)$^",
    "x\\y", "", "GPT-4O-MINI",
])
def test_the_model_regex_means_what_fnmatchcase_means(model):
    """The regular expression njs matches with is read the same by Python's re (this test) and by
    JavaScript: only `^`, `(?:`, `|`, `)$`, `[\\s\\S]` and escaped punctuation are used."""
    regex = models_regex(PATTERNS)
    assert bool(re.search(regex, model)) == any(fnmatch.fnmatchcase(model, p) for p in PATTERNS)
    assert re.fullmatch(r"\^\(\?:(?:[A-Za-z0-9|]|\\[!-/:-@\\^_`{-~]|\[\\s\\S\]\*?)*\)\$", regex)


def test_check_allowlist_and_keys_read_the_owners_file(tmp_path, monkeypatch, capsys):
    """`lmgate check-allowlist` counts the keys with a policy and the owners with limits; `lmgate
    keys` masks plain and hashed keys alike, and says where the use comes from."""
    import hashlib

    from lmgate import cli
    from tests.support.ports import free_port
    keys, owners = tmp_path / "keys.csv", tmp_path / "owners.csv"
    hashed = "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()
    keys.write_text("id,api_key,owner,added,rpm\n" + f"alice,{KEY_A},a@x,2026,5\n" + f"bob,{hashed},b@x,2026,\n")
    owners.write_text("owner,budget_usd_day\na@x,2.5\n")
    monkeypatch.setenv("LMGATE_AUTH__ALLOWLIST_PATH", str(keys))
    monkeypatch.setenv("LMGATE_AUTH__OWNERS_PATH", str(owners))
    monkeypatch.setenv("LMGATE_STATS__OUTPUT_PATH", str(tmp_path / "stats.jsonl"))
    monkeypatch.setenv("LMGATE_SERVER__PORT", str(free_port()))   # no sidecar there
    assert cli.run(["check-allowlist"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{keys}: 2 keys (1 with a policy)",
                                                    f"{owners}: 1 owners with limits"]
    assert cli.run(["keys"]) == 0
    out, err = capsys.readouterr()
    assert "does not answer" in err and "from the stats files" in err
    lines = out.splitlines()
    assert lines[1].split() == ["alice", "...abcdef", "a@x", "-", "rpm", "?/5"]
    assert lines[2].split() == ["bob", "sha256:..." + hashed[-6:], "b@x", "-", "-"]
    assert "budget_usd_day $0.00/$2.50" in out and lines[-1] == "use from the stats files (last minute: unknown)"
    assert KEY_A not in out + err and KEY_B not in out + err
