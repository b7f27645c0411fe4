"""What a service author must write, and what the SDK gives by default (participants/service.py):
a `Service` subclass writes prepare, commit, rollback, snapshot and restore and inherits
validate, locks and add_read_api; anything short of that is refused when the participant is
built, naming what is missing, instead of failing at the first call that needs it."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import wrappers_pb2

from dtm import config
from dtmpb.v1 import coordinator_pb2
from participants.server import ParticipantConfig, ParticipantServer
from participants.service import Prepared, PrepareResult, Service, service_problem
from tests.harness import InProcessCluster, eventually, order_branches, pack

Tally = wrappers_pb2.Int64Value


class Minimal(Service[Tally]):
    """The least a service writes: no validate, no locks, no read API."""

    name = "tally"
    operation_type = Tally

    def __init__(self) -> None:
        self.committed = 0

    def prepare(self, key: str, operation: Tally) -> PrepareResult:
        return Prepared()

    def commit(self, key: str, operation: Tally) -> None:
        self.committed += operation.value

    def rollback(self, key: str, operation: Tally) -> None:
        pass

    def snapshot(self) -> bytes:
        return str(self.committed).encode()

    def restore(self, state: bytes) -> None:
        self.committed = int(state)


def test_a_service_that_writes_only_what_it_must_runs_with_the_defaults(tmp_path: Path) -> None:
    # Before the defaults, the server failed to start: add_read_api answered None
    # ("TypeError: Value after * must be an iterable, not NoneType").
    async def scenario() -> None:
        tally = Minimal()
        async with InProcessCluster(tmp_path, extra_services=[tally]) as cluster:
            branch = coordinator_pb2.BranchRequest(
                participant="tally", operation=pack(Tally(value=3))
            )
            response = await cluster.submit([*order_branches("o-1", [("sku-apple", 1)]), branch])
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome, response.reason

            async def applied() -> bool:  # phase 2 goes on after the client's answer
                return 3 == tally.committed

            await eventually(applied)

    asyncio.run(scenario())


class WithoutPrepare(Service[Tally]):
    name = "tally"
    operation_type = Tally

    def commit(self, key: str, operation: Tally) -> None:
        pass

    def rollback(self, key: str, operation: Tally) -> None:
        pass

    def snapshot(self) -> bytes:
        return b""

    def restore(self, state: bytes) -> None:
        pass


class NotASubclass:
    """Duck-typed: it inherits no default, so it must write them all."""

    name = "tally"
    operation_type = Tally

    def prepare(self, key: str, operation: Tally) -> PrepareResult:
        return Prepared()

    def validate(self, operation: Tally) -> None:
        pass

    def commit(self, key: str, operation: Tally) -> None:
        pass

    def rollback(self, key: str, operation: Tally) -> None:
        pass

    def snapshot(self) -> bytes:
        return b""

    def restore(self, state: bytes) -> None:
        pass


class WrongOperationType(Minimal):
    operation_type = "google.protobuf.Int64Value"  # type: ignore[assignment]


@dataclass(frozen=True)
class TallySettings:
    most: int = field(default=10, metadata=config.about(config.integer(1, 100), "most per call"))


@dataclass(frozen=True)
class LockWaitSettings:  # a participant setting's name: [name] takes those too, and its flag
    lock_wait_ms: int = field(default=10, metadata=config.about(config.integer(1, 100), "ms"))


@dataclass(frozen=True)
class UndescribedSettings:
    most: int = 10


class SettingsWithoutConfigure(Minimal):
    settings_type = TallySettings


class Configured(Minimal):
    settings_type: type[Any] | None = TallySettings

    def configure(self, settings: TallySettings) -> None:
        self.settings = settings


class SettingsNamedAsAParticipants(Configured):
    settings_type = LockWaitSettings


class SettingsWithoutAbout(Configured):
    settings_type = UndescribedSettings


class SettingsOfAShippedService(Configured):
    name = "payment"


@pytest.mark.parametrize(
    ("service", "named"),
    [
        (WithoutPrepare(), "WithoutPrepare does not implement prepare:"),
        (NotASubclass(), "NotASubclass does not implement locks, add_read_api:"),
        (WrongOperationType(), "operation_type must be the generated protobuf message class"),
        (SettingsWithoutConfigure(), "declares settings_type but no configure(settings)"),
        (
            SettingsNamedAsAParticipants(),
            "setting lock_wait_ms: named as the participant setting lock_wait_ms, which the "
            "service's section also takes",
        ),
        (SettingsWithoutAbout(), "setting most: its field needs metadata=config.about("),
        (SettingsOfAShippedService(), "[payment] holds participant settings"),
    ],
)
def test_a_service_short_of_the_contract_is_refused_at_construction(
    tmp_path: Path, service: object, named: str
) -> None:
    # Before, each was built and started: what was missing failed later, at the first call
    # that needed it (a branch's prepare, locks or decode), far from its cause.
    assert named in (service_problem(service) or "")
    with pytest.raises(ValueError, match=re.escape(named)):
        ParticipantServer(service, ParticipantConfig(data_dir=tmp_path))  # type: ignore[arg-type]
    assert not (tmp_path / "tally").exists()


class PreparesAsBuilt(WithoutPrepare):
    """A Service subclass that picks its prepare as it is built: the engine calls the
    instance's attribute, so it meets the contract."""

    def __init__(self) -> None:
        self.prepare = lambda key, operation: Prepared()  # type: ignore[method-assign]


class BuiltFromFunctions:
    """Duck-typed, every method an attribute of the instance."""

    name = "tally"
    operation_type = Tally

    def __init__(self) -> None:
        self.prepare = self.commit = self.rollback = lambda *args: Prepared()
        self.validate = self.restore = lambda *args: None
        self.locks = self.add_read_api = lambda *args: []
        self.snapshot = lambda: b""


def test_methods_set_on_the_instance_meet_the_contract() -> None:
    """service_problem looked for the methods on the class only: these were refused as not
    implementing prepare (and the rest), though every call would have found them."""
    for service in (PreparesAsBuilt(), BuiltFromFunctions()):
        assert service_problem(service) is None, service


def test_the_shop_services_meet_the_contract() -> None:
    from participants.services.inventory import InventoryService
    from participants.services.notification import NotificationService
    from participants.services.orders import OrdersService
    from participants.services.payment import PaymentService

    for service in (InventoryService(), OrdersService(), PaymentService(), NotificationService()):
        assert service_problem(service) is None
    assert service_problem(Configured()) is None
