"""The initial state of the shop: stock per SKU and accounts with balances.

Used by inventory (stock) and payment (accounts). Without `--initial`, a service starts from
`DEFAULT_CATALOG`; with `--initial PATH.json` it starts from that file:

    {"stock": {"sku-apple": 50},
     "accounts": {"acct-alice": {"balance_cents": 100000, "declines": false}}}

The initial state is only read when a service's log is empty, and the SDK checkpoints it at
once (`ParticipantServer.start`): once it has a log, recovery rebuilds the state from the
log's checkpoint and records, which already include it. Starting a service on an existing data
directory with a different file is therefore harmless but useless, so keep the file and the
data directory together. (A log created before that first checkpoint existed, 2026-11-29, still
replays on top of the file given, until its first periodic checkpoint.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

from dtm import limits

# Bounds on the file, so a typo cannot build a state that overflows an int64 field of the
# read APIs (received, initial_cents are sums of these) or exhausts memory.
STOCK_UNITS_MAX = 10**15
BALANCE_CENTS_MAX = 10**15
ENTRIES_MAX = 100_000
FILE_BYTES_MAX = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AccountSpec:
    balance_cents: int
    #: A declining account (a blocked card) refuses every charge.
    declines: bool = False


@dataclass(frozen=True, slots=True)
class Catalog:
    stock: Mapping[str, int] = field(default_factory=dict)
    accounts: Mapping[str, AccountSpec] = field(default_factory=dict)


DEFAULT_CATALOG = Catalog(
    stock=MappingProxyType(
        {
            "sku-apple": 50,
            "sku-pear": 20,
            "sku-plum": 100,
            "sku-scarce": 3,
            # Sold out from the start: every order for it is refused.
            "sku-soldout": 0,
            # Enough for load and soak runs that should not be limited by stock.
            "sku-bulk": 1_000_000,
        }
    ),
    accounts=MappingProxyType(
        {
            "acct-alice": AccountSpec(100_000),
            "acct-bob": AccountSpec(50_000),
            "acct-carol": AccountSpec(250_000),
            "acct-poor": AccountSpec(500),
            # Enough for load and soak runs that should not be limited by money.
            "acct-rich": AccountSpec(10**12),
            "acct-blocked": AccountSpec(100_000, declines=True),
        }
    ),
)


def _integer(where: str, value: object, maximum: int) -> int:
    # bool is an int in Python; `true` is not a quantity.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{where} must be between 0 and {maximum}, got {value}")
    return value


def _object(where: str, value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    if len(value) > ENTRIES_MAX:
        raise ValueError(f"{where} has {len(value)} entries; at most {ENTRIES_MAX}")
    return value


def _resource_id(where: str, value: str) -> None:
    if not limits.RESOURCE_ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{where}: {value[:40]!r} is not a valid id (1..128 characters of [A-Za-z0-9._:@-])"
        )


def parse_catalog(document: object, source: str = "initial state") -> Catalog:
    """Validate a decoded JSON document; ValueError names the first bad key."""
    top = _object(source, document)
    for key in top:
        if key not in ("stock", "accounts"):
            raise ValueError(f"{source}: unknown key {key!r} (expected 'stock' and 'accounts')")
    for key in ("stock", "accounts"):
        if key not in top:
            raise ValueError(f"{source}: missing key {key!r} (it may be an empty object)")

    stock: dict[str, int] = {}
    for sku, quantity in _object(f"{source}: 'stock'", top["stock"]).items():
        _resource_id(f"{source}: stock key", sku)
        stock[sku] = _integer(f"{source}: stock[{sku!r}]", quantity, STOCK_UNITS_MAX)

    accounts: dict[str, AccountSpec] = {}
    for account_id, raw in _object(f"{source}: 'accounts'", top["accounts"]).items():
        _resource_id(f"{source}: accounts key", account_id)
        where = f"{source}: accounts[{account_id!r}]"
        spec = _object(where, raw)
        for key in spec:
            if key not in ("balance_cents", "declines"):
                raise ValueError(
                    f"{where}: unknown key {key!r} (expected 'balance_cents' and 'declines')"
                )
        if "balance_cents" not in spec:
            raise ValueError(f"{where}: missing key 'balance_cents'")
        balance = _integer(f"{where}['balance_cents']", spec["balance_cents"], BALANCE_CENTS_MAX)
        declines = spec.get("declines", False)
        if not isinstance(declines, bool):
            raise ValueError(f"{where}['declines'] must be true or false, got {declines!r}")
        accounts[account_id] = AccountSpec(balance, declines)

    return Catalog(stock=MappingProxyType(stock), accounts=MappingProxyType(accounts))


class _KeyGivenTwice(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object's dict, refusing a key given twice: json keeps the last one silently, so
    a SKU or account listed twice would start with its second figure, the first lost."""
    document: dict[str, object] = {}
    for key, value in pairs:
        if key in document:
            raise _KeyGivenTwice(f"key {key[:40]!r} appears twice in one object")
        document[key] = value
    return document


def load_catalog(path: Path) -> Catalog:
    """Read and validate an initial-state file; ValueError (or OSError) says what is wrong."""
    size = path.stat().st_size
    if size > FILE_BYTES_MAX:
        raise ValueError(f"{path}: {size} bytes; an initial-state file is at most {FILE_BYTES_MAX}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    except _KeyGivenTwice as error:
        raise ValueError(f"{path}: {error}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be an initial state") from None
    return parse_catalog(document, str(path))


def split_initial_arg(
    argv: list[str] | None, configured_in: str | None = None
) -> tuple[Catalog, list[str]]:
    """Take `--initial PATH.json` out of a command line; the rest goes to the SDK.

    Every service accepts the flag, so that a launcher can start all four with the same
    arguments; orders and notification start empty whatever it says. `configured_in`: the
    setting that gave the first --initial (dtm.config.configured_initial), which names it in
    an error when no later --initial overrides it.
    """
    # No abbreviations: a prefix of an SDK flag must never be taken for --initial.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--initial", type=Path, action="append", default=[])
    options, rest = parser.parse_known_args(argv)
    if not options.initial:
        return DEFAULT_CATALOG, rest
    path: Path = options.initial[-1]  # the last one given, as argparse keeps for a flag
    setting = configured_in if configured_in and len(options.initial) == 1 else "--initial"
    try:
        return load_catalog(path), rest
    except OSError as error:
        # A usage error, not a traceback, and not "[Errno 21] Is a directory: 'x'": the
        # operator has a setting to fix, named as given.
        _refuse(
            f"{setting}: cannot read {path}: {error.strerror or error}; give the path of a JSON "
            "file of initial stock and accounts, or none for the built-in catalog"
        )
    except ValueError as error:
        _refuse(f"{setting}: {error}")


def _refuse(message: str) -> NoReturn:
    """Stop the service on an initial state it cannot use: a configuration refused (the path
    is a setting, `initial`, or a flag), so exit status 2, as for every other one. A
    SystemExit(message) exited 1, Python's status for an exit with a message."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


__all__ = [
    "DEFAULT_CATALOG",
    "AccountSpec",
    "Catalog",
    "load_catalog",
    "parse_catalog",
    "split_initial_arg",
]
