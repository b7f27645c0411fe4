"""dtm.config: defaults < file < environment < flags, validation with clear errors, the example
file, and the coordinator's and participants' command lines built on it."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dtm import config
from dtm.config import Config, ConfigError, load
from dtm.coordinator import server as coordinator_server
from dtm.coordinator.registry import RegistrationError, validate_registration
from dtmpb.v1 import coordinator_pb2
from participants import server as participant_server
from participants.server.settings import wal_sync_mode

EXAMPLE = Path(__file__).resolve().parent.parent / "dtm.example.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- defaults and the example file ----


def test_defaults() -> None:
    settings = load(environ={})
    assert Config() == settings
    assert "127.0.0.1:50050" == settings.coordinator.listen
    assert Path(".dtm-data") == settings.coordinator.data_dir
    assert 2_000 == settings.coordinator.prepare_timeout_ms
    assert "" == settings.coordinator.metrics_listen  # metrics are off by default
    assert "127.0.0.1:0" == settings.participant.listen
    # Each service gets the well-known port dtm.cluster gives it.
    assert "127.0.0.1:50051" == settings.inventory.listen
    assert "127.0.0.1:50054" == settings.notification.listen
    assert "127.0.0.1:50050" == settings.payment.coordinator
    assert settings.orders.initial is None
    assert "INFO" == settings.log.level
    assert settings.source is None


def test_example_file_equals_the_defaults() -> None:
    assert load(environ={}) == load(EXAMPLE, environ={})


def test_example_file_spells_out_every_key() -> None:
    document = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert list(config.SECTIONS) == list(document)
    for section in (config.COORDINATOR, config.PARTICIPANT, config.LOG):
        assert config.keys(section) == list(document[section]), section
    for service in config.SERVICES:
        # A service section holds what differs from [participant]: its port.
        assert config.default_of(service, "listen") == document[service]["listen"]


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "dtm.toml", '[coordinator]\nlisten = "127.0.0.1:6000"\n')
    settings = load(environ={"DTM_CONFIG": str(path)})
    assert "127.0.0.1:6000" == settings.coordinator.listen
    assert path == settings.source


# ---- precedence ----


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dtm.toml",
        """
[coordinator]
listen = "127.0.0.1:6000"
prepare_timeout_ms = 100
transaction_timeout_ms = 200
data_dir = "from-file"

[log]
level = "debug"
""",
    )
    environ = {
        "DTM_COORDINATOR_PREPARE_TIMEOUT_MS": "111",
        "DTM_COORDINATOR_TRANSACTION_TIMEOUT_MS": "222",
    }
    flags = {config.COORDINATOR: {"transaction_timeout_ms": "333"}}
    settings = load(path, environ=environ, flags=flags).coordinator
    assert "127.0.0.1:6000" == settings.listen  # file only
    assert Path("from-file") == settings.data_dir
    assert 111 == settings.prepare_timeout_ms  # environment over file
    assert 333 == settings.transaction_timeout_ms  # flag over environment over file
    assert "DEBUG" == load(path, environ={}).log.level


def test_service_sections_override_participant_within_each_layer(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dtm.toml",
        """
[participant]
lock_wait_ms = 100
lease_unvoted_ms = 1000
test_control = true

[inventory]
lock_wait_ms = 200
listen = "0.0.0.0:7001"
""",
    )
    settings = load(path, environ={})
    assert 200 == settings.inventory.lock_wait_ms
    assert 100 == settings.payment.lock_wait_ms
    assert 100 == settings.participant.lock_wait_ms
    assert settings.orders.test_control
    assert "0.0.0.0:7001" == settings.inventory.listen
    assert "127.0.0.1:50053" == settings.payment.listen  # its own default, untouched

    # Any environment variable beats any file value; within the environment the service wins.
    environ = {"DTM_PARTICIPANT_LOCK_WAIT_MS": "300", "DTM_PAYMENT_LOCK_WAIT_MS": "400"}
    settings = load(path, environ=environ)
    assert 300 == settings.inventory.lock_wait_ms
    assert 400 == settings.payment.lock_wait_ms
    assert 1000 == settings.payment.lease_unvoted_ms

    flags = {"inventory": {"lock_wait_ms": "500"}}
    settings = load(path, environ=environ, flags=flags)
    assert 500 == settings.inventory.lock_wait_ms
    assert 400 == settings.payment.lock_wait_ms


def test_environment_values_are_parsed_from_text() -> None:
    environ = {
        "DTM_ORDERS_TEST_CONTROL": "yes",
        "DTM_PARTICIPANT_INITIAL": "shop.json",
        "DTM_COORDINATOR_METRICS_LISTEN": "[::1]:9100",
        "DTM_LOG_LEVEL": "warning",
        # Not ours to check: other DTM_ variables mean other things.
        "DTM_CRASH_AT": "wal.before_fsync",
        "DTM_TLS_CA": "ca.pem",
    }
    settings = load(environ=environ)
    assert settings.orders.test_control
    assert not settings.inventory.test_control
    assert Path("shop.json") == settings.payment.initial
    assert "[::1]:9100" == settings.coordinator.metrics_listen
    assert "WARNING" == settings.log.level


# ---- errors ----


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "dtm.toml", '[coordinator]\nlisten = "127.0.0.1:1"\nlistn = "x"\n')
    with pytest.raises(ConfigError) as raised:
        load(path, environ={})
    message = str(raised.value)
    assert str(path) in message
    assert "'listn'" in message
    assert "[coordinator]" in message
    assert "did you mean 'listen'" in message


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "dtm.toml", "[inventroy]\nlisten = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[inventroy\].*'inventory'"):
        load(path, environ={})


def test_unknown_environment_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"DTM_INVENTORY_LOCK_WAIT: .*DTM_INVENTORY_LOCK_WAIT_MS"):
        load(environ={"DTM_INVENTORY_LOCK_WAIT": "5"})


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("DTM_PARTICIPANTS_LOCK_WAIT_MS", "DTM_PARTICIPANT_LOCK_WAIT_MS"),
        ("DTM_COORDINATR_METRICS_LISTEN", "DTM_COORDINATOR_METRICS_LISTEN"),
        ("DTM_INVENTROY_LOCK_WAIT_MS", "DTM_INVENTORY_LOCK_WAIT_MS"),
        ("DTM_LOGS_LEVEL", "DTM_LOG_LEVEL"),
    ],
)
def test_a_misspelled_section_in_an_environment_variable_is_an_error(name: str, meant: str) -> None:
    """A typo in the section part (DTM_PARTICIPANTS_...) was skipped as some other DTM_*
    variable, leaving the setting at its default in silence (found by a bug hunt); a typo in
    the key part was already an error. It is one now, naming the variable meant."""
    value = "WARNING" if meant == "DTM_LOG_LEVEL" else "127.0.0.1:9100"
    with pytest.raises(ConfigError, match=rf"{name}: there is no section .*did you mean {meant}\?"):
        load(environ={name: value})


def test_other_dtm_variables_are_not_taken_for_settings() -> None:
    """DTM_CONFIG, DTM_CRASH_AT, DTM_TLS_*, DTM_AUTHZ_* and a user's own DTM_* variables
    (DTM_LOGS_DIR: no section has a key "dir") are not settings."""
    environ = {
        "DTM_CRASH_AT": "wal.before_fsync",
        "DTM_CRASH_LOSES_UNSYNCED": "1",
        "DTM_TLS_CA": "ca.pem",
        "DTM_TLS_REQUIRE_CLIENT_CERT": "1",
        "DTM_AUTHZ_COORDINATOR": "coordinator",
        "DTM_LOGS_DIR": "/var/log/dtm",
        "DTM_HOME": "/opt/dtm",
    }
    assert Config() == load(environ=environ)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[coordinator]\nprepare_timeout_ms = 0\n",
            r"\[coordinator\] prepare_timeout_ms = 0: out of range: allowed 1\.\.600000",
        ),
        (
            '[coordinator]\nprepare_timeout_ms = "fast"\n',
            r"prepare_timeout_ms = 'fast': expected an integer between 1 and 600000",
        ),
        (
            "[participant]\nlock_wait_ms = true\n",
            r"lock_wait_ms = True: expected an integer between 1 and 600000",
        ),
        ("[orders]\ntest_control = 1\n", r"\[orders\] test_control = 1: expected true or false"),
        (
            '[coordinator]\nlisten = "50050"\n',
            r"listen = '50050': expected host:port with port 0\.\.65535",
        ),
        (
            '[participant]\ncoordinator = "127.0.0.1:0"\n',
            r"coordinator = '127.0.0.1:0': expected host:port with port 1\.\.65535",
        ),
        ('[log]\nlevel = "loud"\n', r"level = 'loud': expected one of DEBUG, INFO"),
        (
            '[coordinator]\nwal_sync = "never"\n',
            r"wal_sync = 'never': expected one of loop, thread",
        ),
        (  # the coordinator's calls come as they come: no "auto" to resolve
            '[coordinator]\nwal_sync = "auto"\n',
            r"wal_sync = 'auto': expected one of loop, thread",
        ),
        ('[payment]\nwal_sync = "never"\n', r"wal_sync = 'never': expected one of auto, loop"),
        (
            '[coordinator]\nlisten = "127.0.0.1:\u00b2"\n',  # "²".isdigit() is True
            r"expected host:port with port 0\.\.65535",
        ),
        (
            '[coordinator]\ndata_dir = "a\\u0000b"\n',
            r"data_dir = .*: expected a path, got one with a NUL",
        ),
        ("coordinator = 1\n", r"must be a section \[coordinator\]"),
        ("[coordinator\n", r"not valid TOML"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path / "dtm.toml", text)
    with pytest.raises(ConfigError, match=expected) as raised:
        load(path, environ={})
    assert str(path) in str(raised.value)


def test_bad_environment_and_flag_values() -> None:
    with pytest.raises(ConfigError, match=r"DTM_PAYMENT_LOCK_WAIT_MS='soon': expected an integer"):
        load(environ={"DTM_PAYMENT_LOCK_WAIT_MS": "soon"})
    with pytest.raises(ConfigError, match=r"--lease-unvoted-ms '0': out of range: allowed 1\.\."):
        load(environ={}, flags={"inventory": {"lease_unvoted_ms": "0"}})


def test_a_path_starting_with_a_tilde_is_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir = "~/dtm" in the file (or in a quoted variable) made a directory named "~" in
    the working directory, where a shell would have expanded it (found by a bug hunt)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "dtm.toml", '[coordinator]\ndata_dir = "~/dtm"\n')
    assert tmp_path / "home" / "dtm" == load(path, environ={}).coordinator.data_dir
    environ = {"DTM_INVENTORY_INITIAL": "~/shop.json", "DTM_CLI_TLS_CA": "~/ca.pem"}
    settings = load(environ=environ)
    assert tmp_path / "home" / "shop.json" == settings.inventory.initial
    assert tmp_path / "home" / "ca.pem" == settings.cli.tls_ca
    assert Path("a~/b") == load(environ={"DTM_COORDINATOR_DATA_DIR": "a~/b"}).coordinator.data_dir


def test_a_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A UTF-8 byte order mark (as Windows editors save) was "not valid TOML: Invalid
    statement (at line 1, column 1)", an error no one can see in the file (found by a bug
    hunt)."""
    path = tmp_path / "dtm.toml"
    path.write_bytes(b'\xef\xbb\xbf[coordinator]\r\nlisten = "127.0.0.1:7"\r\n')
    assert "127.0.0.1:7" == load(path, environ={}).coordinator.listen


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", environ={})


# ---- the processes' command lines ----


def test_coordinator_keeps_its_flags_and_reads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "dtm.toml",
        """
[coordinator]
listen = "127.0.0.1:6000"
prepare_timeout_ms = 100
metrics_listen = "127.0.0.1:9100"
batch_decision_linger_ms = 0

[log]
level = "ERROR"
""",
    )
    plain = coordinator_server.parse_args([])
    assert "127.0.0.1:50050" == plain.listen
    assert Path(".dtm-data") == plain.data_dir
    assert plain.engine is not None
    assert 2_000 == plain.engine.prepare_timeout_ms
    assert "" == plain.metrics_listen
    assert 5 == plain.batch_decision_linger_ms

    monkeypatch.setenv("DTM_COORDINATOR_TRANSACTION_TIMEOUT_MS", "4000")
    parsed = coordinator_server.parse_args(
        ["--config", str(path), "--data-dir", str(tmp_path), "--prepare-timeout-ms", "150"]
    )
    assert "127.0.0.1:6000" == parsed.listen
    assert tmp_path == parsed.data_dir
    assert parsed.engine is not None
    assert 150 == parsed.engine.prepare_timeout_ms
    assert 4_000 == parsed.engine.transaction_timeout_ms
    assert "127.0.0.1:9100" == parsed.metrics_listen
    assert 0 == parsed.batch_decision_linger_ms  # 0: decisions leave at once
    assert "ERROR" == parsed.log_level


def test_coordinator_flag_errors_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        coordinator_server.parse_args(["--prepare-timeout-ms", "0"])
    assert 2 == raised.value.code
    assert "--prepare-timeout-ms '0': out of range: allowed 1..600000" in capsys.readouterr().err


def test_participant_keeps_its_flags_and_reads_its_section(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dtm.toml",
        """
[participant]
lock_wait_ms = 50
batch_lock_wait_ms = 20
coordinator = "127.0.0.1:6000"

[payment]
listen = "127.0.0.1:7003"
metrics_listen = "127.0.0.1:9103"
""",
    )
    parsed = participant_server.parse_args(
        "payment",
        [
            "--config",
            str(path),
            "--test-control",
            "--advertise",
            "payments.internal:7003",
            "--in-doubt-after-ms",
            "10",
        ],
    )
    assert "127.0.0.1:7003" == parsed.listen
    assert "payments.internal:7003" == parsed.advertise
    assert "127.0.0.1:6000" == parsed.coordinator
    assert parsed.test_control
    assert 50 == parsed.lock_wait_ms
    assert 20 == parsed.batch_lock_wait_ms
    assert 10 == parsed.in_doubt_after_ms
    assert "127.0.0.1:9103" == parsed.metrics_listen

    # A service without a section of its own (bench instances) reads [participant].
    other = participant_server.parse_args("inventory-2", ["--config", str(path)])
    assert "127.0.0.1:0" == other.listen
    assert "" == other.metrics_listen
    assert 50 == other.lock_wait_ms
    assert (
        5
        == participant_server.parse_args(
            "inventory-2", ["--config", str(path), "--batch-lock-wait-ms", "5"]
        ).batch_lock_wait_ms
    )
    assert 50 == participant_server.parse_args("orders", []).batch_lock_wait_ms
    assert not participant_server.parse_args("orders", []).test_control


def test_a_service_of_ones_own_is_told_what_it_would_ignore(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fifth service (examples/loyalty) reads no initial file: --initial was accepted and
    ignored. (DTM_LOYALTY_LOCK_WAIT_MS is loyalty's, as DTM_PAYMENT_LOCK_WAIT_MS is payment's:
    test_a_service_of_ones_own_section_overrides_participant_as_a_shipped_ones_does.)"""
    with pytest.raises(SystemExit):
        participant_server.parse_args("loyalty", ["--initial", "members.json"])
    assert "--initial: loyalty reads no initial file" in capsys.readouterr().err

    # What is not a participant setting is left alone (DTM_CRASH_AT arms a crash point), and
    # so are the shipped services, whose sections these are.
    monkeypatch.setenv("DTM_CRASH_AT", "")
    monkeypatch.setenv("DTM_PAYMENT_LOCK_WAIT_MS", "100")
    assert 500 == participant_server.parse_args("crash", []).lock_wait_ms
    assert 100 == participant_server.parse_args("payment", []).lock_wait_ms
    monkeypatch.setenv("DTM_PARTICIPANT_LOCK_WAIT_MS", "200")
    assert 200 == participant_server.parse_args("loyalty", []).lock_wait_ms
    assert 200 == participant_server.parse_args("crash", []).lock_wait_ms


TWO_OF_ONES_OWN = """
[services]
custom = ["loyalty", "reviews"]

[participant]
lock_wait_ms = 300

[loyalty]
listen = "127.0.0.1:50061"
data_dir = "loyalty-data"
max_points = 5

[reviews]
listen = "127.0.0.1:50062"
lock_wait_ms = 400
"""


def test_a_service_of_ones_own_section_overrides_participant_as_a_shipped_ones_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[loyalty] listen = ... was refused ("participant settings are [participant]'s"), so two
    services of one's own sharing a file could not get different listen or data_dir. Their
    sections now take [participant]'s keys beside their own, as [inventory] does; and
    DTM_LOYALTY_<KEY> as DTM_INVENTORY_<KEY>, with the same precedence."""
    path = write(tmp_path / "dtm.toml", TWO_OF_ONES_OWN)
    argv = ["--config", str(path)]
    loyalty = participant_server.parse_args("loyalty", argv, settings_type=PointsSettings)
    reviews = participant_server.parse_args("reviews", argv)
    assert ("127.0.0.1:50061", Path("loyalty-data"), 300) == (
        loyalty.listen,
        loyalty.data_dir,
        loyalty.lock_wait_ms,
    )
    assert PointsSettings(max_points=5) == loyalty.own_settings
    assert ("127.0.0.1:50062", Path(".dtm-data"), 400) == (
        reviews.listen,
        reviews.data_dir,
        reviews.lock_wait_ms,
    )
    # Every other process accepts the file, and a shipped service still gets [participant].
    assert 300 == participant_server.parse_args("inventory", argv).lock_wait_ms
    assert "127.0.0.1:50051" == participant_server.parse_args("inventory", argv).listen

    def listen_of_loyalty(argv: list[str]) -> str:
        return participant_server.parse_args("loyalty", argv, settings_type=PointsSettings).listen

    # Across layers the higher wins, within one the service's own: as for [inventory].
    monkeypatch.setenv("DTM_PARTICIPANT_LISTEN", "127.0.0.1:50070")
    assert "127.0.0.1:50070" == listen_of_loyalty(argv)
    monkeypatch.setenv("DTM_LOYALTY_LISTEN", "127.0.0.1:50071")
    assert "127.0.0.1:50071" == listen_of_loyalty(argv)
    assert "127.0.0.1:50070" == participant_server.parse_args("reviews", argv).listen
    assert "127.0.0.1:50072" == listen_of_loyalty([*argv, "--listen", "127.0.0.1:50072"])
    # Without a file (nothing declared), the service's variables are still its own.
    assert "127.0.0.1:50071" == listen_of_loyalty([])


def test_a_service_of_ones_own_named_after_a_section_keeps_its_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DTM_LOG_SHIPPER_LISTEN (service log-shipper) was read as [log] key shipper_listen and
    refused ("[log] has no key 'shipper_listen'"), by that service and, its own settings'
    DTM_LOG_SHIPPER_MAX too, by every process given the file declaring it."""
    monkeypatch.setenv("DTM_LOG_SHIPPER_LISTEN", "127.0.0.1:50080")
    monkeypatch.setenv("DTM_LOG_SHIPPER_MAX_POINTS", "7")
    path = write(tmp_path / "dtm.toml", '[services]\ncustom = ["log-shipper"]\n')
    shipper = participant_server.parse_args(
        "log-shipper", ["--config", str(path)], settings_type=PointsSettings
    )
    assert ("127.0.0.1:50080", PointsSettings(max_points=7)) == (
        shipper.listen,
        shipper.own_settings,
    )
    assert "127.0.0.1:50050" == coordinator_server.parse_args(["--config", str(path)]).listen


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[services]\ncustom = ["loyalty"]\n[loyalty]\nlisten = "nowhere"\n',
            r"\[loyalty\] listen = 'nowhere': expected host:port",
        ),
        (
            '[services]\ncustom = ["loyalty"]\n[loyalty]\ninitial = "members.json"\n',
            r"\[loyalty\] initial: loyalty reads no initial file",
        ),
    ],
)
def test_participant_keys_of_a_section_of_ones_own_are_checked_by_every_process(
    tmp_path: Path, text: str, message: str
) -> None:
    """As [inventory] lock_wait_ms = 0 is refused by every process, not just inventory."""
    path = write(tmp_path / "dtm.toml", text)
    with pytest.raises(ConfigError, match=message):
        load(path, environ={})


def test_a_service_of_ones_own_named_like_a_section_of_dtms_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A service of one's own named `log`, `cli`, `coordinator`, `participant` or `services`
    was taken for a section of dtm's: it skipped the checks of a service of one's own and
    accepted --initial without a word. Refused at start (status 2), naming another way out;
    the shipped services keep their names."""
    for name in ("log", "cli", "coordinator", "participant", "services"):
        with pytest.raises(SystemExit) as exit_:
            participant_server.parse_args(name, ["--initial", "members.json"])
        assert 2 == exit_.value.code, name
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"a service of one's own cannot be named {name!r}: [{name}] is dtm's own" in err
    assert 500 == participant_server.parse_args("inventory", []).lock_wait_ms


def test_a_service_of_ones_own_is_not_sent_to_an_initial_setting_it_ignores(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DTM_LOYALTY_INITIAL was refused with "use DTM_PARTICIPANT_INITIAL (or the flag)": a
    setting a service of one's own ignores as well, and a flag it refuses. It is told what
    --initial is told: it reads no initial file."""
    monkeypatch.setenv("DTM_LOYALTY_INITIAL", "members.json")
    with pytest.raises(SystemExit) as exit_:
        participant_server.parse_args("loyalty", [])
    assert 2 == exit_.value.code
    err = capsys.readouterr().err
    assert "environment variable DTM_LOYALTY_INITIAL: loyalty reads no initial file" in err, err
    assert "DTM_PARTICIPANT_INITIAL" not in err and "or the flag" not in err, err


def test_a_participant_declares_batch_unless_told_not_to(tmp_path: Path) -> None:
    """`batch` (file, environment, --batch/--no-batch): whether the registration declares the
    batch capability; bench --unary-participants passes --no-batch to every service."""
    assert participant_server.parse_args("orders", []).batch
    assert not participant_server.parse_args("orders", ["--no-batch"]).batch
    path = write(tmp_path / "dtm.toml", "[participant]\nbatch = false\n")
    assert not participant_server.parse_args("payment", ["--config", str(path)]).batch
    assert participant_server.parse_args("payment", ["--config", str(path), "--batch"]).batch
    assert not load(environ={"DTM_INVENTORY_BATCH": "off"}).service("inventory").batch


def test_replace_registration_is_a_flag_for_one_start_not_a_setting(tmp_path: Path) -> None:
    """--replace-registration (RegisterParticipantRequest.replace) is on only when given: a key
    in the file or the environment would outlive the start it is meant for."""
    assert not participant_server.parse_args("inventory", []).replace_registration
    parsed = participant_server.parse_args("inventory", ["--replace-registration"])
    assert parsed.replace_registration
    assert not participant_server.parse_args("inventory-2", []).replace_registration
    with pytest.raises(ConfigError, match="replace_registration"):
        load(environ={"DTM_PARTICIPANT_REPLACE_REGISTRATION": "true"})
    path = write(tmp_path / "dtm.toml", "[inventory]\nreplace_registration = true\n")
    with pytest.raises(ConfigError, match="replace_registration"):
        load(path, environ={})


def test_configured_initial_is_put_before_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dtm.toml", '[inventory]\ninitial = "shop.json"\n')
    assert ["--initial", "shop.json", "--config", str(path)] == config.with_configured_initial(
        "inventory", ["--config", str(path)]
    )
    # argparse keeps the last --initial: an explicit flag stays in charge.
    args = ["--config", str(path), "--initial", "mine.json"]
    assert ["--initial", "shop.json", *args] == config.with_configured_initial("inventory", args)
    assert ["--config", str(path)] == config.with_configured_initial(
        "payment", ["--config", str(path)]
    )


def test_a_configuration_refused_before_initial_is_read_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same bad file made `dtm service orders` exit 2 and `dtm service inventory` exit 1:
    inventory and payment read it first, for --initial, and exited with the message as the
    status (found by a bug hunt). Every service exits 2, as the coordinator does."""
    path = write(tmp_path / "dtm.toml", "[inventory]\nlock_wait_ms = 0\n")
    with pytest.raises(SystemExit) as done:
        config.with_configured_initial("inventory", ["--config", str(path)])
    assert 2 == done.value.code
    err = capsys.readouterr().err
    assert f"dtm service inventory: error: {path}: [inventory] lock_wait_ms = 0: out of" in err


def test_checkpoint_interval_reaches_both_engines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "dtm.toml",
        "[coordinator]\ncheckpoint_every_records = 300\n"
        "[participant]\ncheckpoint_every_records = 400\n",
    )
    coordinator = coordinator_server.parse_args(["--config", str(path)])
    assert coordinator.engine is not None
    assert 300 == coordinator.engine.checkpoint_every_records
    assert 20_000 == coordinator_server.parse_args([]).engine.checkpoint_every_records  # type: ignore[union-attr]
    assert (
        400
        == participant_server.parse_args("orders", ["--config", str(path)]).checkpoint_every_records
    )
    assert (
        250
        == participant_server.parse_args(
            "orders", ["--checkpoint-every-records", "250"]
        ).checkpoint_every_records
    )
    with pytest.raises(SystemExit):
        participant_server.parse_args("orders", ["--checkpoint-every-records", "5"])
    assert "allowed 100..100000000" in capsys.readouterr().err


def test_the_coordinators_window_of_finished_transactions_reaches_its_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lowered for tests (`make chaos` retries orders the coordinator has forgotten); never
    raised past the built-in bound."""
    path = write(tmp_path / "dtm.toml", "[coordinator]\nfinished_kept = 30\n")
    assert 30 == coordinator_server.parse_args(["--config", str(path)]).engine.finished_kept  # type: ignore[union-attr]
    assert 7 == coordinator_server.parse_args(["--finished-kept", "7"]).engine.finished_kept  # type: ignore[union-attr]
    assert 20_000 == coordinator_server.parse_args([]).engine.finished_kept  # type: ignore[union-attr]
    for bad in ("0", "20001"):
        with pytest.raises(SystemExit):
            coordinator_server.parse_args(["--finished-kept", bad])
        assert "allowed 1..20000" in capsys.readouterr().err


def test_grpc_target_forms_are_addresses() -> None:
    for target in ("dns:///coordinator:50050", "ipv4:10.0.0.1:50050", "[fe80::1%eth0]:50050"):
        loaded = load(environ={"DTM_PARTICIPANT_COORDINATOR": target})
        assert target == loaded.participant.coordinator


def test_an_ipv6_address_without_brackets_is_refused_with_the_right_form() -> None:
    """`::1:5` and `host:1:2` were taken as host:port (the host ::1 or host:1): gRPC then
    guesses which colon ends the host. An IPv6 address goes in brackets, [::1]:5; the
    refusal shows that form, and the same check refuses a registration's address."""
    refusals = {
        "::1:5": "an IPv6 address goes in brackets: [::1]:5",
        "fe80::1%eth0:7": "[fe80::1%eth0]:7",
        "host:1:2": "'host:1' has a ':' (a port given twice?)",
        "dns:///::1:5": "[::1]:5",
        "[::1]": "no port after the brackets",  # was "'[:' has a ':' (a port given twice?)"
    }
    for address, says in refusals.items():
        with pytest.raises(ConfigError, match=r"expected host:port.*" + re.escape(says)):
            load(environ={"DTM_PARTICIPANT_COORDINATOR": address})
    for address in ("[::1]:5", "ipv6:[::1]:5", "dns://10.0.0.53:53/coordinator:50050"):
        assert (
            address
            == load(environ={"DTM_PARTICIPANT_COORDINATOR": address}).participant.coordinator
        )
    request = coordinator_pb2.RegisterParticipantRequest(name="inventory", address="::1:5")
    with pytest.raises(RegistrationError, match=re.escape("in brackets: [::1]:5")):
        validate_registration(request)


def test_the_cli_section_names_the_coordinators_identity() -> None:
    """[cli] coordinator_identity (or DTM_CLI_COORDINATOR_IDENTITY): the name the dtm command
    expects in the coordinator's certificate; a name with spaces is refused."""
    environ = {"DTM_CLI_COORDINATOR_IDENTITY": "coord-b.example.test"}
    assert "coord-b.example.test" == load(environ=environ).cli.coordinator_identity
    assert "" == load(environ={}).cli.coordinator_identity
    with pytest.raises(ConfigError, match=r"DTM_CLI_COORDINATOR_IDENTITY.*no spaces"):
        load(environ={"DTM_CLI_COORDINATOR_IDENTITY": "two words"})


@pytest.mark.parametrize("module", ["dtm.coordinator.server", "participants.services.payment"])
def test_a_data_dir_that_is_a_file_is_named_as_the_setting_to_fix(
    tmp_path: Path, module: str
) -> None:
    """A data_dir that is a file (or lies under one) stopped the process with Python's
    "[Errno 20] Not a directory: 'f/coordinator/wal'", naming neither the setting nor the file
    in the way (found by a bug hunt). One line now names both, and nothing is created."""
    blocker = write(tmp_path / "data", "not a directory\n")
    flags = ["--listen", "127.0.0.1:0", "--coordinator", "127.0.0.1:1"]
    if module.startswith("dtm."):
        flags = flags[:2]
    done = subprocess.run(
        [sys.executable, "-m", module, *flags, "--data-dir", str(blocker / "sub")],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("DTM_")},
    )
    assert 1 == done.returncode, done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 == len(lines) and "Errno" not in lines[0], done.stderr
    assert f"cannot create the log directory {blocker / 'sub'}/" in lines[0], lines[0]
    assert f"({blocker} is a file)" in lines[0] and "--data-dir (data_dir)" in lines[0]
    assert [blocker] == list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("wal_sync", "batch", "mode"),
    [
        ("auto", True, "loop"),
        ("auto", False, "thread"),
        ("loop", False, "loop"),
        ("thread", True, "thread"),
    ],
)
def test_a_participant_s_log_sync_follows_its_calls_unless_set(
    tmp_path: Path, wal_sync: str, batch: bool, mode: str
) -> None:
    """With "auto" (the default) batched calls group their records with the fsync on the loop;
    unary calls only with the sync thread (test_batching's burst of unary prepares)."""
    participant = participant_server.ParticipantConfig(
        data_dir=tmp_path, wal_sync=wal_sync, batch=batch
    )
    assert mode == wal_sync_mode(participant)


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:7003", "[::0]:7003"])
def test_a_service_listening_on_every_interface_without_advertise_is_refused(
    listen: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `--listen 0.0.0.0:0` and no `--advertise`, a service registered 0.0.0.0:PORT with
    its coordinator, without a word: an address that works on one machine by chance (Linux
    dials its own host) and on no other (found by a bug hunt). Refused at start, as
    dtm.example.toml's "set it when the service listens on 0.0.0.0" asks."""
    for name in list(os.environ):
        if name.startswith("DTM_"):
            monkeypatch.delenv(name)
    with pytest.raises(SystemExit) as done:
        participant_server.parse_args("payment", ["--listen", listen])
    assert 2 == done.value.code
    err = capsys.readouterr().err
    assert f"listen {listen} is every interface of this machine" in err, err
    assert "--advertise HOST:PORT" in err, err
    advertised = ["--listen", listen, "--advertise", "payments.internal:7003"]
    assert (
        "payments.internal:7003" == participant_server.parse_args("payment", advertised).advertise
    )
    assert "" == participant_server.parse_args("payment", ["--listen", "127.0.0.1:0"]).advertise


# ---- a service of one's own: its section, declared in [services], and its own settings ----


@dataclasses.dataclass(frozen=True)
class PointsSettings:
    """A service's own settings, as examples/loyalty declares them."""

    max_points: int = dataclasses.field(
        default=100, metadata=config.about(config.integer(1, 10_000), "most points per order")
    )
    welcome: bool = dataclasses.field(
        default=False, metadata=config.about(config.BOOLEAN, "award welcome points")
    )


SHARED = """
[services]
custom = ["loyalty"]

[coordinator]
listen = "127.0.0.1:50060"

[loyalty]
max_points = 5
"""


def test_a_declared_section_of_a_service_of_ones_own_is_read_by_every_process(
    tmp_path: Path,
) -> None:
    """The shared file with a section for a fifth service was refused by every process
    ("unknown section [loyalty]"). Declared in [services] custom, each process accepts it,
    and only the service it names reads its keys."""
    path = write(tmp_path / "dtm.toml", SHARED)
    assert {"loyalty": {"max_points": 5}} == load(path, environ={}).custom
    assert "127.0.0.1:50060" == coordinator_server.parse_args(["--config", str(path)]).listen
    assert 500 == participant_server.parse_args("inventory", ["--config", str(path)]).lock_wait_ms
    # A declared service without a section gets its defaults.
    declared = write(tmp_path / "declared.toml", '[services]\ncustom = ["loyalty"]\n')
    assert {"loyalty": {}} == load(declared, environ={}).custom


def test_a_configuration_with_a_section_of_ones_own_can_be_hashed(tmp_path: Path) -> None:
    """Config is a frozen dataclass, so hashable; its `custom` dict made hash() a TypeError."""
    path = write(tmp_path / "dtm.toml", SHARED)
    assert hash(load(path, environ={})) == hash(load(path, environ={}))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[loyalty]\nmax_points = 5\n",
            r"unknown section \[loyalty\] .*is declared: \[services\] custom = \[\"loyalty\"\]",
        ),
        (
            '[services]\ncustom = ["loyalty"]\n[coordinatr]\nlisten = "127.0.0.1:1"\n',
            r"unknown section \[coordinatr\]; did you mean 'coordinator'\?",
        ),
        (
            '[services]\ncustom = ["loyalty"]\n[loyalyt]\n',
            r"unknown section \[loyalyt\]; did you mean 'loyalty'\?",
        ),
        (
            '[services]\ncustm = ["loyalty"]\n',
            r"unknown key 'custm' in \[services\]; did you mean 'custom'\?",
        ),
        (
            '[services]\ncustom = "loyalty"\n',
            r"\[services\] custom = 'loyalty': expected a list of service names",
        ),
        (
            '[services]\ncustom = ["Loyalty"]\n',
            r"\[services\] custom: participant name 'Loyalty' is malformed",
        ),
        (
            '[services]\ncustom = ["payment"]\n',
            r"\[services\] custom: \[payment\] is dtm's own section",
        ),
        (
            '[services]\ncustom = ["loyalty", "loyalty"]\n',
            r"\[services\] custom: 'loyalty' is declared twice",
        ),
        (
            'loyalty = 5\n[services]\ncustom = ["loyalty"]\n',
            r"'loyalty' must be a section \[loyalty\], not a value",
        ),
    ],
)
def test_undeclared_or_misspelled_sections_are_still_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "dtm.toml", text)
    with pytest.raises(ConfigError, match=message):
        load(path, environ={})


def test_a_service_reads_its_own_settings_as_dtm_reads_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defaults < [loyalty] of the file < DTM_LOYALTY_* < flags, as for a shipped section."""
    path = write(tmp_path / "dtm.toml", SHARED)

    def own(argv: list[str]) -> object:
        parsed = participant_server.parse_args("loyalty", argv, settings_type=PointsSettings)
        return parsed.own_settings

    assert PointsSettings() == own([])
    assert PointsSettings(max_points=5) == own(["--config", str(path)])
    monkeypatch.setenv("DTM_LOYALTY_MAX_POINTS", "7")
    monkeypatch.setenv("DTM_LOYALTY_WELCOME", "yes")
    assert PointsSettings(max_points=7, welcome=True) == own(["--config", str(path)])
    assert PointsSettings(9, welcome=False) == own(
        ["--config", str(path), "--max-points", "9", "--no-welcome"]
    )
    # The participant settings of a service of one's own stay [participant]'s.
    assert (
        500
        == participant_server.parse_args("loyalty", [], settings_type=PointsSettings).lock_wait_ms
    )


@pytest.mark.parametrize(
    ("text", "variables", "message"),
    [
        (
            '[services]\ncustom = ["loyalty"]\n[loyalty]\nmax_point = 5\n',
            {},
            r"unknown key 'max_point' in \[loyalty\]; did you mean 'max_points'\? "
            r"\(known keys: max_points, welcome, listen, advertise,",
        ),
        (
            '[services]\ncustom = ["loyalty"]\n[loyalty]\nmax_points = 0\n',
            {},
            r"\[loyalty\] max_points = 0: out of range: allowed 1..10000",
        ),
        (
            "",
            {"DTM_LOYALTY_MAX_POINT": "5"},
            r"environment variable DTM_LOYALTY_MAX_POINT: \[loyalty\] has no key 'max_point'; "
            r"did you mean DTM_LOYALTY_MAX_POINTS\?",
        ),
        (
            "",
            {"DTM_LOYALTY_MAX_POINTS": "many"},
            r"DTM_LOYALTY_MAX_POINTS='many': expected an integer",
        ),
        (
            '[services]\ncustom = ["loyalty"]\n[loyalty]\nlock_wait_m = 5\n',
            {},
            r"unknown key 'lock_wait_m' in \[loyalty\]; did you mean 'lock_wait_ms'\?",
        ),
        (
            "",
            {"DTM_LOYALTY_LOCK_WAIT_MS": "0"},
            r"DTM_LOYALTY_LOCK_WAIT_MS='0': out of range",
        ),
    ],
)
def test_a_services_own_settings_are_refused_as_dtms_are(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    variables: dict[str, str],
    message: str,
) -> None:
    path = write(tmp_path / "dtm.toml", text)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        participant_server.parse_args(
            "loyalty", ["--config", str(path)], settings_type=PointsSettings
        )
    assert 2 == exit_.value.code
    assert re.search(message, capsys.readouterr().err)


def test_a_section_for_a_service_that_declares_no_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "dtm.toml", SHARED)
    with pytest.raises(SystemExit):
        participant_server.parse_args("loyalty", ["--config", str(path)])
    assert (
        "unknown key 'max_points' in [loyalty]: loyalty declares no settings of its own"
        in capsys.readouterr().err
    )


@dataclasses.dataclass(frozen=True)
class AuthzSettings:
    authz_clients: str = dataclasses.field(
        default="", metadata=config.about(config.IDENTITY, "named as a flag of dtm.security's")
    )


def test_a_setting_named_as_another_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Before, argparse's ArgumentError ("conflicting option string") was a traceback."""
    with pytest.raises(SystemExit) as exit_:
        participant_server.parse_args("loyalty", [], settings_type=AuthzSettings)
    assert 2 == exit_.value.code
    assert (
        "loyalty's settings_type: argument --authz-clients: conflicting option string"
        in capsys.readouterr().err
    )
