"""Prices: list prices from genai-prices at each call's date, overridden by the price file.

genai-prices (a maintained price database, bundled with the package: no network) prices a model at
the call's date, with its long-context tiers and cache read and write prices. The price file
(config/prices.yaml, `report.prices_path`) holds only overrides: negotiated rates and private models.
Its entries win when they match. A model neither knows is unpriced, never priced as zero.

The price file: USD per million tokens, a list per `openai`, `anthropic` (also Claude on Vertex AI,
which answers in Anthropic's format through the `google` provider) and `google` (the `google` =
Vertex AI and `gemini` = Gemini API providers). Within a list the first entry whose `model` pattern
(fnmatch, case-sensitive) matches the record's model wins.

How the token counts of a record map to prices depends on the response format (`api_format`):

- openai:    input_tokens includes cache reads; output_tokens includes reasoning.
- anthropic: input_tokens excludes cache reads and cache writes.
- google:    input_tokens includes cache reads; output_tokens excludes reasoning ("thoughts"),
             which Google bills at the output price.

The report turns the counts into one shape where each has exactly one price (In, Out, CR, CW: see
docs/report.md), so cached tokens are never billed twice and reasoning is never missed.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from lmgate.providers import PROVIDERS

PRICE_LISTS = ("openai", "anthropic", "google")
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


def price_list(provider: str | None, api_format: str | None) -> str | None:
    """Which list prices a record: by provider (gemini -> google), Claude on Vertex -> anthropic."""
    if api_format == "anthropic":
        return "anthropic"
    known = PROVIDERS.get(provider or "")
    return known.api if known else None


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


# ---------------------------------------------------------------- genai-prices, and the overrides

GENAI = "genai-prices"
# LMGate's provider -> genai-prices' provider id. Its `google` covers Vertex AI and the Gemini API,
# and falls back to `anthropic` for Claude on Vertex AI.
GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "google": "google",
                   "gemini": "google"}
_PER = 1_000_000


@dataclass(frozen=True)
class UnitPrices:
    """USD per token of each billable count, and who said so."""
    input: float          # input not read from or written to the cache
    cache_read: float
    cache_write: float
    output: float         # reasoning included
    source: str           # GENAI or the price file's path


def genai_version() -> str:
    from genai_prices import __version__
    return __version__


class Pricer:
    """Prices per (provider, api_format, model, epoch, tier): the overrides, then genai-prices.

    `epoch` is how many of `change_dates()` a call's day is on or after: between two dates on which
    some price changes, every price is the same. `tier` is how many of `thresholds()` a call's whole
    prompt exceeds: genai-prices' long-context tiers apply one price to all of a call's tokens once
    its prompt passes a threshold. So calls that share both share their prices, and a group of
    calls is priced at once.
    """

    def __init__(self, overrides: PriceTable | None) -> None:
        self.overrides = overrides
        self._models: dict[tuple, object] = {}
        self._units: dict[tuple, UnitPrices] = {}
        self._facts: tuple[tuple[int, ...], tuple[dt.date, ...]] | None = None

    def _snapshot(self):
        # The data bundled with the package; nothing here starts genai-prices' UpdatePrices, so it
        # never fetches.
        from genai_prices.data_snapshot import get_snapshot
        return get_snapshot()

    def _scan(self) -> tuple[tuple[int, ...], tuple[dt.date, ...]]:
        if self._facts is None:
            from genai_prices.types import ModelPrice, StartDateConstraint, TieredPrices
            wanted = set(GENAI_PROVIDERS.values())
            starts: set[int] = set()
            dates: set[dt.date] = set()
            for provider in self._snapshot().providers:
                if provider.id not in wanted:
                    continue
                for model in provider.models:
                    prices = [model.prices] if isinstance(model.prices, ModelPrice) else []
                    for conditional in [] if prices else model.prices:
                        prices.append(conditional.prices)
                        if isinstance(conditional.constraint, StartDateConstraint):
                            dates.add(conditional.constraint.start_date)
                    for mp in prices:
                        for value in vars(mp).values():
                            if isinstance(value, TieredPrices):
                                starts.update(t.start for t in value.tiers)
            self._facts = tuple(sorted(starts)), tuple(sorted(dates))
        return self._facts

    def thresholds(self) -> tuple[int, ...]:
        """Prompt sizes where a long-context tier starts, over the models of LMGate's providers."""
        return self._scan()[0]

    def change_dates(self) -> tuple[dt.date, ...]:
        """Days on which a price of one of LMGate's providers' models changes."""
        return self._scan()[1]

    def epoch_day(self, epoch: int) -> dt.date:
        """A day of the epoch (see the class)."""
        dates = self.change_dates()
        if not dates:
            return dt.date(2000, 1, 1)
        return dates[epoch - 1] if epoch else dates[0] - dt.timedelta(days=1)

    def lookup(self, provider: str | None, api_format: str | None, model: str | None,
               epoch: int, tier: int) -> UnitPrices | None:
        if model is None:
            return None
        if self.overrides is not None:
            price = self.overrides.lookup(price_list(provider, api_format), model)
            if price is not None:
                return UnitPrices(price.input / _PER, price.cached_input / _PER,
                                  price.cache_write / _PER, price.output / _PER,
                                  str(self.overrides.source))
        genai_provider = GENAI_PROVIDERS.get(provider or "")
        if genai_provider is None:
            return None
        key = (genai_provider, model)
        info = self._models.get(key, ())
        if info == ():
            try:
                _, info = self._snapshot().find_provider_model(model, None, genai_provider, None)
            except LookupError:
                info = None
            self._models[key] = info
        if info is None:
            return None
        day = self.epoch_day(epoch)
        model_price = info.get_prices(dt.datetime.combine(day, dt.time(), dt.timezone.utc))
        units_key = (id(model_price), tier)
        units = self._units.get(units_key)
        if units is None:
            units = self._units[units_key] = self._unit_prices(model_price, tier)
        return units

    def _unit_prices(self, model_price, tier: int) -> UnitPrices:
        from genai_prices import Usage
        thresholds = self.thresholds()
        # A prompt size inside the tier bucket: tiers apply when the prompt exceeds their start.
        prompt = thresholds[tier - 1] + 1 if tier else (thresholds[0] if thresholds else _PER)

        def per_token(direction: str, count: int, **usage: int) -> float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                price = model_price.calc_price(Usage(**usage))
            return float(Decimal(price[f"{direction}_price"]) / count)

        return UnitPrices(
            input=per_token("input", prompt, input_tokens=prompt),
            cache_read=per_token("input", prompt, input_tokens=prompt, cache_read_tokens=prompt),
            cache_write=per_token("input", prompt, input_tokens=prompt, cache_write_tokens=prompt),
            output=per_token("output", _PER, input_tokens=prompt, output_tokens=_PER),
            source=GENAI)
