"""Property-based fuzzing of the whole public gRPC surface (hypothesis): every method of
dtm.v1.Coordinator, Participant, ParticipantAdmin and the four services' read APIs, called
with requests from valid-looking to hostile, and with bytes that are no request at all; then
sequences of branch calls in any order, alone or at once. One in-process cluster on real
ports serves every example in turn.

Each call must end in an answer or a precise status (never UNKNOWN, INTERNAL or a deadline)
with a message, as must each item of a batched answer; a refused call writes nothing to any
log and changes no table; afterwards every server still serves. test_bad_input.py holds the
hand-written cases; these generate them.

Derandomized (a fixed seed, no example database), so `make test` runs the same examples each
time; FUZZ_EXAMPLES=N runs N examples of each property instead (a longer soak).
"""

from __future__ import annotations

import asyncio
import os
import string
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dtm import limits
from dtm.grpc_edge import STATUS_OF_CODE
from dtmpb.v1 import (
    coordinator_pb2,
    participant_pb2,
    participant_pb2_grpc,
    shop_pb2,
    shop_pb2_grpc,
)
from participants.services.inventory import GET_STOCK_SKUS_MAX
from tests.harness import (
    ASKS_LATER,
    STOCK,
    InProcessCluster,
    order_branches,
    pack,
    settled,
    state_fingerprint,
)

Code = grpc.StatusCode
pb = coordinator_pb2
ppb = participant_pb2

# A long soak: FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_grpc.py. Read at import:
# the examples are fixed when the tests are defined.
_SOAK = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=_SOAK or examples,
        deadline=None,
        derandomize=True,
        database=None,
        # One cluster serves every example (module scope): its start is not per example.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# The codes a refused call may carry (principles.md, section 2). UNAVAILABLE and
# DEADLINE_EXCEEDED are not among them: nothing here injects a fault or a delay.
PRECISE = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.PERMISSION_DENIED,
    }
)
CALL_TIMEOUT_S = 20


# ---- the cluster every example calls ----


STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "Participant": participant_pb2_grpc.ParticipantStub,
    "ParticipantAdmin": participant_pb2_grpc.ParticipantAdminStub,
    "Inventory": shop_pb2_grpc.InventoryStub,
    "Orders": shop_pb2_grpc.OrdersStub,
    "Payment": shop_pb2_grpc.PaymentStub,
    "Notification": shop_pb2_grpc.NotificationStub,
}
# The server that serves each of the four services' own read API.
SHOP_SERVER = {
    "Inventory": "inventory",
    "Orders": "orders",
    "Payment": "payment",
    "Notification": "notification",
}


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    cluster: InProcessCluster
    # One channel per server for every example (a channel belongs to the loop it was made on).
    stubs: dict[tuple[str, str], Any] = field(default_factory=dict)
    # A participant answering outside the contract, and its server: see hostile_peer.
    peer: HostilePeer | None = None
    peer_server: grpc.aio.Server | None = None

    def run(self, work: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(work)

    def stub(self, service: str, server_name: str) -> Any:
        """A stub of `service` (a key of STUBS) at a participant's server; made on the
        loop, as a channel must be."""
        key = (service, server_name)
        if key not in self.stubs:
            channel = self.cluster.channel(self.cluster.address(server_name))
            self.stubs[key] = STUBS[service](channel)
        return self.stubs[key]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    # The participants ask about in-doubt branches only when a test does: a branch an
    # example prepared is decided by that example, never by a timer between two others.
    cluster = InProcessCluster(
        tmp_path_factory.mktemp("fuzz"),
        stock={**STOCK, FUZZ_SKU: 10**6},
        # Lock waits (orders) end soon: an example's contended prepare is not its run time.
        participant_overrides={**ASKS_LATER, "lock_wait_ms": 50},
    )
    loop.run_until_complete(cluster.__aenter__())
    served = Served(loop, cluster)
    try:
        yield served
        served.run(still_serving(cluster))
    finally:
        if served.peer_server is not None:
            loop.run_until_complete(served.peer_server.stop(0))
        loop.run_until_complete(cluster.__aexit__(None, None, None))
        loop.close()


async def still_serving(cluster: InProcessCluster) -> None:
    """Every server answers health checks, and a whole order commits."""
    for address in [cluster.coordinator_address, *map(cluster.address, cluster.participants)]:
        health = health_pb2_grpc.HealthStub(cluster.channel(address))
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert health_pb2.HealthCheckResponse.SERVING == answer.status, address
    order = order_branches("o-fuzz-after", [("sku-pear", 1)], amount_cents=1)
    assert pb.OUTCOME_COMMITTED == (await cluster.submit(order)).outcome


@dataclass(frozen=True)
class Snapshot:
    """What a refused call must leave as it was."""

    logs: tuple[int, ...]  # records appended to each process's log, coordinator first
    tables: tuple[object, ...]  # the four services' business state
    registry: tuple[tuple[str, str, str], ...]
    heuristics: int


async def snapshot(cluster: InProcessCluster) -> Snapshot:
    coordinator = cluster.coordinator
    participants = sorted(cluster.participants.items())
    return Snapshot(
        logs=(
            coordinator.wal.appended_lsn,
            *(server.wal.appended_lsn for _, server in participants),
        ),
        tables=await state_fingerprint(cluster),
        registry=tuple(
            (info.name, info.address, info.incarnation)
            for info in coordinator.engine.registry.participants.values()
        ),
        heuristics=len(coordinator.engine.heuristics),
    )


def check_refusal(code: Code | None, details: str, what: str) -> None:
    """A refusal, of a call or of one item of a batched call, is precise and explained."""
    assert code in PRECISE, f"{what}: {code} {details!r}"
    assert details.strip(), f"{what}: {code} without a message"
    assert "Traceback" not in details and "Unexpected <class" not in details, details


def check_items(answer: Message, what: str) -> None:
    """The items of a batched answer: each refused one as precisely as its own call."""
    for number, result in enumerate(getattr(answer, "results", ())):
        item = f"{what} item {number}"
        if isinstance(result, pb.SubmitResult) and result.code:
            check_refusal(STATUS_OF_CODE.get(result.code), result.message, item)
        elif isinstance(result, ppb.DecisionResult) and not result.ok:
            # Code 0 would mean "not told, retried": no fault is injected here.
            check_refusal(STATUS_OF_CODE.get(result.code), result.error, item)
    for number, vote in enumerate(getattr(answer, "votes", ())):
        assert vote.vote in pb.Vote.values(), f"{what} item {number}: {vote}"
        if vote.vote == pb.VOTE_REFUSED:
            assert vote.reason.strip(), f"{what} item {number}: refused without a reason"


def live(tables: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    """The tables a refused call must leave as they were. A Submit refused by a participant
    was aborted: an order another of its branches created is listed cancelled (as after any
    abort), holding nothing, and its id is free again."""
    if not what.endswith("Submit"):
        return tables
    stock, accounts, orders, *rest = tables
    cancelled = shop_pb2.ORDER_STATE_CANCELLED
    return (stock, accounts, [o for o in orders if o[1] != cancelled], *rest)


async def answer_of(call: Awaitable[Any], what: str) -> Any:
    """The call's answer, or its error once checked to be precise and explained."""
    try:
        answer = await call
    except grpc.aio.AioRpcError as error:
        check_refusal(error.code(), error.details() or "", what)
        return error
    check_items(answer, what)
    return answer


async def check_call(
    cluster: InProcessCluster, call: Callable[[], Awaitable[Any]], what: str
) -> Any:
    """Make the call on a quiet cluster; a refused one must change nothing."""
    await settled(cluster)
    before = await snapshot(cluster)
    answer = await answer_of(call(), what)
    # How the examples spread (pytest --hypothesis-show-statistics).
    event(f"{what}: {answer.code().name if isinstance(answer, grpc.aio.AioRpcError) else 'OK'}")
    if isinstance(answer, grpc.aio.AioRpcError):
        await settled(cluster)  # an aborted Submit's rollbacks land after its answer
        after = await snapshot(cluster)
        assert live(before.tables, what) == live(after.tables, what), what
        assert before.registry == after.registry, what
        assert before.heuristics == after.heuristics, what
        if not what.endswith("Submit"):
            # A Submit refused by a participant was aborted: its other branches may have
            # prepared and rolled back (participant records, none at the coordinator).
            assert before.logs == after.logs, f"{what}: a refused call wrote to a log"
        else:
            assert before.logs[0] == after.logs[0], f"{what}: a refused call wrote to a log"
    return answer


# ---- strategies: the fields' values, valid-looking to hostile ----


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _delimited(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


ID_CHARS = string.ascii_letters + string.digits + "._:-"


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """`valid` nine times in ten, else `hostile`: a request fails on its first bad field,
    so requests hostile in many fields would never get past the checks to the code behind
    them. Shrinks towards valid."""
    return st.integers(0, 9).flatmap(lambda n: hostile if n == 9 else valid)


valid_ids = st.one_of(
    st.uuids().map(lambda u: f"fz-{u.hex[:16]}"),  # new
    st.text(ID_CHARS, min_size=1, max_size=3).map(lambda s: f"fz-{s}"),  # often used before
)
hostile_text = st.one_of(
    st.just(""),
    st.text(max_size=40),  # any Unicode: spaces, newlines, NUL, right-to-left marks...
    st.sampled_from(["a b", "x\n2026 ERROR forged", "é", "\x00", "\u202e", "a/b", "*", "%s"]),
    st.integers(min_value=120, max_value=140).map(lambda n: "x" * n),  # around the bound
    st.just("y" * 20_000),
)
transaction_ids = mostly(valid_ids, hostile_text)
branch_numbers = mostly(
    st.integers(min_value=0, max_value=3),
    st.one_of(
        st.sampled_from(
            [limits.BRANCHES_PER_TRANSACTION_MAX - 1, limits.BRANCHES_PER_TRANSACTION_MAX]
        ),
        st.integers(min_value=0, max_value=2**32 - 1),
    ),
)
fingerprints = mostly(
    st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)), st.binary(max_size=100)
)
REAL = ["inventory", "orders", "payment", "notification"]
participant_names = mostly(
    st.sampled_from(REAL),
    st.one_of(st.sampled_from(["warehouse", "fz-a"]), hostile_text),  # not registered
)
# Stand-ins for what only the running cluster knows, put in by `addressed_to` at call time.
SELF = "<the server called>"
SELF_INCARNATION = "<its incarnation>"
incarnations = mostly(
    st.sampled_from(["", SELF_INCARNATION]),
    st.one_of(st.text(ID_CHARS.replace(".", "").replace(":", ""), max_size=70), hostile_text),
)
page_tokens = mostly(
    st.one_of(st.just(""), st.integers(0, 10**18 - 1).map(str)),
    st.one_of(hostile_text, st.just("9" * 19), st.just("\u00b2")),
)
uint32s = mostly(st.integers(min_value=0, max_value=5), st.integers(0, 2**32 - 1))
small_counts = st.integers(1, 3)
int64s = mostly(
    small_counts,
    st.one_of(
        st.integers(-3, 0),
        st.sampled_from(
            [limits.QUANTITY_MAX, limits.QUANTITY_MAX + 1, limits.AMOUNT_CENTS_MAX + 1]
        ),
        st.integers(-(2**63), 2**63 - 1),
    ),
)
# Enum fields take any number on the wire: a newer client, or garbage.
enum_values = mostly(st.integers(0, 7), st.integers(-(2**31), 2**31 - 1))
texts = mostly(st.text(ID_CHARS, min_size=1, max_size=10), hostile_text)
skus = mostly(st.sampled_from(["sku-apple", "sku-pear", "sku-scarce", "sku-none"]), texts)
stock_line = st.builds(shop_pb2.StockLine, sku=skus, quantity=int64s)
stock_lines = mostly(
    st.lists(stock_line, min_size=1, max_size=3),
    st.one_of(  # none, or one past the bound
        st.just([]), stock_line.map(lambda line: [line] * (limits.LINES_PER_OPERATION_MAX + 1))
    ),
)
OPERATION_OF = {
    "inventory": st.builds(shop_pb2.ReserveStock, lines=stock_lines),
    "orders": st.builds(
        shop_pb2.CreateOrder,
        order_id=texts.map(lambda t: f"o-{t}"),
        customer_id=texts,
        lines=stock_lines,
        amount_cents=int64s,
    ),
    "payment": st.builds(
        shop_pb2.ChargePayment,
        account_id=mostly(st.sampled_from(["acct-alice", "acct-poor", "acct-blocked"]), texts),
        amount_cents=int64s,
        order_id=texts,
    ),
    "notification": st.builds(
        shop_pb2.SendNotification, order_id=texts, recipient=texts, body=texts
    ),
}
operations: st.SearchStrategy[Message] = st.one_of(
    *OPERATION_OF.values(),
    st.builds(shop_pb2.GetStockRequest, skus=st.lists(texts, max_size=2)),  # read-only
)
hostile_operations = st.one_of(
    operations.map(pack),  # of any participant's type
    st.builds(  # a known type's name over bytes that are not that message
        any_pb2.Any,
        type_url=st.sampled_from(
            [f"type.googleapis.com/dtm.v1.{n}" for n in ("ReserveStock", "CreateOrder")]
        ),
        value=st.binary(max_size=40),
    ),
    st.builds(any_pb2.Any, type_url=hostile_text, value=st.binary(max_size=8)),
    st.sampled_from(  # a string field of the operation holding invalid UTF-8
        [
            any_pb2.Any(type_url=f"type.googleapis.com/dtm.v1.{name}", value=value)
            for name, value in (
                ("ReserveStock", _delimited(1, _delimited(1, b"\xff"))),  # a line's sku
                ("CreateOrder", _delimited(1, b"o\xff")),
                ("ChargePayment", _delimited(1, b"\xc0")),
                ("SendNotification", _delimited(3, b"\xed\xa0\x80")),  # a surrogate
            )
        ]
    ),
    st.just(any_pb2.Any()),
)


@st.composite
def branch_requests(draw: st.DrawFn) -> pb.BranchRequest:
    """A branch for a participant, with its own kind of operation four times in five."""
    participant = draw(participant_names)
    own = OPERATION_OF.get(participant)
    operation = draw(
        mostly(own.map(pack), hostile_operations) if own is not None else hostile_operations
    )
    return pb.BranchRequest(participant=participant, operation=operation)


# ---- requests for every method ----


def with_transaction(make: Any) -> st.SearchStrategy[Message]:
    return st.builds(make, transaction_id=transaction_ids)


submit_requests = st.builds(
    pb.SubmitRequest,
    transaction_id=st.one_of(st.just(""), transaction_ids),
    branches=mostly(
        st.lists(branch_requests(), min_size=1, max_size=3),
        st.one_of(
            st.just([]),
            st.lists(branch_requests(), min_size=1, max_size=2).map(lambda b: b * 17),  # > 32
        ),
    ),
    timeout_ms=mostly(st.just(0), st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1))),
)
capabilities = st.builds(
    pb.Capabilities,
    one_phase=st.booleans(),
    batch=st.booleans(),
    operation_types=st.lists(texts, max_size=limits.OPERATION_TYPES_MAX + 2),
)
addresses = st.one_of(
    st.just("127.0.0.1:9"),
    st.text(max_size=30),
    st.builds("{}:{}".format, texts, st.integers(-1, 70_000)),
)
COORDINATOR_CALLS: list[tuple[str, st.SearchStrategy[Message]]] = [
    (
        # Only names no server holds: a registration that took a real name would move that
        # participant away from its server (a new incarnation is allowed to, by design).
        "RegisterParticipant",
        st.builds(
            pb.RegisterParticipantRequest,
            name=st.one_of(st.sampled_from(["fz-a", "fz-b"]), hostile_text),
            address=addresses,
            capabilities=capabilities,
            incarnation=incarnations,
            replace=st.booleans(),
        ),
    ),
    (
        "UnregisterParticipant",
        st.builds(
            pb.UnregisterParticipantRequest,
            name=st.one_of(st.sampled_from(["fz-a", "fz-b", "warehouse"]), hostile_text),
        ),
    ),
    ("ListParticipants", st.just(pb.ListParticipantsRequest())),
    ("Submit", submit_requests),
    (
        "SubmitBatch",
        st.builds(
            pb.SubmitBatchRequest,
            transactions=st.one_of(
                st.lists(submit_requests, max_size=3),
                submit_requests.map(lambda t: [t, t]),  # one transaction twice in one call
                st.tuples(valid_ids, st.lists(submit_requests, min_size=2, max_size=3)).map(
                    lambda made: [  # one id for other transactions in one call
                        pb.SubmitRequest(
                            transaction_id=made[0], branches=t.branches, timeout_ms=t.timeout_ms
                        )
                        for t in made[1]
                    ]
                ),
                st.just([pb.SubmitRequest()] * (limits.SUBMIT_BATCH_MAX + 1)),
            ),
        ),
    ),
    ("GetTransaction", with_transaction(pb.GetTransactionRequest)),
    (
        "ListTransactions",
        st.builds(
            pb.ListTransactionsRequest, states=st.lists(enum_values, max_size=3), limit=uint32s
        ),
    ),
    (
        "QueryOutcome",
        st.builds(
            pb.QueryOutcomeRequest,
            transaction_id=transaction_ids,
            participant=st.one_of(st.just(""), participant_names),
            transaction_fingerprint=fingerprints,
            incarnation=incarnations,
        ),
    ),
    ("RetryTransaction", with_transaction(pb.RetryTransactionRequest)),
    ("ListHeuristics", st.builds(pb.ListHeuristicsRequest, limit=uint32s)),
    (
        "ForgetHeuristic",
        st.builds(pb.ForgetHeuristicRequest, transaction_id=transaction_ids, branch=branch_numbers),
    ),
    (
        "ReportHeuristic",
        st.builds(
            pb.ReportHeuristicRequest,
            transaction_id=transaction_ids,
            branch=branch_numbers,
            participant=st.one_of(st.just(""), participant_names),
            incarnation=incarnations,
            transaction_fingerprint=fingerprints,
            forced=enum_values,
            decision=enum_values,
            detail=st.one_of(st.just(""), texts, st.just("d" * (limits.REASON_CHARS_MAX + 1))),
        ),
    ),
]


def addressed(make: Any, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    """A participant request whose participant and incarnation fields vary too."""
    return st.builds(
        make,
        participant=mostly(st.sampled_from(["", SELF]), participant_names),
        incarnation=incarnations,
        **fields,
    )


def addressed_to(request: Message, cluster: InProcessCluster, server_name: str) -> Message:
    """`request`, its stand-ins for the called server's name and incarnation (at any depth:
    a batch's items) replaced by the real ones. An incarnation next to another name is
    that participant's, as registered."""
    request = type(request).FromString(request.SerializeToString())
    registry = cluster.coordinator.engine.registry.participants

    def resolve(message: Message, name: str) -> None:
        if getattr(message, "participant", None) == SELF:
            message.participant = name  # type: ignore[attr-defined]
        named = getattr(message, "participant", "") or name
        if getattr(message, "incarnation", None) == SELF_INCARNATION:
            info = registry.get(named)
            message.incarnation = info.incarnation if info else "unregistered"  # type: ignore[attr-defined]
        for descriptor, value in message.ListFields():
            if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            for inner in value if descriptor.is_repeated else [value]:
                resolve(inner, name)

    resolve(request, server_name)
    return request


prepare_requests = addressed(
    ppb.PrepareRequest,
    transaction_id=transaction_ids,
    branch=branch_numbers,
    operation=mostly(OPERATION_OF["inventory"].map(pack), hostile_operations),
    one_phase=st.booleans(),
    transaction_fingerprint=fingerprints,
)
decisions = st.builds(
    ppb.Decision,
    transaction_id=transaction_ids,
    branch=branch_numbers,
    commit=st.booleans(),
    transaction_fingerprint=fingerprints,
)


def batch_of(item: st.SearchStrategy[Message], most: int) -> Any:
    """Up to `most` items, or one item past the bound of a batched call."""
    return mostly(
        st.lists(item, max_size=most),
        item.map(lambda one: [one] * (limits.BATCH_ITEMS_MAX + 1)),
    )


PARTICIPANT_CALLS: list[tuple[str, st.SearchStrategy[Message]]] = [
    ("Participant.Prepare", prepare_requests),
    (
        "Participant.Commit",
        addressed(
            ppb.CommitRequest,
            transaction_id=transaction_ids,
            branch=branch_numbers,
            transaction_fingerprint=fingerprints,
        ),
    ),
    (
        "Participant.Rollback",
        addressed(
            ppb.RollbackRequest,
            transaction_id=transaction_ids,
            branch=branch_numbers,
            transaction_fingerprint=fingerprints,
        ),
    ),
    ("Participant.Recover", st.just(ppb.RecoverRequest())),
    (
        "Participant.PrepareBatch",
        addressed(ppb.PrepareBatchRequest, prepares=batch_of(prepare_requests, 4)),
    ),
    (
        "Participant.DecideBatch",
        addressed(ppb.DecideBatchRequest, decisions=batch_of(decisions, 4)),
    ),
    (
        "Participant.Exchange",
        addressed(
            ppb.ExchangeRequest,
            decisions=batch_of(decisions, 3),
            prepares=batch_of(prepare_requests, 3),
        ),
    ),
    (
        "ParticipantAdmin.ListBranches",
        addressed(
            ppb.ListBranchesRequest,
            states=st.lists(enum_values, max_size=3),
            awaiting_coordinator=st.booleans(),
            transaction_id=st.one_of(st.just(""), transaction_ids),
        ),
    ),
    ("ParticipantAdmin.ListLocks", addressed(ppb.ListLocksRequest)),
    ("ParticipantAdmin.Describe", addressed(ppb.DescribeRequest)),
    (
        "ParticipantAdmin.ForceOutcome",
        addressed(
            ppb.ForceOutcomeRequest,
            transaction_id=transaction_ids,
            branch=branch_numbers,
            commit=st.booleans(),
            i_understand_this_is_heuristic=st.booleans(),
        ),
    ),
    (
        "ParticipantAdmin.ForgetBranch",
        addressed(ppb.ForgetBranchRequest, transaction_id=transaction_ids, branch=branch_numbers),
    ),
    (
        # Only modes that are no fault: one that took a server down would be obeyed.
        "ParticipantAdmin.SetFault",
        st.builds(
            ppb.SetFaultRequest,
            mode=st.one_of(st.just(ppb.FAULT_MODE_NONE), st.integers(5, 2**31 - 1)),
            delay_ms=uint32s,
        ),
    ),
    (
        "Inventory.GetStock",
        st.builds(
            shop_pb2.GetStockRequest,
            skus=mostly(
                st.lists(skus, max_size=3), st.just(["sku-apple"] * (GET_STOCK_SKUS_MAX + 1))
            ),
            page_size=uint32s,
            page_token=page_tokens,
        ),
    ),
    *(
        (f"{service}.{method}", st.builds(make, page_size=uint32s, page_token=page_tokens))
        for service, method, make in (
            ("Orders", "ListOrders", shop_pb2.ListOrdersRequest),
            ("Payment", "ListAccounts", shop_pb2.ListAccountsRequest),
            ("Notification", "ListSent", shop_pb2.ListSentRequest),
        )
    ),
]


def calls(table: list[tuple[str, st.SearchStrategy[Message]]]) -> st.SearchStrategy[Any]:
    return st.one_of(*(requests.map(lambda r, m=method: (m, r)) for method, requests in table))


# ---- properties ----


async def roll_back_prepared(served: Served, server_name: str) -> None:
    """Roll back what a fuzzed Prepare left prepared, as its coordinator would: presumed
    abort (no coordinator has a record of it)."""
    stub = served.stub("Participant", server_name)
    for branch in (await stub.Recover(ppb.RecoverRequest(), timeout=CALL_TIMEOUT_S)).branches:
        rollback = ppb.RollbackRequest(transaction_id=branch.transaction_id, branch=branch.branch)
        await stub.Rollback(rollback, timeout=CALL_TIMEOUT_S)


@fuzz_settings(150)
@given(call=calls(COORDINATOR_CALLS))
def test_every_coordinator_call_is_answered_or_refused_precisely(
    served: Served, call: tuple[str, Message]
) -> None:
    method, request = call
    cluster = served.cluster
    stub = getattr(cluster.client, method)
    request = addressed_to(request, cluster, "")
    served.run(check_call(cluster, lambda: stub(request, timeout=CALL_TIMEOUT_S), method))


@fuzz_settings(150)
@given(call=calls(PARTICIPANT_CALLS), server_name=st.sampled_from(REAL))
def test_every_participant_call_is_answered_or_refused_precisely(
    served: Served, call: tuple[str, Message], server_name: str
) -> None:
    method, request = call
    service, name = method.split(".")
    server_name = SHOP_SERVER.get(service, server_name)
    request = addressed_to(request, served.cluster, server_name)

    async def run() -> None:
        stub = getattr(served.stub(service, server_name), name)
        await check_call(served.cluster, lambda: stub(request, timeout=CALL_TIMEOUT_S), method)
        await roll_back_prepared(served, server_name)

    served.run(run())


# ---- bytes that are not a request ----


def _methods() -> list[tuple[str, str, Descriptor]]:
    """(server: "coordinator" or a participant, /service/method path, request descriptor)
    of every method; SetFault aside (random bytes may decode to a fault it would obey)."""
    found = []
    for module, service, server in (
        (coordinator_pb2, "Coordinator", "coordinator"),
        (participant_pb2, "Participant", "inventory"),
        (participant_pb2, "ParticipantAdmin", "payment"),
        *((shop_pb2, service, server) for service, server in SHOP_SERVER.items()),
    ):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            if method.name != "SetFault":
                found.append((server, f"/dtm.v1.{service}/{method.name}", method.input_type))
    return found


METHODS = _methods()


@st.composite
def bad_utf8_somewhere(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> bytes | None:
    """A string field holding invalid UTF-8, at the top or inside a message field, or None
    when the message has no string field within reach."""
    strings = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    messages = [
        f
        for f in descriptor.fields
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name.startswith("dtm.")
    ]
    choices = strings + (messages if depth < 2 else [])
    if not choices:
        return None
    chosen = draw(st.sampled_from(choices))
    if chosen.type == FieldDescriptor.TYPE_STRING:
        bad = draw(st.sampled_from([b"\xff", b"t\xc0x", b"\xed\xa0\x80", b"ok\xe2\x82"]))
        return _delimited(chosen.number, bad)
    inner = draw(bad_utf8_somewhere(chosen.message_type, depth + 1))
    return None if inner is None else _delimited(chosen.number, inner)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    server, path, descriptor = draw(st.sampled_from(METHODS))
    bad = draw(bad_utf8_somewhere(descriptor))
    kinds = [
        st.binary(max_size=64),  # anything: most of it does not decode
        st.just(_varint(1 << 3 | 2) + _varint(50) + b"short"),  # a field cut short
        st.just(b"\x80"),  # a varint cut short
    ]
    if bad is not None:
        kinds.append(st.just(bad))
    return server, path, draw(st.one_of(kinds))


def _decodes(descriptor: Descriptor, data: bytes) -> bool:
    from google.protobuf import message_factory
    from google.protobuf.message import DecodeError

    try:
        message_factory.GetMessageClass(descriptor).FromString(data)
    except DecodeError:
        return False
    return True


@fuzz_settings(120)
@given(raw=raw_requests())
def test_every_method_refuses_bytes_it_cannot_decode(
    served: Served, raw: tuple[str, str, bytes]
) -> None:
    server, path, data = raw
    cluster = served.cluster
    descriptor = next(d for _, p, d in METHODS if p == path)

    async def run() -> None:
        address = (
            cluster.coordinator_address if server == "coordinator" else cluster.address(server)
        )
        key = ("raw", address)
        if key not in served.stubs:
            served.stubs[key] = cluster.channel(address)
        call = served.stubs[key].unary_unary(path)
        answer = await check_call(cluster, lambda: call(data, timeout=CALL_TIMEOUT_S), path)
        if not _decodes(descriptor, data):
            assert isinstance(answer, grpc.aio.AioRpcError), path
            assert Code.INVALID_ARGUMENT == answer.code(), answer.details()
            assert f"the request is not a valid {descriptor.full_name}" in (answer.details() or "")
        if server != "coordinator":
            await roll_back_prepared(served, server)

    served.run(run())


# ---- sequences of branch calls: prepare, commit, rollback, forced, in any order ----

FUZZ_SKU = "sku-fuzz"  # stock of its own, so that the examples never run out
SEQUENCE_FINGERPRINTS = [b"", b"F" * 16, b"G" * 16]
PB_STATE = {
    ppb.BRANCH_STATE_PREPARED: "prepared",
    ppb.BRANCH_STATE_COMMITTED: "committed",
    ppb.BRANCH_STATE_ROLLED_BACK: "rolled_back",
    ppb.BRANCH_STATE_REFUSED: "refused",
    ppb.BRANCH_STATE_READ_ONLY: "read_only",
    ppb.BRANCH_STATE_PREPARING: "preparing",
}


@dataclass(frozen=True)
class Step:
    verb: str  # prepare(_one_phase), commit, rollback, force_commit/_rollback, forget
    transaction: int  # 0 or 1: which of the example's two transactions
    branch: int
    via: str  # unary, batch (PrepareBatch / DecideBatch) or exchange
    fingerprint: int  # index into SEQUENCE_FINGERPRINTS
    quantity: int


steps = st.builds(
    Step,
    verb=st.sampled_from(
        [
            "prepare",
            "prepare_one_phase",
            "commit",
            "rollback",
            "force_commit",
            "force_rollback",
            "forget",
        ]
    ),
    transaction=st.integers(0, 1),
    branch=st.integers(0, 1),
    via=st.sampled_from(["unary", "batch", "exchange"]),
    fingerprint=st.integers(0, 2),
    quantity=st.integers(1, 3),
)

_sequence_number = iter(range(1, 10**9))


@dataclass
class Outcome:
    """One step's answer, whichever call carried it: refused or not, and how."""

    refused: bool
    vote: int = 0
    detail: str = ""


async def fuzz_stock(served: Served) -> shop_pb2.StockLevel:
    return (await served.cluster.stock())[FUZZ_SKU]


async def listed_state(served: Served, transaction_id: str, branch: int) -> str:
    admin = served.stub("ParticipantAdmin", "inventory")
    listing = await admin.ListBranches(
        ppb.ListBranchesRequest(transaction_id=transaction_id), timeout=CALL_TIMEOUT_S
    )
    for info in listing.branches:
        if info.branch == branch:
            return PB_STATE[info.state]
    return "none"


async def take_step(served: Served, step: Step, transaction_id: str) -> Outcome:
    participant = served.stub("Participant", "inventory")
    admin = served.stub("ParticipantAdmin", "inventory")
    fingerprint = SEQUENCE_FINGERPRINTS[step.fingerprint]
    what = f"{step.verb} via {step.via}"
    if step.verb == "forget":
        # coordinator_lost, here and below: the branch's calls in any order, as before the
        # participant asked its coordinator first (which would refuse most forced commits).
        forget = ppb.ForgetBranchRequest(
            transaction_id=transaction_id, branch=step.branch, coordinator_lost=True
        )
        answer = await answer_of(admin.ForgetBranch(forget, timeout=CALL_TIMEOUT_S), what)
        return Outcome(isinstance(answer, grpc.aio.AioRpcError), detail=str(answer))
    if step.verb.startswith("force_"):
        request = ppb.ForceOutcomeRequest(
            transaction_id=transaction_id,
            branch=step.branch,
            commit=step.verb == "force_commit",
            i_understand_this_is_heuristic=True,
            coordinator_lost=True,
        )
        answer = await answer_of(admin.ForceOutcome(request, timeout=CALL_TIMEOUT_S), what)
        return Outcome(isinstance(answer, grpc.aio.AioRpcError), detail=str(answer))
    if step.verb.startswith("prepare"):
        operation = shop_pb2.ReserveStock(
            lines=[shop_pb2.StockLine(sku=FUZZ_SKU, quantity=step.quantity)]
        )
        prepare = ppb.PrepareRequest(
            transaction_id=transaction_id,
            branch=step.branch,
            operation=pack(operation),
            one_phase=step.verb == "prepare_one_phase",
            transaction_fingerprint=fingerprint,
        )
        if step.via == "unary":
            call: Awaitable[Any] = participant.Prepare(prepare, timeout=CALL_TIMEOUT_S)
        elif step.via == "batch":
            call = participant.PrepareBatch(ppb.PrepareBatchRequest(prepares=[prepare]))
        else:
            call = participant.Exchange(ppb.ExchangeRequest(prepares=[prepare]))
        answer = await answer_of(call, what)
        if isinstance(answer, grpc.aio.AioRpcError):
            return Outcome(True, detail=answer.details() or "")
        vote = answer if step.via == "unary" else answer.votes[0]
        refused = bool(vote.invalid_argument or vote.id_reused)
        return Outcome(refused, vote.vote, vote.reason)
    commit = step.verb == "commit"
    if step.via == "unary":
        fields = dict(
            transaction_id=transaction_id, branch=step.branch, transaction_fingerprint=fingerprint
        )
        decide = (
            participant.Commit(ppb.CommitRequest(**fields), timeout=CALL_TIMEOUT_S)  # type: ignore[arg-type]
            if commit
            else participant.Rollback(ppb.RollbackRequest(**fields), timeout=CALL_TIMEOUT_S)  # type: ignore[arg-type]
        )
        answer = await answer_of(decide, what)
        return Outcome(isinstance(answer, grpc.aio.AioRpcError), detail=str(answer))
    decision = ppb.Decision(
        transaction_id=transaction_id,
        branch=step.branch,
        commit=commit,
        transaction_fingerprint=fingerprint,
    )
    if step.via == "batch":
        call = participant.DecideBatch(ppb.DecideBatchRequest(decisions=[decision]))
    else:
        call = participant.Exchange(ppb.ExchangeRequest(decisions=[decision]))
    answer = await answer_of(call, what)
    assert not isinstance(answer, grpc.aio.AioRpcError), answer
    result = answer.results[0]
    if not result.ok:
        code = next(c for c in Code if c.value[0] == result.code) if result.code else None
        assert code in PRECISE, f"{what}: item code {result.code} {result.error!r}"
        assert result.error, f"{what}: refused without a message"
    return Outcome(not result.ok, detail=result.error)


def check_step(step: Step, outcome: Outcome, before: str, after: str, reused: bool) -> None:
    """The branch's state as listed after the step agrees with its answer, and a decision
    once taken never changes. `reused`: the step carries another fingerprint than the
    branch's (another transaction under its id)."""
    said = f"{step} from {before}: {outcome} -> {after}"
    if reused and step.verb == "rollback":
        # Nothing of that transaction is here to roll back: acknowledged, nothing changed
        # (RollbackRequest.transaction_fingerprint).
        assert after == before, said
        return
    if outcome.refused:
        assert before == after, f"a refused step changed the branch: {said}"
    if before == "committed":
        assert after == "committed", f"a committed branch changed: {said}"
    if before in ("rolled_back", "refused"):
        assert after == before, f"a decided branch changed: {said}"
    if outcome.refused or step.verb == "forget":  # forgetting changes no state
        assert step.verb != "forget" or after == before, said
        return
    if step.verb in ("commit", "force_commit"):
        assert after == "committed", said
    elif step.verb in ("rollback", "force_rollback"):
        assert after in ("rolled_back", "refused", "read_only"), said
    elif before != "none":
        # A Prepare of a branch it knows is a duplicate, or a later attempt's (refused while
        # the branch is prepared: core.branch.EARLIER_ATTEMPT): answered, never applied.
        assert after == before, said
    elif outcome.vote == pb.VOTE_PREPARED:
        assert after == "prepared", said
    elif outcome.vote == pb.VOTE_COMMITTED:
        assert after == "committed", said
    elif outcome.vote == pb.VOTE_REFUSED:
        assert after in ("refused", "rolled_back"), said


@fuzz_settings(60)
@given(plan=st.lists(steps, min_size=1, max_size=8))
@example(
    plan=[
        Step("rollback", 0, 0, "unary", 0, 1),  # a tombstone: the late prepare is refused
        Step("prepare", 0, 0, "exchange", 0, 1),
        Step("commit", 0, 0, "batch", 0, 1),
    ]
)
def test_branch_calls_in_any_order_keep_each_branch_consistent(
    served: Served, plan: list[Step]
) -> None:
    number = next(_sequence_number)
    ids = [f"fz-seq-{number}-a", f"fz-seq-{number}-b"]

    async def run() -> None:
        reserved: dict[tuple[int, int], int] = {}  # quantity each prepared branch holds
        held_before = (await fuzz_stock(served)).reserved  # by nothing but a failed example
        try:
            await take_steps(reserved, held_before)
        finally:  # a failed example, too, leaves nothing prepared for the next one
            await roll_back_prepared(served, "inventory")
        assert held_before == (await fuzz_stock(served)).reserved

    async def take_steps(reserved: dict[tuple[int, int], int], held_before: int) -> None:
        fingerprint_of: dict[tuple[int, int], bytes] = {}  # what each branch prepared with
        for step in plan:
            transaction_id = ids[step.transaction]
            key = (step.transaction, step.branch)
            before = await listed_state(served, transaction_id, step.branch)
            stock_before = await fuzz_stock(served)
            outcome = await take_step(served, step, transaction_id)
            after = await listed_state(served, transaction_id, step.branch)
            ours, theirs = SEQUENCE_FINGERPRINTS[step.fingerprint], fingerprint_of.get(key, b"")
            check_step(
                step, outcome, before, after, reused=bool(ours and theirs and ours != theirs)
            )
            if before == "none" and after != "none" and step.verb.startswith("prepare"):
                fingerprint_of[key] = ours
            if after == "prepared" and before != "prepared":
                reserved[key] = step.quantity
            elif after != "prepared":
                reserved.pop(key, None)
            stock = await fuzz_stock(served)
            if outcome.refused:
                assert stock_before == stock, f"a refused {step} changed the stock"
            assert stock.available + stock.reserved + stock.sold == stock.received, stock
            assert held_before + sum(reserved.values()) == stock.reserved, (reserved, stock)

    served.run(run())


# ---- one batched call naming a branch more than once ----


@dataclass(frozen=True)
class Item:
    decision: bool  # a Decision (commit or rollback), else a Prepare
    commit: bool
    branch: int
    fingerprint: int
    quantity: int


items = st.builds(
    Item,
    decision=st.booleans(),
    commit=st.booleans(),
    branch=st.integers(0, 1),
    fingerprint=st.integers(0, 2),
    quantity=st.integers(1, 3),
)


@fuzz_settings(60)
@given(
    calls=st.lists(
        st.tuples(st.sampled_from(["exchange", "split"]), st.lists(items, min_size=2, max_size=4)),
        min_size=1,
        max_size=3,
    )
)
def test_a_batched_call_may_name_one_branch_twice(
    served: Served, calls: list[tuple[str, list[Item]]]
) -> None:
    """The coordinator never puts one branch twice in a call; another caller may. Each item
    is answered as its own call would be, and the stock stays whole."""
    transaction_id = f"fz-dup-{next(_sequence_number)}"

    def prepare(item: Item) -> ppb.PrepareRequest:
        operation = shop_pb2.ReserveStock(
            lines=[shop_pb2.StockLine(sku=FUZZ_SKU, quantity=item.quantity)]
        )
        return ppb.PrepareRequest(
            transaction_id=transaction_id,
            branch=item.branch,
            operation=pack(operation),
            transaction_fingerprint=SEQUENCE_FINGERPRINTS[item.fingerprint],
        )

    def decision(item: Item) -> ppb.Decision:
        return ppb.Decision(
            transaction_id=transaction_id,
            branch=item.branch,
            commit=item.commit,
            transaction_fingerprint=SEQUENCE_FINGERPRINTS[item.fingerprint],
        )

    async def send(how: str, batch: list[Item]) -> None:
        participant = served.stub("Participant", "inventory")
        prepares = [prepare(i) for i in batch if not i.decision]
        decisions = [decision(i) for i in batch if i.decision]
        if how == "exchange":
            sent = [
                participant.Exchange(ppb.ExchangeRequest(decisions=decisions, prepares=prepares))
            ]
        else:
            sent = [
                participant.DecideBatch(ppb.DecideBatchRequest(decisions=decisions)),
                participant.PrepareBatch(ppb.PrepareBatchRequest(prepares=prepares)),
            ]
        for call in sent:
            answer = await answer_of(call, how)
            assert not isinstance(answer, grpc.aio.AioRpcError), answer

    async def run() -> None:
        held_before = (await fuzz_stock(served)).reserved
        try:
            for how, batch in calls:
                await send(how, batch)
                stock = await fuzz_stock(served)
                assert stock.available + stock.reserved + stock.sold == stock.received, stock
                states = [await listed_state(served, transaction_id, b) for b in (0, 1)]
                assert "preparing" not in states, states
                prepared = states.count("prepared")
                # Each prepared branch holds what one of its prepares asked for, nothing else.
                assert held_before + prepared <= stock.reserved <= held_before + 3 * prepared
        finally:
            await roll_back_prepared(served, "inventory")
        assert held_before == (await fuzz_stock(served)).reserved
        locks = served.stub("ParticipantAdmin", "inventory").ListLocks(ppb.ListLocksRequest())
        assert not (await locks).locks

    served.run(run())


# ---- concurrent branch calls contending for one lock ----


async def listed_states(served: Served, server_name: str, transaction_id: str) -> dict[int, str]:
    admin = served.stub("ParticipantAdmin", server_name)
    listing = await admin.ListBranches(
        ppb.ListBranchesRequest(transaction_id=transaction_id), timeout=CALL_TIMEOUT_S
    )
    return {info.branch: PB_STATE[info.state] for info in listing.branches}


@fuzz_settings(40)
@given(
    rounds=st.lists(
        st.lists(steps.filter(lambda s: s.branch == 0), min_size=1, max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_concurrent_branch_calls_for_one_order_id_leave_one_outcome(
    served: Served, rounds: list[list[Step]]
) -> None:
    """Two transactions create one order id (orders holds a lock on it from prepare to
    decision), their calls sent at once in any order: each is answered precisely, no branch
    is left preparing, and the order ends confirmed by the one committed branch, if any."""
    number = next(_sequence_number)
    order_id = f"o-fz-{number}"
    ids = [f"fz-con-{number}-a", f"fz-con-{number}-b"]

    async def call(step: Step) -> Any:
        participant = served.stub("Participant", "orders")
        admin = served.stub("ParticipantAdmin", "orders")
        transaction_id = ids[step.transaction]
        what = f"{step.verb} via {step.via}"
        if step.verb.startswith("prepare"):
            operation = shop_pb2.CreateOrder(
                order_id=order_id,
                customer_id="c",
                lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)],
                amount_cents=step.quantity,
            )
            prepare = ppb.PrepareRequest(
                transaction_id=transaction_id,
                operation=pack(operation),
                one_phase=step.verb == "prepare_one_phase",
            )
            if step.via == "unary":
                return await answer_of(participant.Prepare(prepare), what)
            batch = ppb.ExchangeRequest(prepares=[prepare])
            return await answer_of(participant.Exchange(batch), what)
        if step.verb == "forget":
            forget = ppb.ForgetBranchRequest(transaction_id=transaction_id, coordinator_lost=True)
            return await answer_of(admin.ForgetBranch(forget), what)
        if step.verb.startswith("force_"):
            force = ppb.ForceOutcomeRequest(
                transaction_id=transaction_id,
                commit=step.verb == "force_commit",
                i_understand_this_is_heuristic=True,
                coordinator_lost=True,
            )
            return await answer_of(admin.ForceOutcome(force), what)
        commit = step.verb == "commit"
        if step.via == "unary":
            fields = {"transaction_id": transaction_id}
            decide = participant.Commit if commit else participant.Rollback
            request = (ppb.CommitRequest if commit else ppb.RollbackRequest)(**fields)
            return await answer_of(decide(request), what)
        decision = ppb.Decision(transaction_id=transaction_id, commit=commit)
        return await answer_of(
            participant.Exchange(ppb.ExchangeRequest(decisions=[decision])), what
        )

    async def run() -> None:
        seen: dict[str, str] = {}
        try:
            for steps_at_once in rounds:
                await asyncio.gather(*map(call, steps_at_once))
                for transaction_id in ids:
                    state = (await listed_states(served, "orders", transaction_id)).get(0, "none")
                    assert state != "preparing", (transaction_id, rounds)
                    if seen.get(transaction_id) in ("committed", "rolled_back", "refused"):
                        assert seen[transaction_id] == state, (transaction_id, seen, state)
                    seen[transaction_id] = state
        finally:
            await roll_back_prepared(served, "orders")
        states = [(await listed_states(served, "orders", t)).get(0, "none") for t in ids]
        committed = [t for t, state in zip(ids, states, strict=True) if state == "committed"]
        assert len(committed) <= 1, states
        order = (await served.cluster.orders()).get(order_id)
        if committed:
            assert order is not None and shop_pb2.ORDER_STATE_CONFIRMED == order.state, order
            assert committed[0] == order.transaction_id, order
        else:
            assert order is None or shop_pb2.ORDER_STATE_CANCELLED == order.state, order
        locks = served.stub("ParticipantAdmin", "orders").ListLocks(ppb.ListLocksRequest())
        assert not (await locks).locks

    served.run(run())


# ---- Submits under one id: refused, corrected, retried ----

# What a Submit carries under the example's id: (participant, quantity, form) for a
# reservation of `quantity` units of FUZZ_SKU. Refused before anything runs: a participant
# not registered, an operation of another participant's type ("typed"). Refused by
# inventory, after the transaction started: a quantity of 0 or -1, bytes that are no
# ReserveStock ("undecodable").
SubmitContent = tuple[str, int, str]
submit_contents = st.tuples(
    st.sampled_from(["inventory", "warehouse"]),
    st.integers(-1, 2),
    st.sampled_from(["reserve", "typed", "undecodable"]),
)
SPENT = "new transaction id"  # what a refusal says when its id cannot be used again


@fuzz_settings(40)
@given(plan=st.lists(submit_contents, min_size=2, max_size=4))
@example(plan=[("inventory", 0, "reserve"), ("inventory", 1, "reserve")])  # refused, corrected
def test_a_refused_submit_says_whether_its_id_can_be_used_again(
    served: Served, plan: list[SubmitContent]
) -> None:
    """A client corrects a refused Submit and sends it again under the same id. If that id
    is spent (the transaction ran and aborted, and is remembered: ALREADY_EXISTS for other
    content), the refusal said so; the same content again gets the same answer; and the
    order is applied at most once."""
    transaction_id = f"fz-retry-{next(_sequence_number)}"

    def request(content: SubmitContent) -> pb.SubmitRequest:
        participant, quantity, form = content
        line = shop_pb2.StockLine(sku=FUZZ_SKU, quantity=quantity)
        operation = pack(shop_pb2.ReserveStock(lines=[line]))
        if form == "typed":
            operation = pack(shop_pb2.ChargePayment(account_id="acct-alice", amount_cents=1))
        elif form == "undecodable":
            operation.value = b"\xff" + operation.value
        branch = pb.BranchRequest(participant=participant, operation=operation)
        return pb.SubmitRequest(transaction_id=transaction_id, branches=[branch])

    async def run() -> None:
        sold_before = (await fuzz_stock(served)).sold
        # The answers that bound the id to their content: an outcome, or a refusal saying
        # the id is spent. Before one, the id is free; after, other content is ALREADY_EXISTS
        # and the same content gets the same answer.
        answers: dict[SubmitContent, object] = {}
        for content in plan:
            answer = await answer_of(served.cluster.client.Submit(request(content)), "Submit")
            refused = isinstance(answer, grpc.aio.AioRpcError)
            said = answer.code() if refused else answer.outcome
            if content in answers:
                assert answers[content] == said, (content, answers[content], said)
            elif refused and answer.code() == Code.ALREADY_EXISTS:
                assert answers, f"{content}: the id was spent, and no answer said so: {plan}"
            elif not refused or SPENT in (answer.details() or ""):
                answers[content] = said
        await settled(served.cluster)
        sold = (await fuzz_stock(served)).sold - sold_before
        committed = [c for c, said in answers.items() if said == pb.OUTCOME_COMMITTED]
        assert sold == sum(quantity for _, quantity, _ in committed), (answers, sold)
        assert len(committed) <= 1, answers

    served.run(run())


# ---- a participant answering Prepare outside the contract ----


class HostilePeer(participant_pb2_grpc.ParticipantServicer):
    """A participant (another language, or broken) whose Prepare answer an example sets;
    every decision it acknowledges, so that no phase 2 outlives the example."""

    def __init__(self) -> None:
        self.answer = ppb.PrepareResponse()
        self.port = 0

    async def Prepare(self, request: Any, context: Any) -> ppb.PrepareResponse:
        return self.answer

    async def Commit(self, request: Any, context: Any) -> ppb.CommitResponse:
        return ppb.CommitResponse()

    async def Rollback(self, request: Any, context: Any) -> ppb.RollbackResponse:
        return ppb.RollbackResponse()

    async def Exchange(self, request: Any, context: Any) -> ppb.ExchangeResponse:
        return ppb.ExchangeResponse(
            votes=[self.answer] * len(request.prepares),
            results=[ppb.DecisionResult(ok=True)] * len(request.decisions),
        )


async def hostile_peer(served: Served) -> tuple[HostilePeer, str]:
    """The peer of the module's cluster (started on its loop at first use), and its address."""
    if served.peer is None or served.peer_server is None:
        served.peer = HostilePeer()
        served.peer_server = grpc.aio.server()
        participant_pb2_grpc.add_ParticipantServicer_to_server(served.peer, served.peer_server)
        served.peer.port = served.peer_server.add_insecure_port("127.0.0.1:0")
        await served.peer_server.start()
    return served.peer, f"127.0.0.1:{served.peer.port}"


prepare_answers = st.builds(
    ppb.PrepareResponse,
    vote=st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1)),
    reason=st.one_of(st.just(""), st.just("no stock")),
    invalid_argument=st.sampled_from(["", "", "line 1: quantity 0"]),
    id_reused=st.sampled_from(["", "", "branch 0 is committed here"]),
    committed_earlier=st.booleans(),
)


@fuzz_settings(40)
@given(
    answer=prepare_answers,
    batch=st.booleans(),
    one_phase=st.booleans(),
    with_inventory=st.booleans(),
)
@example(answer=ppb.PrepareResponse(vote=0), batch=False, one_phase=False, with_inventory=False)
@example(answer=ppb.PrepareResponse(vote=0), batch=True, one_phase=False, with_inventory=False)
def test_a_prepare_answer_outside_the_contract_aborts_and_says_so(
    served: Served,
    answer: ppb.PrepareResponse,
    batch: bool,
    one_phase: bool,
    with_inventory: bool,
) -> None:
    """A vote the contract does not define (VOTE_UNSPECIFIED, an unknown number) fails that
    prepare: the transaction aborts, its reason naming the participant and the vote, not an
    internal error of the coordinator nor nothing at all."""
    cluster = served.cluster

    async def run() -> None:
        peer, address = await hostile_peer(served)
        peer.answer = answer
        registration = pb.RegisterParticipantRequest(
            name="fz-peer",
            address=address,
            capabilities=pb.Capabilities(one_phase=one_phase, batch=batch),
        )
        await cluster.client.RegisterParticipant(registration, timeout=CALL_TIMEOUT_S)
        operation = pack(shop_pb2.ReserveStock())
        branches = [pb.BranchRequest(participant="fz-peer", operation=operation)]
        if with_inventory:
            branches += order_branches("o-peer", [(FUZZ_SKU, 1)], amount_cents=1)[:1]
        submit = cluster.client.Submit(pb.SubmitRequest(branches=branches))
        said = await answer_of(submit, "Submit")
        await settled(cluster)
        if isinstance(said, grpc.aio.AioRpcError):  # what the peer's answer said, as it said
            assert answer.invalid_argument or answer.id_reused, said
            return
        assert "internal error" not in said.reason, said.reason
        if answer.vote not in pb.Vote.values() or answer.vote == pb.VOTE_UNSPECIFIED:
            assert pb.OUTCOME_ABORTED == said.outcome, said
            assert "fz-peer" in said.reason and f"vote {answer.vote}" in said.reason, said.reason

    served.run(run())
