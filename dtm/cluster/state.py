"""DIR/cluster.json: the settings a cluster was started with, written atomically, read strictly.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dtm.cluster.errors import (
    ClusterError,
    ClusterStateError,
)
from dtm.cluster.ports import (
    Ports,
)
from dtm.cluster.settings import (
    MS_MAX,
    PROCESSES,
)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole: a reader, or the next `down` after a crash mid-write, finds the
    old file or the new one, never one cut short."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # The rename is durable once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_state(path: Path) -> dict[str, Any] | None:
    """cluster.json as saved by `up`; None when there is none."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        raise ClusterStateError(f"cannot read {path}: {error}") from None
    try:
        state = json.loads(text)
    except ValueError as error:
        raise ClusterStateError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(state, dict):
        raise ClusterStateError(f"{path} does not describe a cluster: not a JSON object")
    return state


#: The keys `_write_state` writes. Any other is refused rather than ignored: a hand-edited
#: "tls-dir" read as no TLS dir at all would restart a TLS cluster in plaintext.
STATE_KEYS = (
    "host",
    "ports",
    "test_control",
    "prepare_timeout_ms",
    "transaction_timeout_ms",
    "initial",
    "tls_dir",
    "extra_args",
)


def _recorded_settings(state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Cluster's keyword arguments from cluster.json, each value checked: `bool("false")`
    turned fault injection on, `list("--x")` made three arguments of one, and port 0 or
    99999 reached the servers (found by a bug hunt). ClusterStateError names the key.
    "ports" is required, with all five; a key older files lack takes its default."""

    def wrong(
        key: str, expected: str, value: object = None, *, show: bool = True
    ) -> ClusterStateError:
        shown = f", not {_bounded_json(value)}" if show else ""
        return ClusterStateError(
            f"{path} does not describe a cluster: {key} must be {expected}{shown}"
        )

    unknown = [key for key in state if key not in STATE_KEYS]
    if unknown:
        names = ", ".join(_bounded_json(key) for key in unknown[:5])
        raise ClusterStateError(
            f"{path} does not describe a cluster: unknown key {names} "
            f"(it holds {', '.join(STATE_KEYS)})"
        )
    if "ports" not in state:
        raise wrong('"ports"', "recorded", show=False)
    ports = state["ports"]
    if not isinstance(ports, dict):
        raise wrong('"ports"', f"an object with {', '.join(PROCESSES)}", ports)
    for name in ports:
        if name not in PROCESSES:
            raise wrong(
                f'"ports" key {_bounded_json(name)}', f"one of {', '.join(PROCESSES)}", show=False
            )
    values = []
    for name in PROCESSES:
        if name not in ports:
            raise wrong(f'"ports"."{name}"', "recorded (all five are)", show=False)
        port = ports[name]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise wrong(f'"ports"."{name}"', "a number 1..65535", port)
        values.append(port)
    settings: dict[str, Any] = {"ports": Ports(*values)}

    host = state.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise wrong('"host"', "a non-empty string", host)
    settings["host"] = host
    for key in ("test_control", "initial"):
        if not isinstance(state.get(key, False), bool):
            raise wrong(f'"{key}"', "true or false", state[key])
    settings["test_control"] = state.get("test_control", False)
    for key in ("prepare_timeout_ms", "transaction_timeout_ms"):
        value = state.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MS_MAX
        ):
            raise wrong(f'"{key}"', f"null or a number 1..{MS_MAX}", value)
        settings[key] = value
    tls_dir = state.get("tls_dir")
    if tls_dir is not None and (not isinstance(tls_dir, str) or not tls_dir):
        raise wrong('"tls_dir"', "null (plaintext) or a directory (a string)", tls_dir)
    settings["tls_dir"] = tls_dir
    extra_args = state.get("extra_args")
    if extra_args is None:
        extra_args = {}
    elif not isinstance(extra_args, dict):
        raise wrong('"extra_args"', "an object of process names", extra_args)
    for name, args in extra_args.items():
        if name not in PROCESSES:
            raise wrong(
                f'"extra_args" key {_bounded_json(name)}',
                f"one of {', '.join(PROCESSES)}",
                show=False,
            )
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise wrong(f'"extra_args"."{name}"', "a list of strings", args)
    settings["extra_args"] = extra_args
    return settings


def _bounded_json(value: object, limit: int = 80) -> str:
    """`value` as JSON on one line, cut to `limit` characters (a message, not a dump)."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_initial(path: Path) -> dict[str, Any]:
    """An initial stock/accounts document (--initial, or the copy in the data dir)."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ClusterError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise ClusterError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ClusterError(f'{path} must be a JSON object: {{"stock": ..., "accounts": ...}}')
    return document


def _initial_document(initial: dict[str, Any]) -> dict[str, Any]:
    """An initial state as the services read it: both keys, even if a caller gave one (and
    so as `up` compares it with a running cluster's: the same file twice is no change)."""
    return {"stock": {}, "accounts": {}, **initial}
