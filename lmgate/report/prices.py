"""The price table (config/prices.yaml) and the cost of a record's tokens.

Prices are USD per million tokens. A record is priced from one of three lists, chosen by where the
model comes from: `openai`, `anthropic` (also Claude on Vertex AI, which answers in Anthropic's
format through the `google` provider) and `google` (the `google` = Vertex AI and `gemini` = Gemini API
providers). Within a list the first entry whose `model` pattern (fnmatch, case-sensitive) matches
the record's model wins.

How the token counts of a record map to prices depends on the response format (`api_format`):

- openai:    input_tokens includes cache reads; output_tokens includes reasoning.
- anthropic: input_tokens excludes cache reads and cache writes.
- google:    input_tokens includes cache reads; output_tokens excludes reasoning ("thoughts"),
             which Google bills at the output price.

`billable()` turns raw sums into one shape where each count has exactly one price, so cached tokens
are never billed twice and reasoning is never missed.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmgate.providers import PROVIDERS

PRICE_LISTS = ("openai", "anthropic", "google")
FORMATS = ("openai", "anthropic", "google")
_TOP_KEYS = ("prices_as_of", "currency", "unit", "providers")
_ENTRY_KEYS = ("model", "input", "cached_input", "cache_write", "output")
_UNIT = "per_million_tokens"


class PriceError(Exception):
    """A bad price file; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Price:
    model: str            # the fnmatch pattern that matched
    input: float
    cached_input: float   # falls back to input when the file gives none
    cache_write: float    # falls back to input when the file gives none
    output: float


@dataclass(frozen=True)
class Billable:
    """Token counts with one price each (see the module docstring)."""
    input: int        # uncached input
    output: int       # all output, reasoning included
    cache_read: int
    cache_write: int
    reasoning: int    # the part of output spent on reasoning (for information; inside `output`)


def token_format(provider: str | None, api_format: str | None) -> str | None:
    """The format whose token semantics apply: the record's api_format, else the provider's."""
    if api_format in FORMATS:
        return api_format
    known = PROVIDERS.get(provider or "")
    return known.api if known else None


def price_list(provider: str | None, api_format: str | None) -> str | None:
    """Which list prices a record: by provider (gemini -> google), Claude on Vertex -> anthropic."""
    if api_format == "anthropic":
        return "anthropic"
    known = PROVIDERS.get(provider or "")
    return known.api if known else None


def billable(fmt: str | None, inp: int, out: int, cache_read: int, cache_write: int,
             reasoning: int) -> Billable:
    """Normalise raw token sums of one format (null counts already 0)."""
    if fmt == "openai":
        return Billable(inp - cache_read, out, cache_read, cache_write, reasoning)
    if fmt == "google":
        return Billable(inp - cache_read, out + reasoning, cache_read, cache_write, reasoning)
    return Billable(inp, out, cache_read, cache_write, reasoning)  # anthropic (and unknown: as reported)


def cost(fmt: str | None, tokens: Billable, price: Price) -> float:
    """USD for the tokens. Cache writes are billed only where the format reports them (anthropic)."""
    usd = (tokens.input * price.input + tokens.cache_read * price.cached_input
           + tokens.output * price.output)
    if fmt == "anthropic":
        usd += tokens.cache_write * price.cache_write
    return usd / 1_000_000


@dataclass(frozen=True)
class PriceTable:
    source: Path
    as_of: str
    lists: dict[str, tuple[Price, ...]]

    def lookup(self, plist: str | None, model: str | None) -> Price | None:
        if plist is None or model is None:
            return None
        for price in self.lists.get(plist, ()):
            if fnmatch.fnmatchcase(model, price.model):
                return price
        return None


def _number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise PriceError(f"{where}: must be a number >= 0, got {value!r}")
    return float(value)


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            place = f"{where}.{key}" if where else str(key)
            raise PriceError(f"{place}: unknown key (allowed: {', '.join(allowed)})")


def _parse(raw: Any) -> tuple[str, dict[str, tuple[Price, ...]]]:
    if not isinstance(raw, dict):
        raise PriceError("top level: must be a mapping with keys " + ", ".join(_TOP_KEYS))
    _check_keys(raw, _TOP_KEYS, "")
    for key in _TOP_KEYS:
        if key not in raw:
            raise PriceError(f"{key}: missing")
    as_of = raw["prices_as_of"]
    if isinstance(as_of, str):
        try:
            as_of = dt.date.fromisoformat(as_of)
        except ValueError:
            pass
    if type(as_of) is not dt.date:
        raise PriceError(f"prices_as_of: must be a date YYYY-MM-DD, got {raw['prices_as_of']!r}")
    if raw["currency"] != "USD":
        raise PriceError(f"currency: must be USD, got {raw['currency']!r}")
    if raw["unit"] != _UNIT:
        raise PriceError(f"unit: must be {_UNIT}, got {raw['unit']!r}")
    providers = raw["providers"]
    if not isinstance(providers, dict):
        raise PriceError("providers: must be a mapping of " + ", ".join(PRICE_LISTS) + " to lists")
    _check_keys(providers, PRICE_LISTS, "providers")
    lists: dict[str, tuple[Price, ...]] = {}
    for name, entries in providers.items():
        where = f"providers.{name}"
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise PriceError(f"{where}: must be a list of model entries")
        parsed = []
        for i, entry in enumerate(entries):
            at = f"{where}[{i}]"
            if not isinstance(entry, dict):
                raise PriceError(f"{at}: must be a mapping with model, input, output")
            _check_keys(entry, _ENTRY_KEYS, at)
            for key in ("model", "input", "output"):
                if key not in entry:
                    raise PriceError(f"{at}.{key}: missing")
            model = entry["model"]
            if not isinstance(model, str) or not model:
                raise PriceError(f"{at}.model: must be a non-empty string (fnmatch pattern), got {model!r}")
            inp = _number(entry["input"], f"{at}.input")
            cached = entry.get("cached_input")
            write = entry.get("cache_write")
            parsed.append(Price(
                model=model,
                input=inp,
                cached_input=inp if cached is None else _number(cached, f"{at}.cached_input"),
                cache_write=inp if write is None else _number(write, f"{at}.cache_write"),
                output=_number(entry["output"], f"{at}.output"),
            ))
        lists[name] = tuple(parsed)
    return as_of.isoformat(), lists


def load_prices(path: Path) -> PriceTable:
    """Read and validate the price file; any problem is a PriceError naming the file and key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceError(f"{path}: cannot read price file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PriceError(f"{path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise PriceError(f"{path}: invalid YAML{line}: {problem}") from None
    try:
        as_of, lists = _parse(raw)
    except PriceError as exc:
        raise PriceError(f"{path}: {exc}") from None
    return PriceTable(source=Path(path), as_of=as_of, lists=lists)
