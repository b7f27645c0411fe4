"""A participant process's settings: ParticipantConfig, from flags, the configuration file
and the environment.

Part of `participants.server`: see its docstring."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm import config, limits, security


@dataclass
class ParticipantConfig:
    data_dir: Path
    listen: str = "127.0.0.1:0"
    # Address the coordinator should dial; defaults to the bound listen address.
    advertise: str = ""
    coordinator: str = ""
    test_control: bool = False
    # Lock wait: long enough to ride out a normal commit of the holder (a few ms on loopback),
    # short enough that a deadlock costs less than a client's patience.
    lock_wait_ms: int = 500
    # Lock wait of a prepare that arrived in a PrepareBatch. One answer carries the whole
    # batch, so a long wait for one item would hold every other item's vote back (and an item
    # waiting for a lock held by an earlier item of the same batch would wait for a decision
    # that cannot come before the batch is answered). Batched prepares wait this long at most,
    # then are refused as "lock timeout"; unary prepares wait lock_wait_ms.
    batch_lock_wait_ms: int = 50
    # An unvoted branch holding locks longer than this is aborted and its locks reclaimed.
    lease_unvoted_ms: int = 5_000
    # A prepared branch waiting longer than this starts asking the coordinator.
    in_doubt_after_ms: int = 2_000
    inquiry_backoff_ms_max: int = 5_000
    checkpoint_every_records: int = 20_000
    # Declare the batch capability when registering (Capabilities.batch): false makes the
    # coordinator speak the plain unary contract to this participant (bench
    # --unary-participants measures that path with the shipped services).
    batch: bool = True
    tick_ms: int = 100
    # None: plaintext and no authorization (local development only); see dtm.security.
    tls: security.TlsConfig | None = None
    # host:port of the Prometheus endpoint; "" = off (see dtm.metrics).
    metrics_listen: str = ""
    # None: DTM_LOG_LEVEL, else INFO (see dtm.logs).
    log_level: str | None = None
    # "auto", "loop" or "thread": see wal_sync_mode.
    wal_sync: str = "auto"
    # An operator's override for this start only (--replace-registration; deliberately not a
    # configuration key, which would outlive the start): register with
    # RegisterParticipantRequest.replace, taking the name even while the coordinator owes the
    # registered incarnation decisions. For a participant whose log was lost: each owed Commit
    # then becomes a heuristic hazard.
    replace_registration: bool = False
    # A service of one's own's settings (its Service.settings_type), for run() to hand to its
    # configure(); None when it declares none.
    own_settings: Any = None


def wal_sync_mode(participant: ParticipantConfig) -> str:
    """The log's sync mode ("loop" or "thread") for `participant.wal_sync`, resolving "auto".

    Group commit needs records appended while an fsync runs. A batched call brings many at
    once, so fsyncing on the loop ("loop", least CPU) groups them. Unary calls do not: gRPC's
    asyncio server hands the loop one call per completion-queue event, and an fsync on the loop
    stops it taking the next, so each fsync covered 1.1-1.9 records even with tens of calls
    queued (docs/architecture.md, section 7). A sync thread fsyncs while the loop goes on
    taking calls, so a participant served unary calls (batch = false) gets "thread"."""
    if participant.wal_sync != "auto":
        return participant.wal_sync
    return "loop" if participant.batch else "thread"


def _not_for_a_service_of_ones_own(
    name: str, initial: str | None, environ: Mapping[str, str]
) -> str | None:
    """What a service of one's own (whose name is none of config.SERVICES, e.g.
    examples/loyalty) was given that it would otherwise ignore without a word: --initial or
    DTM_<NAME>_INITIAL, an initial file only the shipped services' mains read. (Its other
    DTM_<NAME>_<KEY> participant variables override [participant] for it, as a shipped
    service's do: config.load.)"""
    if name in config.SERVICES:
        return None
    if initial is not None:
        return f"--initial: {_reads_no_initial_file(name)}"
    variable = config.environment_variable(name, "initial")
    if variable in environ:
        return f"environment variable {variable}: {_reads_no_initial_file(name)}"
    return None


def _name_of_a_section_of_dtms(name: str) -> str | None:
    """What is wrong with a service of one's own named like a section of dtm's other than a
    shipped service's ([log], [participant]...), else None. Taken for that section, it
    skipped the checks of a service of one's own, and its DTM_<NAME>_* variables (DTM_LOG_*)
    mean something else."""
    if name in config.SERVICES:
        return None
    problem = config.dtms_own_section_problem(name)
    if problem is None:
        return None
    return f"a service of one's own cannot be named {name!r}: {problem}; choose another name"


def _reads_no_initial_file(name: str) -> str:
    return (
        f"{name} reads no initial file (inventory and payment do); a service of one's own "
        "builds its initial state itself, before it calls run()"
    )


def parse_args(
    name: str, argv: list[str] | None, settings_type: type[Any] | None = None
) -> ParticipantConfig:
    """The participant's configuration; with `settings_type` (a service of one's own's
    Service.settings_type, checked by config.settings_type_problem), its own settings too."""
    parser = argparse.ArgumentParser(
        prog=f"dtm service {name}", description=f"The {name} participant. {config.PRECEDENCE_HELP}"
    )
    # The flags apply to the service's own section ([inventory]...), else to [participant].
    # --initial is the service main's: it takes it out of the command line (split_initial_arg)
    # and builds the service before the SDK runs. Declared here only so --help shows it.
    problem = _name_of_a_section_of_dtms(name)
    if problem:
        parser.error(problem)
    section = config.participant_section(name)
    config.add_flags(parser, section, exclude=("initial",))
    parser.add_argument(
        "--initial",
        metavar="PATH",
        default=None,
        help="initial stock (inventory) or accounts (payment) as JSON, see "
        "participants/services/catalog.py; read only while the service's log is empty, and "
        "accepted but ignored by orders and notification, refused by a service of one's own "
        "(default: initial of the "
        'configuration, else "": the built-in catalog)',
    )
    # Not a configuration key: a setting in a file or the environment would outlive the start
    # it is meant for, and turn off the guard against a second process under the name.
    parser.add_argument(
        limits.REPLACE_REGISTRATION_FLAG,
        action="store_true",
        help="for this start only: this process replaces the registered participant of this "
        "name, whose log was lost; the coordinator lets it register even while it owes the "
        "lost one decisions, and each owed commit becomes a heuristic hazard for an operator "
        "to reconcile (dtm heuristics). Never for a participant whose log is intact, nor as "
        "a default",
    )
    security.add_arguments(parser)
    if settings_type is not None:
        try:
            config.add_own_flags(parser, settings_type)
        except argparse.ArgumentError as error:  # a setting named as a flag of dtm's (--tls-ca)
            parser.error(f"{name}'s settings_type: {error}")
    options = parser.parse_args(argv)
    problem = _not_for_a_service_of_ones_own(name, options.initial, os.environ)
    if problem:
        parser.error(problem)
    try:
        # A service of one's own: its DTM_<NAME>_* participant variables are read too.
        own_name = None if name in config.SECTIONS else name
        settings = config.from_options(options, section, service=own_name)
        tls = security.from_options(
            options,
            configured=config.tls_files(settings.service(name)),
            configured_in=config.tls_origin(settings, own_name or section),
        )
    except security.TlsMaterialError as error:
        # A configuration refused, so status 2 as for any other; but one line without the
        # usage text, since the flags themselves were fine: the files they name are not.
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:  # config.ConfigError included: it names the key and the value
        parser.error(str(error))
    try:
        own = _own_settings(name, settings_type, settings, options)
    except config.ConfigError as error:
        parser.error(str(error))
    service = settings.service(name)
    if limits.is_wildcard(service.listen) and not service.advertise:
        # The registration would carry the wildcard, which the coordinator dials as its own
        # host (Linux) or not at all: right only by chance, and wrong without a word.
        parser.error(
            f"listen {service.listen} is every interface of this machine, no address the "
            "coordinator can dial: set advertise (--advertise HOST:PORT, the address the "
            "coordinator reaches this service at), or listen on one address"
        )
    return ParticipantConfig(
        data_dir=service.data_dir,
        listen=service.listen,
        advertise=service.advertise,
        coordinator=service.coordinator,
        test_control=service.test_control,
        lock_wait_ms=service.lock_wait_ms,
        batch_lock_wait_ms=service.batch_lock_wait_ms,
        lease_unvoted_ms=service.lease_unvoted_ms,
        in_doubt_after_ms=service.in_doubt_after_ms,
        tls=tls,
        metrics_listen=service.metrics_listen,
        log_level=settings.log.level,
        wal_sync=service.wal_sync,
        checkpoint_every_records=service.checkpoint_every_records,
        batch=service.batch,
        replace_registration=options.replace_registration,
        own_settings=own,
    )


def _own_settings(
    name: str, settings_type: type[Any] | None, settings: config.Config, options: argparse.Namespace
) -> Any:
    """The service's own settings, or None; a section of the file for a service that declares
    none is refused, as any unknown key is."""
    if settings_type is None:
        table = config.own_keys(settings, name)
        if table:
            raise config.ConfigError(
                f"{settings.source}: unknown key {next(iter(table))!r} in [{name}]: {name} "
                "declares no settings of its own (Service.settings_type)"
            )
        return None
    flags = {
        setting.name: getattr(options, setting.name)
        for setting in dataclasses.fields(settings_type)
        if getattr(options, setting.name) is not None
    }
    return config.own_settings(name, settings_type, settings, os.environ, flags)
