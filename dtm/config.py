"""One configuration model for every dtm process: the coordinator, the four services, the CLI.

Where a setting comes from, lowest precedence first:

1. the built-in defaults below (``dtm.example.toml`` at the repository root spells them out);
2. a TOML file: ``--config PATH``, else the path in ``$DTM_CONFIG``; no file is read otherwise
   (never implicitly from the working directory, so a stray file cannot change a test run);
3. environment variables ``DTM_<SECTION>_<KEY>``, e.g. ``DTM_COORDINATOR_LISTEN``;
4. command-line flags: every key has one (``lock_wait_ms`` -> ``--lock-wait-ms``).

Sections: ``[coordinator]``, ``[participant]`` (what the four services share), one section per
service (``[inventory]``, ``[orders]``, ``[payment]``, ``[notification]``: same keys as
``[participant]``, overriding it for that service), ``[log]``, and ``[cli]`` (the `dtm`
command's own certificate, so that an operator's shell needs no DTM_TLS_* variable, which
would also be read by every server started from it). A service of one's own (README "Writing a
new participant") may have a section too, declared in ``[services] custom = ["loyalty"]``:
every process accepts it. Its ``[participant]`` keys (and ``DTM_<NAME>_<KEY>`` of them)
override ``[participant]`` for that service, as a shipped service's section does, and are
checked by every process; its other keys are the service's own settings, which only that
service reads and checks (`own_settings`), with their variables and flags. Within each layer a
service's own section wins over ``[participant]``; across layers the higher layer wins, so
``DTM_PARTICIPANT_LOCK_WAIT_MS`` beats ``[inventory] lock_wait_ms`` from the file.

Everything is validated when a process starts: an unknown section or key (in the file or in a
``DTM_<SECTION>_*`` variable, or a section's key under a misspelled section name such as
``DTM_PARTICIPANTS_LOCK_WAIT_MS``) is an error naming it and where it was found, and a value of
the wrong type or out of range is an error naming the key, the value and what is allowed.
Relative paths (``data_dir``, ``initial``, ``tls_*``) are relative to the working directory,
as flags are; a leading ``~`` is the home directory, as a shell would expand it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dtm import limits

#: Environment variable naming the configuration file when --config is not given.
CONFIG_ENVIRONMENT_VARIABLE = "DTM_CONFIG"
ENVIRONMENT_PREFIX = "DTM_"

COORDINATOR = "coordinator"
PARTICIPANT = "participant"
LOG = "log"
CLI = "cli"
#: The four order-flow services, each with its own section.
SERVICES = ("inventory", "orders", "payment", "notification")
SECTIONS = (COORDINATOR, PARTICIPANT, *SERVICES, LOG, CLI)
#: The file's declaration of the services of one's own (README "Writing a new participant"),
#: each with a section of its own: ``[services] custom = ["loyalty"]``. Declared, a section is
#: accepted by every process and read by the service it names only; undeclared, it is refused
#: as any unknown section, so a typo (``[coordinatr]``) is still caught by every process.
SERVICES_SECTION = "services"
CUSTOM_KEY = "custom"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: The largest value of every *_ms setting: the longest transaction timeout there is.
MS_MAX = limits.TRANSACTION_TIMEOUT_MS_MAX


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key, where, and why.
    `setting` is (section, key) when one value is refused, so that a caller can tell which
    of its own flags would stand in for it (`dtm --coordinator` for [participant]
    coordinator), and not offer one for any other problem of the file."""

    def __init__(self, message: str, setting: tuple[str, str] | None = None) -> None:
        super().__init__(message)
        self.setting = setting


# ---- value kinds: how a raw value (TOML, environment text or flag text) becomes a setting ----


@dataclass(frozen=True)
class Kind:
    """Parses one raw value; returns the setting or raises ValueError saying what is allowed."""

    parse: Callable[[object, bool], object]
    #: Shown in --help next to the flag.
    metavar: str


def _text(raw: object, what: str) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected {what}, got {type(raw).__name__}")
    return raw


def _address(raw: object, port_min: int, optional: bool) -> str:
    allowed = f"host:port with port {port_min}..65535"
    if optional:
        allowed += ', or "" to turn it off'
    text = _text(raw, allowed)
    if optional and text == "":
        return text
    if len(text) > limits.ADDRESS_LENGTH_MAX:
        raise ValueError(f"expected at most {limits.ADDRESS_LENGTH_MAX} characters")
    port = limits.address_port(text)
    if port is None or not port_min <= port <= 65535:
        raise ValueError(f"expected {allowed}{limits.unbracketed_host_hint(text)}")
    return text


def integer(minimum: int, maximum: int) -> Kind:
    def parse(raw: object, from_text: bool) -> int:
        allowed = f"an integer between {minimum} and {maximum}"
        if from_text and isinstance(raw, str):
            try:
                raw = int(raw.strip())
            except ValueError:
                raise ValueError(f"expected {allowed}") from None
        # bool is an int in Python; `true` is not a number of milliseconds.
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected {allowed}")
        if not minimum <= raw <= maximum:
            raise ValueError(f"out of range: allowed {minimum}..{maximum}")
        return raw

    return Kind(parse, "N")


#: How text (an environment variable, a flag) says true or false, in any case.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _boolean(raw: object, from_text: bool) -> bool:
    if from_text and isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
    if not isinstance(raw, bool):
        raise ValueError("expected true or false")
    return raw


def _path(raw: object, from_text: bool) -> Path:
    text = _text(raw, "a path (a string)")
    if not text:
        raise ValueError("expected a path, got an empty string")
    return _checked_path(text)


def path_argument(text: str) -> Path:
    """argparse type of a command's own path options (`--data-dir`), checked as a setting's:
    an empty one read as the working directory, where `python -m dtm.cluster up --data-dir
    ""` started a whole cluster (an operator's hunt; the servers refuse it)."""
    try:
        return _path(text, from_text=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def _optional_path(raw: object, from_text: bool) -> Path | None:
    text = _text(raw, 'a path (a string), or "" for none')
    return _checked_path(text) if text else None


def _checked_path(text: str) -> Path:
    if "\0" in text:  # no file system takes it; os calls would raise ValueError much later
        raise ValueError("expected a path, got one with a NUL character")
    # A shell expands ~ in a flag, nothing did in the file or an environment variable
    # written in quotes: data_dir = "~/dtm" made a directory named "~" in the working one.
    try:
        return Path(text).expanduser()
    except RuntimeError:  # no home directory to expand it to ($HOME unset, no passwd entry)
        raise ValueError(f"cannot expand {text.split('/')[0]!r}: no home directory") from None


def choice(values: Sequence[str], metavar: str, normalize: Callable[[str], str]) -> Kind:
    """One of `values`, compared after `normalize` (str.upper, str.lower: case is free)."""
    allowed = f"one of {', '.join(values)}"

    def parse(raw: object, from_text: bool) -> str:
        text = normalize(_text(raw, allowed).strip())
        if text not in values:
            raise ValueError(f"expected {allowed}")
        return text

    return Kind(parse, metavar)


ADDRESS = Kind(lambda raw, _: _address(raw, 1, optional=False), "HOST:PORT")
#: A bind address: port 0 asks the kernel for a free port.
LISTEN = Kind(lambda raw, _: _address(raw, 0, optional=False), "HOST:PORT")
OPTIONAL_ADDRESS = Kind(lambda raw, _: _address(raw, 1, optional=True), "HOST:PORT")
OPTIONAL_LISTEN = Kind(lambda raw, _: _address(raw, 0, optional=True), "HOST:PORT")
BOOLEAN = Kind(_boolean, "")


def _identity(raw: object, from_text: bool) -> str:
    text = _text(raw, 'an identity (a certificate\'s name), or "" for the default').strip()
    if len(text) > 253 or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("expected a certificate name: at most 253 characters, no spaces")
    return text


#: A TLS identity (a certificate's Common Name or DNS name); "" for the default.
IDENTITY = Kind(_identity, "NAME")
PATH = Kind(_path, "PATH")
OPTIONAL_PATH = Kind(_optional_path, "PATH")
LEVEL = choice(LOG_LEVELS, "LEVEL", str.upper)
#: How a process makes its log durable (dtm.wal): on its event loop, or on a sync thread.
WAL_SYNC_MODES = ("loop", "thread")
WAL_SYNC = choice(WAL_SYNC_MODES, "MODE", str.lower)
_WAL_SYNC_HELP = (
    "how the log is fsynced: loop (on the event loop, once per loop iteration: least CPU) or "
    "thread (a sync thread: the loop never stalls on a slow disk)"
)
#: A participant's may also follow how its calls come: participants.server.settings.wal_sync_mode.
PARTICIPANT_WAL_SYNC_MODES = ("auto", *WAL_SYNC_MODES)
PARTICIPANT_WAL_SYNC = choice(PARTICIPANT_WAL_SYNC_MODES, "MODE", str.lower)
_PARTICIPANT_WAL_SYNC_HELP = (
    "how the log is fsynced: auto (loop with batch = true, thread with batch = false: unary "
    "calls form groups only while a sync thread fsyncs), loop or thread (see [coordinator])"
)


def about(kind: Kind, help: str) -> dict[str, object]:
    """A settings field's metadata: how to parse it and the help text of its flag."""
    return {"kind": kind, "help": help}


#: This process's mutual-TLS files, in [coordinator] and [participant] (and each service's
#: section, since each process has its own certificate). Their flags are dtm.security's
#: --tls-ca, --tls-cert and --tls-key, which also read DTM_TLS_CA, DTM_TLS_CERT, DTM_TLS_KEY.
TLS_KEYS = ("tls_ca", "tls_cert", "tls_key")
_TLS_CA = about(OPTIONAL_PATH, 'the CA of every peer\'s certificate (PEM); "" = plaintext')
_TLS_CERT = about(OPTIONAL_PATH, 'this process\'s certificate (PEM); "" = plaintext')
_TLS_KEY = about(OPTIONAL_PATH, 'this process\'s private key (PEM); "" = plaintext')
# Large enough that a checkpoint's cost is spread over many transactions, small enough that the
# log (and replay after a crash) stays short; chaos sets it low so that kills meet checkpoints.
_CHECKPOINT_EVERY_RECORDS = about(
    integer(100, 100_000_000),
    "write a checkpoint (and drop older log segments) after this many records since the last",
)


# ---- the settings of each section ----


@dataclass(frozen=True)
class CoordinatorSettings:
    listen: str = field(
        default="127.0.0.1:50050", metadata=about(LISTEN, "host:port to serve gRPC on")
    )
    data_dir: Path = field(
        default=Path(".dtm-data"),
        metadata=about(PATH, "directory of the logs of record (DIR/coordinator/wal)"),
    )
    prepare_timeout_ms: int = field(
        default=limits.PREPARE_TIMEOUT_MS_DEFAULT,
        metadata=about(integer(1, MS_MAX), "deadline of each Prepare call"),
    )
    transaction_timeout_ms: int = field(
        default=limits.TRANSACTION_TIMEOUT_MS_DEFAULT,
        metadata=about(
            integer(1, MS_MAX),
            "default global timeout of a transaction (Submit.timeout_ms overrides it)",
        ),
    )
    wal_sync: str = field(default="loop", metadata=about(WAL_SYNC, _WAL_SYNC_HELP))
    checkpoint_every_records: int = field(default=20_000, metadata=_CHECKPOINT_EVERY_RECORDS)
    finished_kept: int = field(
        default=limits.FINISHED_TRANSACTIONS_KEPT,
        metadata=about(
            integer(1, limits.FINISHED_TRANSACTIONS_KEPT),
            "finished transactions remembered, each answering a retried Submit (an older "
            "retry runs again, answered from the participants' records)",
        ),
    )
    batch_linger_ms: int = field(
        default=10,
        metadata=about(
            integer(0, 1_000),
            "under load, how long a batched call to a participant waits for more items (0: none)",
        ),
    )
    batch_decision_linger_ms: int = field(
        default=5,
        metadata=about(
            integer(0, 1_000),
            "how long decisions wait for a prepare to share a participant's call (0: none)",
        ),
    )
    tls_ca: Path | None = field(default=None, metadata=_TLS_CA)
    tls_cert: Path | None = field(default=None, metadata=_TLS_CERT)
    tls_key: Path | None = field(default=None, metadata=_TLS_KEY)
    metrics_listen: str = field(
        default="",
        metadata=about(
            OPTIONAL_LISTEN,
            "host:port of the Prometheus /metrics endpoint (HTTPS requiring a client certificate "
            'of the CA when TLS is on); "" = off',
        ),
    )


@dataclass(frozen=True)
class ParticipantSettings:
    listen: str = field(
        default="127.0.0.1:0", metadata=about(LISTEN, "host:port to serve gRPC on (port 0: any)")
    )
    advertise: str = field(
        default="",
        metadata=about(
            OPTIONAL_ADDRESS,
            'address the coordinator dials; "" = the bound listen address (required when '
            "listen is 0.0.0.0 or [::])",
        ),
    )
    coordinator: str = field(
        default="127.0.0.1:50050",
        metadata=about(ADDRESS, "the coordinator's address (also `dtm`'s default)"),
    )
    data_dir: Path = field(
        default=Path(".dtm-data"),
        metadata=about(PATH, "directory of the logs of record (DIR/<service>/wal)"),
    )
    lock_wait_ms: int = field(
        default=500, metadata=about(integer(1, MS_MAX), "longest wait for a lock")
    )
    batch_lock_wait_ms: int = field(
        default=50,
        metadata=about(
            integer(1, MS_MAX),
            "longest wait for a lock by a prepare in a batched call (at most lock_wait_ms)",
        ),
    )
    lease_unvoted_ms: int = field(
        default=5_000,
        metadata=about(integer(1, MS_MAX), "an unvoted branch holding locks longer is aborted"),
    )
    in_doubt_after_ms: int = field(
        default=2_000,
        metadata=about(integer(0, MS_MAX), "a prepared branch waiting longer asks the coordinator"),
    )
    wal_sync: str = field(
        default="auto", metadata=about(PARTICIPANT_WAL_SYNC, _PARTICIPANT_WAL_SYNC_HELP)
    )
    checkpoint_every_records: int = field(default=20_000, metadata=_CHECKPOINT_EVERY_RECORDS)
    batch: bool = field(
        default=True,
        metadata=about(
            BOOLEAN,
            "declare the batch capability when registering (false: the coordinator sends "
            "this participant unary Prepare, Commit and Rollback, the plain contract's path, "
            "as to a participant outside the SDK)",
        ),
    )
    test_control: bool = field(
        default=False, metadata=about(BOOLEAN, "allow the fault-injection RPC (tests only)")
    )
    tls_ca: Path | None = field(default=None, metadata=_TLS_CA)
    tls_cert: Path | None = field(default=None, metadata=_TLS_CERT)
    tls_key: Path | None = field(default=None, metadata=_TLS_KEY)
    metrics_listen: str = field(
        default="",
        metadata=about(
            OPTIONAL_LISTEN,
            "host:port of the Prometheus /metrics endpoint (HTTPS requiring a client certificate "
            'of the CA when TLS is on); "" = off',
        ),
    )
    initial: Path | None = field(
        default=None,
        metadata=about(OPTIONAL_PATH, 'initial stock and accounts JSON; "" = the built-in catalog'),
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = field(
        default="INFO", metadata=about(LEVEL, "log level: DEBUG, INFO, WARNING or ERROR")
    )


@dataclass(frozen=True)
class CliSettings:
    """The `dtm` command's mutual-TLS files (an operator's or a client's certificate), and the
    coordinator's identity it expects."""

    tls_ca: Path | None = field(default=None, metadata=_TLS_CA)
    tls_cert: Path | None = field(
        default=None,
        metadata=about(OPTIONAL_PATH, 'the dtm command\'s certificate (PEM); "" = plaintext'),
    )
    tls_key: Path | None = field(
        default=None,
        metadata=about(OPTIONAL_PATH, 'the dtm command\'s private key (PEM); "" = plaintext'),
    )
    coordinator_identity: str = field(
        default="",
        metadata=about(
            IDENTITY,
            "the identity the coordinator's certificate must carry, with TLS (its Common Name "
            'or a DNS name); "" = DTM_AUTHZ_COORDINATOR, else "coordinator"',
        ),
    )


#: Defaults that differ per service: the well-known ports of `dtm.cluster` (50051..50054), so
#: that `dtm service inventory` lands where `make up` would put it.
SERVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "inventory": {"listen": "127.0.0.1:50051"},
    "orders": {"listen": "127.0.0.1:50052"},
    "payment": {"listen": "127.0.0.1:50053"},
    "notification": {"listen": "127.0.0.1:50054"},
}


def _service_default(name: str) -> ParticipantSettings:
    return ParticipantSettings(**SERVICE_DEFAULTS[name])


SECTION_TYPES: dict[str, type[Any]] = {
    COORDINATOR: CoordinatorSettings,
    PARTICIPANT: ParticipantSettings,
    **dict.fromkeys(SERVICES, ParticipantSettings),
    LOG: LogSettings,
    CLI: CliSettings,
}


@dataclass(frozen=True)
class Config:
    """The whole configuration; each service's settings are already merged with [participant]."""

    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    #: [participant] alone: what a service that has no section of its own gets.
    participant: ParticipantSettings = field(default_factory=ParticipantSettings)
    inventory: ParticipantSettings = field(default_factory=lambda: _service_default("inventory"))
    orders: ParticipantSettings = field(default_factory=lambda: _service_default("orders"))
    payment: ParticipantSettings = field(default_factory=lambda: _service_default("payment"))
    notification: ParticipantSettings = field(
        default_factory=lambda: _service_default("notification")
    )
    log: LogSettings = field(default_factory=LogSettings)
    cli: CliSettings = field(default_factory=CliSettings)
    #: Each declared service of one's own -> its section of the file as written ({} when it
    #: has none), participant keys included (`custom_participants` has them merged): only
    #: that service knows its other keys, and checks them (`own_settings`). Not hashed (a
    #: dict is not hashable); equality still compares it.
    custom: Mapping[str, Mapping[str, object]] = field(default_factory=dict, hash=False)
    #: Each service of one's own whose settings were merged -> [participant] overridden by the
    #: participant keys of its section and its DTM_<NAME>_<KEY> variables, as a shipped
    #: service's are by its own section (two of them in one file need their own listen).
    custom_participants: Mapping[str, ParticipantSettings] = field(default_factory=dict, hash=False)
    #: The file read, if any (not part of equality: two sources can say the same thing).
    source: Path | None = field(default=None, compare=False)

    def service(self, name: str) -> ParticipantSettings:
        """A service's settings; a service without a section of its own gets [participant]."""
        if name in SERVICES:
            settings: ParticipantSettings = getattr(self, name)
            return settings
        return self.custom_participants.get(name, self.participant)

    def as_dict(self) -> dict[str, dict[str, object]]:
        """Section -> key -> value, with the values as a TOML file would spell them; then
        [services] and each declared section of a service of one's own, as the file has it
        (only that service knows its settings' kinds and defaults)."""
        document: dict[str, dict[str, object]] = {
            section: {
                f.name: _spell(getattr(getattr(self, section), f.name))
                for f in dataclasses.fields(getattr(self, section))
            }
            for section in SECTIONS
        }
        document[SERVICES_SECTION] = {CUSTOM_KEY: list(self.custom)}
        for name, table in self.custom.items():
            document[name] = {key: _spell_as_written(value) for key, value in table.items()}
        return document


def _spell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, Path):
        return str(value)
    return value


def _spell_as_written(value: object) -> object:
    """A value of a section only its service reads, for JSON: a TOML date or time (which no
    JSON has) as its ISO text; a table or an array item by item."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _spell_as_written(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_spell_as_written(item) for item in value]
    return value


def keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTION_TYPES[section])]


def _field(section: str, key: str) -> dataclasses.Field[Any]:
    return _fields(SECTION_TYPES[section])[key]


def _fields(settings_type: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(settings_type)}


def default_of(section: str, key: str) -> object:
    if section in SERVICE_DEFAULTS and key in SERVICE_DEFAULTS[section]:
        return SERVICE_DEFAULTS[section][key]
    return _field(section, key).default


def environment_variable(section: str, key: str) -> str:
    # A service of one's own may be named my-service: DTM_MY_SERVICE_*, as a shell allows.
    return f"{ENVIRONMENT_PREFIX}{section.upper().replace('-', '_')}_{key.upper()}"


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---- the three layers ----

Layer = dict[str, dict[str, object]]


def _parse(section: str, key: str, raw: object, from_text: bool) -> object:
    return _parse_field(_field(section, key), raw, from_text)


def _parse_field(setting: dataclasses.Field[Any], raw: object, from_text: bool) -> object:
    kind: Kind = setting.metadata["kind"]
    return kind.parse(raw, from_text)


def _read_file(path: Path) -> tuple[Layer, dict[str, dict[str, object]]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist (given by --config or "
            f"${CONFIG_ENVIRONMENT_VARIABLE}); see dtm.example.toml for a complete example"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    try:
        # utf-8-sig: a byte order mark (Windows editors write one) made line 1 column 1 an
        # "Invalid statement", which no one can see in the file.
        document = tomllib.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    custom = _declared_services(path, document)
    layer: Layer = {}
    for section, table in document.items():
        if section == SERVICES_SECTION:
            continue
        if section not in SECTIONS and section not in custom:
            raise ConfigError(_unknown_section(path, section, list(custom)))
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section!r} must be a section [{section}], not a value")
        if section in custom:
            custom[section] = table
            layer[section] = _participant_keys_of_custom(path, section, table)
        else:
            layer[section] = _read_table(path, section, table, _fields(SECTION_TYPES[section]))
    return layer, custom


def _participant_keys_of_custom(
    path: Path, section: str, table: Mapping[str, object]
) -> dict[str, object]:
    """The participant settings in a declared section of a service of one's own, checked as
    those of a shipped service's section are; its other keys are that service's to check."""
    settings = _fields(ParticipantSettings)
    if "initial" in table:
        raise ConfigError(
            f"{path}: [{section}] initial: {section} reads no initial file (inventory and "
            "payment do); a service of one's own builds its initial state itself",
            (section, "initial"),
        )
    ours = {key: raw for key, raw in table.items() if key in settings}
    return _read_table(path, section, ours, settings)


def _unknown_section(path: Path, section: str, custom: Sequence[str]) -> str:
    known = [*SECTIONS, SERVICES_SECTION, *custom]
    return (
        f"{path}: unknown section [{section}]{_suggest(section, known)} (sections: "
        f"{', '.join(f'[{s}]' for s in known)}; a section of a service of one's own is "
        f'declared: [{SERVICES_SECTION}] {CUSTOM_KEY} = ["{section}"])'
    )


def _read_table(
    path: Path | None,
    section: str,
    table: Mapping[str, object],
    settings: Mapping[str, dataclasses.Field[Any]],
    also_known: Sequence[str] = (),
) -> dict[str, object]:
    """A section of the file, each key checked and parsed; `also_known` are keys the section
    also takes, read elsewhere (named when a key is unknown)."""
    values: dict[str, object] = {}
    for key, raw in table.items():
        if key not in settings:
            known = [*settings, *also_known]
            raise ConfigError(
                f"{path}: unknown key {key!r} in [{section}]{_suggest(key, known)} "
                f"(known keys: {', '.join(known)})"
            )
        try:
            values[key] = _parse_field(settings[key], raw, from_text=False)
        except ValueError as problem:
            raise ConfigError(
                f"{path}: [{section}] {key} = {raw!r}: {problem}", (section, key)
            ) from None
    return values


def _declared_services(path: Path, document: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """[services] custom of the file: each declared name -> {} (its section, once read)."""
    table = document.get(SERVICES_SECTION, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"{path}: {SERVICES_SECTION!r} must be a section [{SERVICES_SECTION}], not a value"
        )
    for key in table:
        if key != CUSTOM_KEY:
            raise ConfigError(
                f"{path}: unknown key {key!r} in [{SERVICES_SECTION}]"
                f"{_suggest(key, [CUSTOM_KEY])} (known keys: {CUSTOM_KEY})"
            )
    names = table.get(CUSTOM_KEY, [])
    where = f"{path}: [{SERVICES_SECTION}] {CUSTOM_KEY}"
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{where} = {names!r}: expected a list of service names (strings)")
    declared: dict[str, dict[str, object]] = {}
    for name in names:
        problem = limits.participant_name_problem(name) or dtms_own_section_problem(name)
        if problem is None and name in declared:
            problem = f"{name!r} is declared twice"
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        declared[name] = {}
    return declared


def dtms_own_section_problem(name: str) -> str | None:
    """What is wrong with `name` as that of a service of one's own: a section of dtm's
    ([log], [participant], [inventory]...) has dtm's settings, not the service's; else None."""
    if name in (*SECTIONS, SERVICES_SECTION):
        return f"[{name}] is dtm's own section, not a service of one's own"
    return None


def _read_environment(environ: Mapping[str, str], custom: Sequence[str] = ()) -> Layer:
    """The DTM_<SECTION>_<KEY> variables; for a service of one's own in `custom`, only those
    naming a participant setting (its own settings' are its own to check: `own_settings`)."""
    layer: Layer = {}
    for name in custom:
        values = _participant_variables_of_custom(environ, name)
        if values:
            layer[name] = values
    custom_prefixes = tuple(environment_variable(name, "") for name in custom)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENVIRONMENT_PREFIX):
            continue
        rest = name[len(ENVIRONMENT_PREFIX) :].lower()
        # Only DTM_<SECTION>_* is ours to check: DTM_CONFIG, DTM_CRASH_AT... mean other things.
        section = next((s for s in SECTIONS if rest.startswith(f"{s}_")), None)
        if section is None:
            misspelled = _misspelled_section(rest)
            if misspelled is not None:
                raise ConfigError(
                    f"environment variable {name}: there is no section "
                    f"[{rest[: -len(misspelled[1]) - 1]}]; did you mean "
                    f"{environment_variable(*misspelled)}? (sections: {', '.join(SECTIONS)})"
                )
            continue
        key = rest[len(section) + 1 :]
        if key not in keys(section) and name.startswith(custom_prefixes):
            # A service of one's own named after a section (log-shipper): DTM_LOG_SHIPPER_*
            # is its own, not [log]'s unknown key shipper_*.
            continue
        values = layer.setdefault(section, {})
        values[key] = _read_variable(name, raw, section, key, _fields(SECTION_TYPES[section]))
    return layer


def _participant_variables_of_custom(environ: Mapping[str, str], name: str) -> dict[str, object]:
    prefix = environment_variable(name, "")
    settings = _fields(ParticipantSettings)
    values: dict[str, object] = {}
    for variable, raw in sorted(environ.items()):
        key = variable[len(prefix) :].lower()
        if variable.startswith(prefix) and key in settings:
            values[key] = _read_variable(variable, raw, name, key, settings)
    return values


def _read_variable(
    name: str, raw: str, section: str, key: str, settings: Mapping[str, dataclasses.Field[Any]]
) -> object:
    """Environment variable `name`, setting `key` of `section`, checked and parsed."""
    if key not in settings:
        known = list(settings)
        hint = difflib.get_close_matches(key, known, n=1)
        did_you_mean = f"; did you mean {environment_variable(section, hint[0])}?" if hint else ""
        raise ConfigError(
            f"environment variable {name}: [{section}] has no key {key!r}{did_you_mean} "
            f"(known keys: {', '.join(known)})"
        )
    try:
        return _parse_field(settings[key], raw, from_text=True)
    except ValueError as problem:
        raise ConfigError(
            f"environment variable {name}={raw!r}: {problem}", (section, key)
        ) from None


#: How close a word must be to a section's name to be taken for a misspelling of it.
_SECTION_LIKENESS_MIN = 0.8


def _misspelled_section(rest: str) -> tuple[str, str] | None:
    """(section, key) when `rest` (a DTM_* variable's name after DTM_, lowercased) reads as
    a section's key under a misspelled section name (``participants_lock_wait_ms``), else
    None. Other DTM_* variables mean other things and are left alone; but a typo in the
    section would leave the setting at its default, silently."""
    for cut in (index for index, char in enumerate(rest) if char == "_"):
        word, key = rest[:cut], rest[cut + 1 :]
        close = difflib.get_close_matches(word, SECTIONS, n=1, cutoff=_SECTION_LIKENESS_MIN)
        if close and key in keys(close[0]):
            return close[0], key
    return None


def _read_flags(flags: Mapping[str, Mapping[str, object]]) -> Layer:
    layer: Layer = {}
    for section, values in flags.items():
        known = keys(section)
        for key, raw in values.items():
            assert key in known, f"flag for unknown key {section}.{key}"
            try:
                layer.setdefault(section, {})[key] = _parse(section, key, raw, from_text=True)
            except ValueError as problem:
                raise ConfigError(f"--{key.replace('_', '-')} {raw!r}: {problem}") from None
    return layer


Settings = TypeVar("Settings")


def _merge(
    cls: Callable[..., Settings],
    base: Mapping[str, Any],
    layers: Sequence[Layer],
    chain: Sequence[str],
) -> Settings:
    values: dict[str, Any] = dict(base)
    for layer in layers:
        for section in chain:
            values.update(layer.get(section, {}))
    return cls(**values)


def config_path(path: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read: --config, else $DTM_CONFIG, else none."""
    environ = os.environ if environ is None else environ
    if path is not None:
        return path
    from_environment = environ.get(CONFIG_ENVIRONMENT_VARIABLE, "")
    return Path(from_environment) if from_environment else None


def load(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Mapping[str, object]] | None = None,
    service: str | None = None,
) -> Config:
    """The configuration from defaults, the file, the environment and `flags`, validated.

    `path` is --config (None: $DTM_CONFIG, else no file). `environ` defaults to os.environ.
    `flags` maps a section to the flags given on the command line (raw text or bool), only
    those actually given. `service` is this process's service of one's own, if it is one:
    its DTM_<NAME>_<KEY> participant variables apply even when the file declares no section
    for it. Raises ConfigError.
    """
    environ = os.environ if environ is None else environ
    source = config_path(path, environ)
    file_layer, custom = _read_file(source) if source is not None else ({}, {})
    own = [*custom, *([service] if service is not None and service not in custom else [])]
    own = [name for name in own if name not in SECTIONS]
    layers = [
        file_layer,
        _read_environment(environ, own),
        _read_flags(flags or {}),
    ]
    services = {
        name: _merge(ParticipantSettings, SERVICE_DEFAULTS[name], layers, [PARTICIPANT, name])
        for name in SERVICES
    }
    # Within a layer a service's section wins over [participant], as for the shipped ones.
    custom_participants = {
        name: _merge(ParticipantSettings, {}, layers, [PARTICIPANT, name]) for name in own
    }
    return Config(
        coordinator=_merge(CoordinatorSettings, {}, layers, [COORDINATOR]),
        participant=_merge(ParticipantSettings, {}, layers, [PARTICIPANT]),
        log=_merge(LogSettings, {}, layers, [LOG]),
        cli=_merge(CliSettings, {}, layers, [CLI]),
        custom=custom,
        custom_participants=custom_participants,
        source=source,
        **services,
    )


# ---- command-line flags, generated from the settings so that every key has one ----

PRECEDENCE_HELP = (
    "Settings come from (lowest precedence first) built-in defaults, the TOML file given by "
    f"--config or ${CONFIG_ENVIRONMENT_VARIABLE}, environment variables DTM_<SECTION>_<KEY>, "
    "then these flags. See dtm.example.toml."
)


def _default_text(default: object) -> str:
    value = _spell(default)
    if value == "":
        return '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add_flag(
    parser: argparse.ArgumentParser, setting: dataclasses.Field[Any], default: object
) -> None:
    """The flag of one setting: --lock-wait-ms N, or --batch/--no-batch for a boolean."""
    meta = setting.metadata
    flag = "--" + setting.name.replace("_", "-")
    help_text = f"{meta['help']} (default: {_default_text(default)})"
    if meta["kind"] is BOOLEAN:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    else:
        parser.add_argument(flag, default=None, metavar=meta["kind"].metavar, help=help_text)


def add_flags(parser: argparse.ArgumentParser, section: str, exclude: Sequence[str] = ()) -> None:
    """--config, one flag per key of `section` (none of them with a default: an absent flag
    leaves the lower layers in charge), and --log-level."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"TOML configuration file (default: ${CONFIG_ENVIRONMENT_VARIABLE}, else none)",
    )
    for key in keys(section):
        if key in exclude or key in TLS_KEYS:  # dtm.security's flags
            continue
        _add_flag(parser, _field(section, key), default_of(section, key))
    parser.add_argument(
        "--log-level", default=None, metavar="LEVEL", help=_field(LOG, "level").metadata["help"]
    )


def from_options(
    options: argparse.Namespace,
    section: str,
    environ: Mapping[str, str] | None = None,
    service: str | None = None,
) -> Config:
    """The configuration, given a command line parsed by a parser that `add_flags(parser,
    section)` set up: the flags given there apply to `section`; `service` as `load` takes
    it. Raises ConfigError."""
    flags: dict[str, dict[str, object]] = {
        section: {
            key: getattr(options, key)
            for key in keys(section)
            # The TLS flags are dtm.security's, which weighs them against DTM_TLS_*.
            if key not in TLS_KEYS and getattr(options, key, None) is not None
        }
    }
    if options.log_level is not None:
        flags[LOG] = {"level": options.log_level}
    return load(options.config, environ=environ, flags=flags, service=service)


# ---- the settings of a service of one's own ----


def settings_type_problem(settings_type: object) -> str | None:
    """What keeps `settings_type` from being a service's own settings, or None: a dataclass
    whose every field has a default and `about(kind, help)`, named unlike a participant
    setting (the service's section takes those too, and their flags are taken)."""
    if not (isinstance(settings_type, type) and dataclasses.is_dataclass(settings_type)):
        return f"settings_type must be a dataclass of the service's settings, not {settings_type!r}"
    for setting in dataclasses.fields(settings_type):
        if not isinstance(setting.metadata.get("kind"), Kind) or "help" not in setting.metadata:
            return f"setting {setting.name}: its field needs metadata=config.about(kind, help)"
        if setting.default is dataclasses.MISSING:  # a value, as each of dtm's settings has
            return f"setting {setting.name}: its field needs a default (default=...)"
        if setting.name in keys(PARTICIPANT):
            # [name] and DTM_<NAME>_* take participant settings too: which one would it be?
            return (
                f"setting {setting.name}: named as the participant setting {setting.name}, "
                "which the service's section also takes (as [participant]'s, for this "
                "service); rename it"
            )
        if setting.name in ("config", "log_level"):
            return f"setting {setting.name}: named as the flag --{setting.name.replace('_', '-')}"
    return None


def add_own_flags(parser: argparse.ArgumentParser, settings_type: type[Any]) -> None:
    """One flag per setting of a service of one's own, beside `add_flags`'."""
    for setting in dataclasses.fields(settings_type):
        _add_flag(parser, setting, setting.default)


def own_settings(
    name: str,
    settings_type: type[Settings],
    cfg: Config,
    environ: Mapping[str, str],
    flags: Mapping[str, object],
) -> Settings:
    """The settings of service `name` of one's own, an instance of its `settings_type`, from
    its defaults, its section [name] of the file (declared in [services] custom), its
    DTM_<NAME>_<KEY> variables and `flags` (those given), checked as dtm's own are: an unknown
    key is an error with a did-you-mean. Participant settings in [name] and DTM_<NAME>_* are
    `load`'s (cfg.service(name)), not these. Raises ConfigError."""
    settings = _fields(settings_type)
    participant = keys(PARTICIPANT)  # read by `load`, as [participant]'s for this service
    values = _read_table(cfg.source, name, own_keys(cfg, name), settings, participant)
    prefix = environment_variable(name, "")
    for variable, raw in sorted(environ.items()):
        key = variable[len(prefix) :].lower()
        if variable.startswith(prefix) and key not in participant:
            values[key] = _read_variable(variable, raw, name, key, settings)
    for key, given in flags.items():
        try:
            values[key] = _parse_field(settings[key], given, from_text=True)
        except ValueError as problem:
            raise ConfigError(f"--{key.replace('_', '-')} {given!r}: {problem}") from None
    return settings_type(**values)


def own_keys(cfg: Config, name: str) -> dict[str, object]:
    """The keys of section [name] of the file that are not participant settings (those are
    `load`'s): what a service of one's own reads, as the file has them."""
    participant = keys(PARTICIPANT)
    return {key: raw for key, raw in cfg.custom.get(name, {}).items() if key not in participant}


def tls_files(
    settings: CoordinatorSettings | ParticipantSettings | CliSettings,
) -> dict[str, Path | None]:
    """What dtm.security.from_options takes as the configured CA, certificate and key."""
    return {"ca": settings.tls_ca, "cert": settings.tls_cert, "key": settings.tls_key}


def tls_origin(cfg: Config, section: str) -> str:
    """Where the tls_* settings of `section` (with [participant] for a service) came from, for
    messages about their files: the configuration file's section, or the variables."""
    return setting_origin(cfg, section, "tls_*")


def setting_origin(cfg: Config, section: str, key: str) -> str:
    """Where setting `key` of `section` (with [participant] for a service) may have come from,
    for messages about its value: the configuration file's section(s), or the variables."""
    overriding = section in SERVICES or section in cfg.custom_participants
    sections = [section, PARTICIPANT] if overriding else [section]
    variables = " or ".join(environment_variable(s, key) for s in sections)
    if cfg.source is None:
        return variables
    return f"{' or '.join(f'[{s}]' for s in sections)} of {cfg.source}, or {variables}"


def participant_section(name: str) -> str:
    """The section a service's flags apply to: its own if it has one, else [participant]."""
    return name if name in SERVICES else PARTICIPANT


def with_configured_initial(service: str, argv: Sequence[str] | None) -> list[str]:
    """`argv` with ``--initial PATH`` in front when the file or the environment names one.

    The services' mains read --initial themselves, before the SDK parses the rest; putting the
    configured path first keeps an explicit --initial (argparse keeps the last) in charge.
    """
    return configured_initial(service, argv)[0]


def configured_initial(service: str, argv: Sequence[str] | None) -> tuple[list[str], str | None]:
    """`with_configured_initial`, and the setting that gave the --initial put in front (for
    messages about its file: ``initial ([inventory] ... of FILE, or DTM_INVENTORY_INITIAL
    ...)``), or None when none was."""
    args = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--config", type=Path, default=None)
    options, _ = probe.parse_known_args(args)
    try:
        cfg = load(options.config)
    except ConfigError as error:
        # Exit status 2, as the same error found by the SDK's own parser (a service without
        # an --initial, a flag) exits: a configuration refused is a usage error.
        print(f"dtm service {service}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    initial = cfg.service(service).initial
    if initial is None:
        return args, None
    origin = f"initial ({setting_origin(cfg, participant_section(service), 'initial')})"
    return ["--initial", str(initial), *args], origin


__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "SECTIONS",
    "SERVICES",
    "TLS_KEYS",
    "CliSettings",
    "Config",
    "ConfigError",
    "CoordinatorSettings",
    "LogSettings",
    "ParticipantSettings",
    "add_flags",
    "add_own_flags",
    "config_path",
    "configured_initial",
    "default_of",
    "dtms_own_section_problem",
    "environment_variable",
    "from_options",
    "keys",
    "load",
    "own_keys",
    "own_settings",
    "participant_section",
    "setting_origin",
    "settings_type_problem",
    "tls_files",
    "tls_origin",
    "with_configured_initial",
]
