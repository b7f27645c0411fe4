"""`dtm check`: the shop's invariants (dtm.invariants) over what the four services show now.

The demo, chaos, the bench and the tests run the checker on clusters they started; this is the
operator's: it finds inventory, orders, payment and notification in the coordinator's registry
(or at --service NAME=HOST:PORT), reads them with the same TLS as every other command, and
prints the violations. By default a live check (`check_services(settled=False)`): work in
flight is allowed, and what only some reads showed broken is listed apart as a suspect, not
counted. --settle waits until nothing is in flight (`wait_until_settled`) and checks with the
settled rules, under which nothing may stay reserved, held, pending or staged.

Exit status: 0 every invariant holds (suspects alone too: they are said); 3 (the answer is no)
a violation; 4 --settle's deadline passed with work still in flight, so nothing was checked;
1 the coordinator or a service could not be read, or a service is not registered; 2 usage
(a malformed --service, an --initial file that cannot be read), before any call.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtm import config, invariants, security
from dtm.cli import tables as fmt
from dtm.cli.participants import _registry
from dtm.cli.session import (
    EXIT_ERROR,
    EXIT_NO,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_USAGE,
    CliError,
    Session,
    Target,
    rpc_error,
)
from dtm.cli.transactions import _address, _call_seconds
from participants.services.catalog import load_catalog

#: Added when the coordinator cannot be reached to look the services up in its registry.
WITHOUT_COORDINATOR_HINT = (
    "without the coordinator, give each service's --service NAME=HOST:PORT to read it directly"
)


def register(commands: Any, as_json: argparse.ArgumentParser) -> None:
    """Add `check` to the `dtm` command's subcommands (`as_json`: the parser of --json the
    other commands share)."""
    check = commands.add_parser(
        "check",
        parents=[as_json],
        help="check the shop's invariants (stock, money, orders, notifications) on the "
        "running services",
        description="Reads inventory, orders, payment and notification (found in the "
        "coordinator's registry, or at --service) and checks the order flow's invariants: "
        "stock and money conserved, every confirmed order sold, charged once and notified "
        "once, nothing charged or sent for a cancelled one. Live by default: work in flight "
        "is allowed, and what only some of its reads showed broken (most likely a transaction "
        "that ran between the reads of two services) is listed apart as a suspect, not "
        "counted; --settle tells. Exit status 0 every invariant holds (suspects alone too); "
        "3 a violation; 4 not settled within --settle's SECONDS (nothing checked); 1 the "
        "coordinator or a service could not be read, or a service is not registered; 2 usage.",
    )
    check.add_argument(
        "--service",
        type=_service,
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help=f"read service NAME ({', '.join(config.SERVICES)}) at this address, not where the "
        "coordinator's registry has it (repeat for each; with all four, the coordinator is "
        "not asked)",
    )
    check.add_argument(
        "--settle",
        type=_call_seconds,
        nargs="?",
        const=invariants.SETTLE_TIMEOUT_S,
        default=None,
        metavar="SECONDS",
        help="wait until nothing is reserved, held, pending or staged (at most SECONDS, "
        f"default {invariants.SETTLE_TIMEOUT_S:g}), then check with the settled rules",
    )
    check.add_argument(
        "--initial",
        type=config.path_argument,
        default=None,
        metavar="FILE",
        help="the initial stock and accounts the services started with (their --initial "
        "file; `python -m dtm.cluster up --initial` keeps a copy in DATA_DIR/initial.json): "
        "also check that every SKU and account is still there with its starting figures, and "
        "the total money unchanged",
    )
    check.add_argument(
        "--sales-without-orders",
        action="store_true",
        help="some transactions reserve stock without an order (a `dtm submit` of a "
        "ReserveStock alone): units sold need only cover the confirmed orders' units, not "
        "equal them",
    )
    check.set_defaults(handler=cmd_check)


def _service(text: str) -> tuple[str, str]:
    """--service NAME=HOST:PORT (argparse type)."""
    name, equals, address = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=HOST:PORT")
    if name not in config.SERVICES:
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a service of the shop: expected one of {', '.join(config.SERVICES)}"
        )
    return name, _address(address)


def cmd_check(session: Session) -> int:
    options = session.options
    initial = _initial(options.initial)
    targets = _service_targets(session)
    settle_s: float | None = options.settle
    # Worked out before the loop runs: a TLS configuration refused is a usage error (CliError).
    tls = session.tls
    try:
        report = asyncio.run(
            _read_and_check(
                targets,
                tls,
                settle_s=settle_s,
                initial=initial,
                lines_match_inventory=not options.sales_without_orders,
                read_timeout_s=session.timeout,
            )
        )
    except invariants.ServiceUnreadable as error:
        target = next(t for t in targets if t.name == error.service)
        raise rpc_error(error, target.what, target.address, session) from None
    except TimeoutError as error:  # wait_until_settled's deadline
        raise CliError(
            f"{error}; nothing checked. A transaction stuck in phase 2 keeps work in flight "
            "(`dtm txn list --stuck`); else give --settle more seconds, or check live "
            "(without --settle)",
            EXIT_UNKNOWN,
        ) from None
    _print(session, report, targets, settled=settle_s is not None)
    return EXIT_OK if report.ok else EXIT_NO


def _initial(path: Path | None) -> invariants.InitialState | None:
    """--initial, read and validated as the services read it; a usage error if it cannot be."""
    if path is None:
        return None
    try:
        catalog = load_catalog(path)
    except OSError as error:
        message = f"--initial: cannot read {path}: {error.strerror or error}"
        raise CliError(message, EXIT_USAGE) from None
    except ValueError as error:
        raise CliError(f"--initial: {error}", EXIT_USAGE) from None
    return invariants.InitialState(
        stock=dict(catalog.stock),
        accounts={name: spec.balance_cents for name, spec in catalog.accounts.items()},
        declining=frozenset(name for name, spec in catalog.accounts.items() if spec.declines),
    )


def _service_targets(session: Session) -> list[Target]:
    """The four services to read: --service's, the others from the coordinator's registry
    (not asked when --service gives all four). Named as the registry names them, which is the
    identity their TLS certificates carry."""
    given: dict[str, str] = {}
    for name, address in session.options.service:
        if name in given:
            raise CliError(f"--service {name}= given twice", EXIT_USAGE)
        given[name] = address
    missing = [name for name in config.SERVICES if name not in given]
    if missing:
        registry = {p.name: p.address for p in _registry(session, WITHOUT_COORDINATOR_HINT)}
        unregistered = [name for name in missing if name not in registry]
        if unregistered:
            raise CliError(_unregistered(session, unregistered, sorted(registry)), EXIT_ERROR)
        given.update((name, registry[name]) for name in missing)
    return [Target(name, given[name], name) for name in config.SERVICES]


def _unregistered(session: Session, names: Sequence[str], registered: Sequence[str]) -> str:
    which = ", ".join(names)
    verb = "is" if len(names) == 1 else "are"
    return (
        f"{which} {verb} not registered with the coordinator at {session.coordinator_address} "
        f"(registered: {', '.join(registered) or 'none'}): is it running? (`dtm participants`); "
        "or give --service NAME=HOST:PORT"
    )


async def _read_and_check(
    targets: Sequence[Target],
    tls: security.TlsConfig | None,
    *,
    settle_s: float | None,
    initial: invariants.InitialState | None,
    lines_match_inventory: bool,
    read_timeout_s: float,
) -> invariants.Report:
    """The live check, or (`settle_s`) the settled one of the snapshot that settling ended on.
    The channels are opened here: an asyncio channel belongs to the loop that runs it."""
    channels = {t.name: security.channel(t.address, tls, t.identity) for t in targets}
    try:
        if settle_s is None:
            return await invariants.check_services(
                channels,
                settled=False,
                lines_match_inventory=lines_match_inventory,
                initial=initial,
                read_timeout_s=read_timeout_s,
            )
        snapshot = await invariants.wait_until_settled(
            channels, timeout_s=settle_s, read_timeout_s=read_timeout_s
        )
        return invariants.report(
            snapshot, settled=True, lines_match_inventory=lines_match_inventory, initial=initial
        )
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels.values()))


def _print(
    session: Session, report: invariants.Report, targets: Sequence[Target], *, settled: bool
) -> None:
    if session.json:
        fmt.emit_json(_report_dict(report, targets, settled), session.out)
        return
    out = session.out
    print("read " + ", ".join(f"{t.name} at {t.address}" for t in targets), file=out)
    print(("settled: " if settled else "") + report.summary(), file=out)
    in_flight = report.snapshot.in_flight()
    if in_flight:
        print(f"in flight: {', '.join(in_flight)}", file=out)
    if report.violations:
        print(f"violations ({len(report.violations)}):", file=out)
        for violation in report.violations:
            print(f"  {violation}", file=out)
    if report.suspects:
        print(
            f"suspects ({len(report.suspects)}), shown broken by some reads but not all (most "
            "likely a transaction that ran between the reads of two services):",
            file=out,
        )
        for suspect in report.suspects:
            print(f"  {suspect}", file=out)
    print(_verdict(report), file=out)


def _verdict(report: invariants.Report) -> str:
    if report.violations:
        return f"VIOLATED: {len(report.violations)} violation(s)"
    if report.suspects:
        return (
            f"ok: no violation, but {len(report.suspects)} suspect(s) not counted; check again, "
            "or with --settle once the shop is quiet, to tell"
        )
    return "ok: every invariant holds"


def _report_dict(
    report: invariants.Report, targets: Sequence[Target], settled: bool
) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "settled": settled,
        "services": {t.name: t.address for t in targets},
        "reads": report.reads,
        "summary": report.summary(),
        "confirmed_orders": report.confirmed_orders,
        "cancelled_orders": report.cancelled_orders,
        "pending_orders": report.pending_orders,
        "units_sold": report.units_sold,
        "captured_cents": report.captured_cents,
        "notifications_sent": report.notifications_sent,
        "in_flight": report.snapshot.in_flight(),
        "violations": report.violations,
        "suspects": report.suspects,
    }
