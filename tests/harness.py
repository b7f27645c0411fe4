"""An in-process cluster for tests: the real coordinator and participant servers, each on an
ephemeral loopback port, with real gRPC between them and real log files under tmp_path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from unittest import mock

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from dtm.coordinator.engine import CoordinatorConfig, Refused
from dtm.coordinator.server import CoordinatorServer, ServerConfig
from dtmpb.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    shop_pb2,
    shop_pb2_grpc,
)
from participants.decided import DecidedWindow
from participants.server import ParticipantConfig, ParticipantServer
from participants.server.admin import AdminServicer
from participants.server.process import CoordinatorAnswer
from participants.server.servicer import ParticipantServicer
from participants.service import Service
from participants.services.catalog import AccountSpec
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService
from participants.services.orders import OrdersService
from participants.services.payment import PaymentService

Code = grpc.StatusCode

STOCK = {"sku-apple": 50, "sku-pear": 20, "sku-scarce": 3}
ACCOUNTS = {
    "acct-alice": AccountSpec(100_000),
    "acct-bob": AccountSpec(50_000),
    "acct-poor": AccountSpec(500),
    "acct-blocked": AccountSpec(100_000, declines=True),
}


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def order_branches(
    order_id: str,
    lines: Sequence[tuple[str, int]],
    account: str = "acct-alice",
    amount_cents: int = 1_000,
) -> list[coordinator_pb2.BranchRequest]:
    stock_lines = [shop_pb2.StockLine(sku=sku, quantity=q) for sku, q in lines]
    return [
        coordinator_pb2.BranchRequest(
            participant="inventory", operation=pack(shop_pb2.ReserveStock(lines=stock_lines))
        ),
        coordinator_pb2.BranchRequest(
            participant="orders",
            operation=pack(
                shop_pb2.CreateOrder(
                    order_id=order_id,
                    customer_id="cust-1",
                    lines=stock_lines,
                    amount_cents=amount_cents,
                )
            ),
        ),
        coordinator_pb2.BranchRequest(
            participant="payment",
            operation=pack(
                shop_pb2.ChargePayment(
                    account_id=account, amount_cents=amount_cents, order_id=order_id
                )
            ),
        ),
        coordinator_pb2.BranchRequest(
            participant="notification",
            operation=pack(
                shop_pb2.SendNotification(
                    order_id=order_id, recipient="cust-1@example.test", body="thanks"
                )
            ),
        ),
    ]


class InProcessCluster:
    def __init__(
        self,
        data_dir: Path,
        *,
        stock: Mapping[str, int] = STOCK,
        accounts: Mapping[str, AccountSpec] = ACCOUNTS,
        prepare_timeout_ms: int = 1_000,
        transaction_timeout_ms: int = 5_000,
        extra_services: Sequence[Service[Any]] = (),
        participant_overrides: Mapping[str, Any] | None = None,
        coordinator_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.services: list[Service[Any]] = [
            InventoryService(dict(stock)),
            OrdersService(),
            PaymentService(dict(accounts)),
            NotificationService(),
            *extra_services,
        ]
        self.coordinator_config = ServerConfig(
            data_dir=data_dir,
            listen="127.0.0.1:0",
            engine=CoordinatorConfig(
                prepare_timeout_ms=prepare_timeout_ms,
                transaction_timeout_ms=transaction_timeout_ms,
                **(coordinator_overrides or {}),
            ),
        )
        self.participant_overrides = dict(participant_overrides or {})
        self.participants: dict[str, ParticipantServer] = {}
        self.channels: list[grpc.aio.Channel] = []

    async def __aenter__(self) -> InProcessCluster:
        self.coordinator = CoordinatorServer(self.coordinator_config)
        port = await self.coordinator.start()
        self.coordinator_address = f"127.0.0.1:{port}"
        for service in self.services:
            await self.start_participant(service)
        self.client = coordinator_pb2_grpc.CoordinatorStub(self.channel(self.coordinator_address))
        return self

    async def restart_coordinator(
        self, down_s: float = 0.0, down: asyncio.Event | None = None
    ) -> None:
        """Stop the coordinator abruptly (no phase 2 finished), then start a new one on the same
        port and data directory: it knows only what its log says. `down` is set once it is
        stopped, for a test that acts while it is."""
        port = int(self.coordinator_address.rsplit(":", 1)[1])
        await self.coordinator.stop(0)
        if down is not None:
            down.set()
        await asyncio.sleep(down_s)
        config = ServerConfig(
            data_dir=self.coordinator_config.data_dir,
            listen=f"127.0.0.1:{port}",
            engine=self.coordinator_config.engine,
        )
        self.coordinator = CoordinatorServer(config)
        await self.coordinator.start()

    async def restart_participant(self, name: str, service: Service[Any]) -> ParticipantServer:
        """Stop a participant and start `service` (a fresh instance: no state in memory) on
        the same data directory; it rebuilds everything from its log."""
        await self.participants.pop(name).stop(0)
        return await self.start_participant(service)

    async def start_participant(self, service: Service[Any]) -> ParticipantServer:
        config = ParticipantConfig(
            data_dir=self.data_dir,
            listen="127.0.0.1:0",
            coordinator=self.coordinator_address,
            test_control=True,
            **self.participant_overrides,
        )
        server = ParticipantServer(service, config)
        await server.start()
        await asyncio.wait_for(server.registered.wait(), 10)
        self.participants[service.name] = server
        return server

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self.channels.append(channel)
        return channel

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.participants[name].port}"

    def participant_stub(self, name: str) -> participant_pb2_grpc.ParticipantStub:
        return participant_pb2_grpc.ParticipantStub(self.channel(self.address(name)))

    def admin(self, name: str) -> participant_pb2_grpc.ParticipantAdminStub:
        return participant_pb2_grpc.ParticipantAdminStub(self.channel(self.address(name)))

    async def set_fault(self, name: str, mode: int, delay_ms: int = 0) -> None:
        await self.admin(name).SetFault(
            participant_pb2.SetFaultRequest(mode=mode, delay_ms=delay_ms)
        )

    async def submit(
        self,
        branches: Sequence[coordinator_pb2.BranchRequest],
        transaction_id: str = "",
        timeout_ms: int = 0,
    ) -> coordinator_pb2.SubmitResponse:
        request = coordinator_pb2.SubmitRequest(
            transaction_id=transaction_id, branches=branches, timeout_ms=timeout_ms
        )
        response: coordinator_pb2.SubmitResponse = await self.client.Submit(request, timeout=30)
        return response

    async def stock(self) -> dict[str, shop_pb2.StockLevel]:
        stub = shop_pb2_grpc.InventoryStub(self.channel(self.address("inventory")))
        response = await stub.GetStock(shop_pb2.GetStockRequest())
        return {level.sku: level for level in response.levels}

    async def accounts(self) -> shop_pb2.ListAccountsResponse:
        stub = shop_pb2_grpc.PaymentStub(self.channel(self.address("payment")))
        response: shop_pb2.ListAccountsResponse = await stub.ListAccounts(
            shop_pb2.ListAccountsRequest()
        )
        return response

    async def orders(self) -> dict[str, shop_pb2.Order]:
        stub = shop_pb2_grpc.OrdersStub(self.channel(self.address("orders")))
        response = await stub.ListOrders(shop_pb2.ListOrdersRequest())
        return {order.order_id: order for order in response.orders}

    async def sent(self) -> shop_pb2.ListSentResponse:
        stub = shop_pb2_grpc.NotificationStub(self.channel(self.address("notification")))
        response: shop_pb2.ListSentResponse = await stub.ListSent(shop_pb2.ListSentRequest())
        return response

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for channel in self.channels:
            await channel.close(None)
        for server in self.participants.values():
            await server.stop(0.1)
        await self.coordinator.stop(0.1)


async def state_fingerprint(cluster: InProcessCluster) -> tuple[object, ...]:
    stock = await cluster.stock()
    accounts = await cluster.accounts()
    orders = await cluster.orders()
    sent = await cluster.sent()
    return (
        sorted((s.sku, s.available, s.reserved, s.sold) for s in stock.values()),
        sorted((a.account_id, a.balance_cents, a.held_cents) for a in accounts.accounts),
        sorted((o.order_id, o.state) for o in orders.values()),
        len(sent.sent),
        sent.staged,
    )


class HeldPrepares:
    """One participant's prepares wait until the test calls run(): a prepare in flight for
    as long as the test needs, with no fixed delay to outlast. `late`: each still runs after
    its call ended at its deadline (shielded from the call's cancellation, as a delayed
    message is). `ended` is set once a held prepare returns or is cancelled with its call."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, participant: str, *, late: bool = False
    ) -> None:
        self.release, self.answered, self.ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.votes: list[int] = []
        prepare_items = ParticipantServicer._prepare_items

        async def held(servicer: ParticipantServicer, prepares: Any) -> Any:
            try:
                await self.release.wait()
                answers, keys = await prepare_items(servicer, prepares)
            finally:
                self.ended.set()
            self.votes.extend(answer.vote for answer in answers)
            self.answered.set()
            return answers, keys

        async def items(servicer: ParticipantServicer, prepares: Any) -> Any:
            if not prepares or servicer.server.service.name != participant:
                return await prepare_items(servicer, prepares)
            if late:
                return await asyncio.shield(held(servicer, prepares))
            return await held(servicer, prepares)

        monkeypatch.setattr(ParticipantServicer, "_prepare_items", items)

    async def run(self) -> list[int]:
        """Let the held prepares run; their votes, once answered."""
        self.release.set()
        await asyncio.wait_for(self.answered.wait(), 10)
        return self.votes


async def eventually(check: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Await until `check()` (async, returns bool) holds; fail with a clear message if not."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition {check.__name__} did not hold within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def commit_then_forget(
    cluster: InProcessCluster,
    branches: list[coordinator_pb2.BranchRequest],
    txn: str,
    forgetting: Sequence[str] = (),
) -> None:
    """Commit `branches` as `txn`, then push it out of the coordinator's memory
    (finished_kept 2) and wait until nothing is left running: a Submit of it now is a late
    retry. The `forgetting` participants keep no decided branch (as beyond their 100,000)."""
    for name in forgetting:
        cluster.participants[name].engine._decided = DecidedWindow(0)

    async def idle() -> bool:
        return not cluster.coordinator.engine.active

    assert coordinator_pb2.OUTCOME_COMMITTED == (await cluster.submit(branches, txn)).outcome
    await eventually(idle)  # finished (phase 2 over), so that newer ones finish after it
    for number in range(3):
        newer = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=1)
        assert (
            coordinator_pb2.OUTCOME_COMMITTED
            == (await cluster.submit(newer[:1], f"txn-{number}")).outcome
        )
    await eventually(idle)
    assert not cluster.coordinator.engine.knows(txn)


async def settled(cluster: InProcessCluster) -> None:
    """Until the coordinator has nothing running and no aborted attempt whose Rollbacks are
    still on their way (Engine._settling)."""
    engine = cluster.coordinator.engine

    async def quiet() -> bool:
        return not engine.active and not engine._settling

    await eventually(quiet)


async def late_retry_of_the_last_stock(
    cluster: InProcessCluster, slow_ms: int
) -> list[coordinator_pb2.BranchRequest]:
    """An order that took the last stock, committed and forgotten by the coordinator
    (finished_kept 2) and by inventory, whose retry will be refused there (out of stock);
    the other three remember it and answer after `slow_ms`. Returns the order: its Submit
    as txn-scarce is a late retry."""
    order = order_branches("o-scarce", [("sku-scarce", 2)], amount_cents=200)
    await commit_then_forget(cluster, order, "txn-scarce", forgetting=["inventory"])
    for name in ("orders", "payment", "notification"):
        await cluster.set_fault(name, participant_pb2.FAULT_MODE_SLOW, delay_ms=slow_ms)
    return order


def read_only_branch(name: str) -> coordinator_pb2.BranchRequest:
    return coordinator_pb2.BranchRequest(
        participant=name, operation=pack(shop_pb2.GetStockRequest(skus=["sku-apple"]))
    )


# The branches must not be asked about by the housekeeping loop itself: the tests ask, at a
# time of their choosing, through `_ask_about_in_doubt`.
NEVER_MS = 600_000


def reserve(quantity: int = 1) -> Any:
    return pack(
        shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=quantity)])
    )


def heuristic_force(txn: str, branch: int, commit: bool) -> Any:
    """An operator's ForceOutcome that may make a heuristic outcome: confirmed, and
    `coordinator_lost`, so that the participant forces a commit past its coordinator's
    presumed abort (no record of the attempt). Against a decision the coordinator keeps on
    record the participant still refuses: see `force_heuristic`."""
    return participant_pb2.ForceOutcomeRequest(
        transaction_id=txn,
        branch=branch,
        commit=commit,
        i_understand_this_is_heuristic=True,
        coordinator_lost=True,
    )


async def force_heuristic(
    cluster: InProcessCluster, name: str, txn: str, branch: int, commit: bool
) -> participant_pb2.ForceOutcomeResponse:
    """An operator's ForceOutcome at participant `name` that contradicts its coordinator on
    purpose, as an operator can: while the participant's check before the force cannot reach
    the coordinator (which decided otherwise, or will). Only that check is cut off
    (`ask_outcome` answers "unreachable"): the coordinator's phase 2 and the participant's
    inquiries reach each other as before, and hear the contradiction."""
    server = cluster.participants[name]

    async def unreachable(key: tuple[str, int]) -> CoordinatorAnswer:
        return CoordinatorAnswer(None, "cut off by the test", unreachable=True)

    with mock.patch.object(server, "ask_outcome", unreachable):
        response: participant_pb2.ForceOutcomeResponse = await cluster.admin(name).ForceOutcome(
            heuristic_force(txn, branch, commit)
        )
    return response


async def forced_against_a_recorded_abort(cluster: InProcessCluster) -> None:
    """The coordinator aborts t-a (payment refuses) while orders rejects its Rollback, and an
    operator forces orders' branch (t-a/1) to commit: a heuristic commit the coordinator, which
    keeps the abort on record, has not heard of yet."""
    await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
    await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REFUSE)
    response = await cluster.submit(order_branches("o-a", [("sku-apple", 1)]), "t-a")
    assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
    await force_heuristic(cluster, "orders", "t-a", 1, commit=True)


def refuse_reports(monkeypatch: pytest.MonkeyPatch, cluster: InProcessCluster) -> None:
    """The coordinator refuses heuristic reports for now (UNAVAILABLE), as one busy or
    restarting would: it answers inquiries, but takes no report."""

    async def busy(*args: Any, **kwargs: Any) -> Any:
        raise Refused(grpc.StatusCode.UNAVAILABLE, "busy (refused by the test)")

    monkeypatch.setattr(cluster.coordinator.engine, "report_heuristic", busy)


def describe_coordinator_as(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Participants answer Describe naming the coordinator at `address` while they go on
    asking their own: a coordinator configured under a name the operator's machine cannot
    reach (one only the participants' network resolves), as `dtm` meets it by --address.
    Patch before the servers start: they take the servicer's methods then."""
    describe = AdminServicer.Describe

    async def described(self: AdminServicer, request: Any, context: Any) -> Any:
        response = await describe(self, request, context)
        response.coordinator = address
        return response

    monkeypatch.setattr(AdminServicer, "Describe", described)


async def forced_after_commit(cluster: InProcessCluster, commit: bool) -> None:
    """The coordinator commits t1 while inventory rejects its Commit; an operator forces
    inventory's branch (`commit`: agreeing, or a heuristic rollback)."""
    await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
    branches = order_branches("o-1", [("sku-apple", 1)], amount_cents=100)
    assert coordinator_pb2.OUTCOME_COMMITTED == (await cluster.submit(branches, "t1")).outcome
    await force_heuristic(cluster, "inventory", "t1", 0, commit=commit)


def forced_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "inventory:" in line and "forced" in line]


async def expect_status(call: Awaitable[object], code: Code, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert code == raised.value.code(), raised.value.details()
    details = raised.value.details() or ""
    for fragment in fragments:
        assert fragment in details
    return details


def field_bytes(number: int, value: bytes) -> bytes:
    """A length-delimited field as the wire format has it: how a client in another language,
    or a broken one, can put invalid UTF-8 in a string field (Python's protobuf will not)."""
    return bytes([number << 3 | 2, len(value)]) + value


BAD_UTF8_ID = field_bytes(1, b"tx\xffn")  # field 1 is transaction_id in each request below


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded, so a broken test fails, not hangs)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


ASKS_LATER = {"in_doubt_after_ms": NEVER_MS}  # only the tests' own inquiries


async def forced_unknown(
    cluster: InProcessCluster, txn: str, commit: bool, fingerprint: bytes = b""
) -> None:
    """Inventory prepares branch 0 of `txn` (of the attempt with `fingerprint`, if given),
    which the coordinator has no record of (it crashed before deciding, or lost its record:
    presumed abort), and an operator forces it."""
    await cluster.participant_stub("inventory").Prepare(
        participant_pb2.PrepareRequest(
            transaction_id=txn, branch=0, operation=reserve(), transaction_fingerprint=fingerprint
        )
    )
    await cluster.admin("inventory").ForceOutcome(heuristic_force(txn, 0, commit=commit))


async def ask(server: ParticipantServer, cluster: InProcessCluster) -> None:
    """One round of the participant's inquiries, every branch due."""
    due_ms = server.engine.monotonic_ms() + server.config.in_doubt_after_ms + 1
    await server._ask_about_in_doubt(cluster.client, due_ms)


async def listed(cluster: InProcessCluster) -> list[coordinator_pb2.HeuristicOutcome]:
    response = await cluster.client.ListHeuristics(coordinator_pb2.ListHeuristicsRequest())
    return list(response.heuristics)
