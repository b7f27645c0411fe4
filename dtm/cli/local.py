"""Commands that need no server: log dump, crashpoints, config; and running a server.

Part of `dtm.cli`: see its docstring."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dtm import config, crashpoints
from dtm.cli import tables as fmt
from dtm.cli.session import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Session,
)

# ---- local tools ----


def cmd_log_dump(session: Session) -> int:
    from dtm import wal

    path: Path = session.options.path
    if not path.exists():
        raise CliError(
            f"{path} does not exist; a log is a directory DATA_DIR/<process>/wal, e.g. "
            ".dtm-data/coordinator/wal or .dtm-data/inventory/wal"
        )
    if path.is_dir() and not _has_segments(path):
        logs = sorted(str(p.parent) for p in path.glob("*/wal/*.wal"))
        if (path / "wal").is_dir():
            path = path / "wal"
        elif logs:
            unique = sorted(set(logs))
            raise CliError(f"{path} holds no log segments; it has logs at: {', '.join(unique)}")
        # Printing nothing would read as "an empty log": say that there is none here.
        if not _has_segments(path):
            raise CliError(
                f"{path} holds no log segments (*.wal files); a log is a directory "
                "DATA_DIR/<process>/wal, e.g. .dtm-data/coordinator/wal"
            )
    try:
        lines = list(wal.dump(path))
    except OSError as error:
        raise CliError(f"cannot read {path}: {error}") from None
    not_a_log = None
    if lines and lines[-1].startswith("NOT A LOG"):
        # /etc/services, or garbage named like a segment: an error, not a "torn tail". The
        # records of the segments before it are printed first (they were hidden).
        not_a_log = lines.pop().removeprefix("NOT A LOG ")
        if not lines:
            raise CliError(not_a_log)
    corrupted = not_a_log is not None or any(line.startswith("CORRUPTED") for line in lines)
    # Its records cannot be read by this build: an error too, though not corruption.
    newer = any(line.startswith("NEWER FRAME FORMAT") for line in lines)
    if session.json:
        document: dict[str, Any] = {"path": str(path), "lines": lines, "corrupted": corrupted}
        if not_a_log is not None:
            document["not_a_log"] = not_a_log
        if newer:
            document["newer_frame_format"] = True
        fmt.emit_json(document, session.out)
    else:
        for line in lines:
            print(line, file=session.out)
        verdicts = ("lsn=", "CORRUPTED", "TORN", "NEWER")
        if not_a_log is None and not any(line.startswith(verdicts) for line in lines):
            # Printing nothing (or the file headers alone) read as a failure to look (a
            # zero-byte file, or a new log). Not before the error that a file is no log.
            print(f"{path}: empty, no records", file=session.out)
    if not_a_log is not None:
        raise CliError(not_a_log)
    return EXIT_ERROR if corrupted or newer else EXIT_OK


def _has_segments(directory: Path) -> bool:
    return any(p.suffix == ".wal" for p in directory.iterdir())


def cmd_crashpoints(session: Session) -> int:
    if session.json:
        fmt.emit_json(dict(crashpoints.POINTS), session.out)
        return EXIT_OK
    fmt.table(["CRASH POINT", "WHERE"], list(crashpoints.POINTS.items()), session.out)
    print(
        f"\narm one with {crashpoints.ENVIRONMENT_VARIABLE}=<point> (die at its first hit) or "
        f"{crashpoints.ENVIRONMENT_VARIABLE}=<point>@<n> (at its n-th)",
        file=session.out,
    )
    return EXIT_OK


def cmd_config(session: Session) -> int:
    try:
        settings = config.load(session.options.config)
    except config.ConfigError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    document = settings.as_dict()
    if session.json:
        fmt.emit_json(document, session.out)
        return EXIT_OK
    source = settings.source or "none (built-in defaults and DTM_* variables)"
    print(f"# configuration in effect; file: {source}", file=session.out)
    overriding = [
        name for name in ("DTM_TLS_CA", "DTM_TLS_CERT", "DTM_TLS_KEY") if os.environ.get(name)
    ]
    if overriding:
        # dtm.security reads these after the file: they win over every section's tls_* below.
        print(
            f"# {', '.join(overriding)} set: overrides tls_* of every process started here",
            file=session.out,
        )
    for section, values in document.items():
        print(f"\n[{section}]", file=session.out)
        if section in settings.custom:
            # Read by that service alone, which knows its settings: shown as the file has them.
            print(
                f"# as written in the file: participant keys override [participant] for "
                f"{section}, the others are its own settings, checked by the {section} service",
                file=session.out,
            )
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}", file=session.out)
    return EXIT_OK


def run_server(options: argparse.Namespace, extra: list[str]) -> int:
    """`dtm coordinator` / `dtm service NAME`: the process's own main, in the foreground."""
    args = list(extra)
    if options.config is not None:
        args = ["--config", str(options.config), *args]
    if options.command == "coordinator":
        from dtm.coordinator.server import main as server_main
    else:
        if options.name is None:
            if {"-h", "--help"} & set(extra):
                print(options.service_help(), end="")
                return EXIT_OK
            raise CliError(f"which service? one of {', '.join(config.SERVICES)}", EXIT_USAGE)
        import importlib

        module = importlib.import_module(f"participants.services.{options.name}")
        server_main = module.main
    try:
        server_main(args)
    except SystemExit as done:  # --help, or a usage error the server's parser reported
        if isinstance(done.code, int):
            return done.code
        if isinstance(done.code, str):
            # SystemExit("message") (a bad --config or --initial): Python would print it at
            # exit; caught here, it is printed here, or the process ends without a word.
            print(done.code, file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a port in use, an unreadable data directory...
        raise CliError(str(error)) from None
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK
