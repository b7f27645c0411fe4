"""Bad input gets a precise status code and a message a person can act on; nothing is left
half done and no server crashes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from dtm import limits
from dtm.coordinator.engine import CoordinatorConfig, Engine
from dtm.coordinator.registry import Registry
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc, shop_pb2
from tests.harness import (
    BAD_UTF8_ID,
    InProcessCluster,
    eventually,
    expect_status,
    field_bytes,
    order_branches,
    pack,
    state_fingerprint,
)

Code = grpc.StatusCode


def submit(cluster: InProcessCluster, **fields: object) -> Awaitable[object]:
    return cluster.client.Submit(coordinator_pb2.SubmitRequest(**fields), timeout=10)  # type: ignore[arg-type]


Case = Callable[[InProcessCluster], Awaitable[str]]


async def unknown_participant(cluster: InProcessCluster) -> str:
    branch = coordinator_pb2.BranchRequest(
        participant="warehouse", operation=pack(shop_pb2.ReserveStock())
    )
    return await expect_status(
        submit(cluster, branches=[branch]), Code.NOT_FOUND, "warehouse", "not registered"
    )


async def empty_transaction(cluster: InProcessCluster) -> str:
    return await expect_status(submit(cluster), Code.INVALID_ARGUMENT, "at least one branch")


async def malformed_transaction_id(cluster: InProcessCluster) -> str:
    branches = order_branches("o-bad-id", [("sku-apple", 1)])
    return await expect_status(
        submit(cluster, transaction_id="no spaces/or slashes!", branches=branches),
        Code.INVALID_ARGUMENT,
        "transaction_id",
    )


async def overlong_transaction_id(cluster: InProcessCluster) -> str:
    branches = order_branches("o-long-id", [("sku-apple", 1)])
    return await expect_status(
        submit(cluster, transaction_id="x" * 129, branches=branches),
        Code.INVALID_ARGUMENT,
        "transaction_id",
    )


async def negative_quantity(cluster: InProcessCluster) -> str:
    return await expect_status(
        submit(cluster, branches=order_branches("o-neg", [("sku-apple", -3)])),
        Code.INVALID_ARGUMENT,
        "quantity",
        "nothing was applied",
    )


async def negative_amount(cluster: InProcessCluster) -> str:
    return await expect_status(
        submit(cluster, branches=order_branches("o-negm", [("sku-apple", 1)], amount_cents=-5)),
        Code.INVALID_ARGUMENT,
        "amount",
    )


async def wrong_payload_type(cluster: InProcessCluster) -> str:
    branch = coordinator_pb2.BranchRequest(
        participant="inventory",
        operation=pack(shop_pb2.ChargePayment(account_id="acct-alice", amount_cents=1)),
    )
    return await expect_status(
        submit(cluster, branches=[branch]),
        Code.INVALID_ARGUMENT,
        "dtm.v1.ReserveStock",
        "dtm.v1.ChargePayment",
    )


async def missing_operation(cluster: InProcessCluster) -> str:
    branch = coordinator_pb2.BranchRequest(participant="inventory")
    return await expect_status(
        submit(cluster, branches=[branch]), Code.INVALID_ARGUMENT, "operation is missing"
    )


async def odd_type_url(cluster: InProcessCluster) -> str:
    """Unbounded and counted in characters, a type URL made an operation as large as the
    request, past the size a coordinator's batched call allows for it (found by a review)."""
    said = []
    for url in ("type.googleapis.com/" + "é" * 100 + "/x", "t/" + "x" * limits.TYPE_URL_CHARS_MAX):
        operation = any_pb2.Any(type_url=url, value=b"")
        branch = coordinator_pb2.BranchRequest(participant="inventory", operation=operation)
        said.append(
            await expect_status(
                submit(cluster, branches=[branch]), Code.INVALID_ARGUMENT, "type URL must be ASCII"
            )
        )
    return said[0]


async def too_many_branches(cluster: InProcessCluster) -> str:
    branch = order_branches("o-many", [("sku-apple", 1)])[0]
    count = limits.BRANCHES_PER_TRANSACTION_MAX + 1
    return await expect_status(
        submit(cluster, branches=[branch] * count), Code.INVALID_ARGUMENT, "branches"
    )


async def oversized_operation(cluster: InProcessCluster) -> str:
    body = "x" * (limits.OPERATION_BYTES_MAX + 1)
    branch = coordinator_pb2.BranchRequest(
        participant="notification",
        operation=pack(shop_pb2.SendNotification(order_id="o-big", recipient="a", body=body)),
    )
    return await expect_status(submit(cluster, branches=[branch]), Code.INVALID_ARGUMENT, "bytes")


async def oversized_request(cluster: InProcessCluster) -> str:
    body = "x" * (limits.MESSAGE_BYTES_MAX + 1)
    branch = coordinator_pb2.BranchRequest(
        participant="notification",
        operation=pack(shop_pb2.SendNotification(order_id="o-huge", recipient="a", body=body)),
    )
    return await expect_status(submit(cluster, branches=[branch]), Code.RESOURCE_EXHAUSTED)


async def too_long_timeout(cluster: InProcessCluster) -> str:
    return await expect_status(
        submit(
            cluster,
            branches=order_branches("o-t", [("sku-apple", 1)]),
            timeout_ms=limits.TRANSACTION_TIMEOUT_MS_MAX + 1,
        ),
        Code.INVALID_ARGUMENT,
        "timeout_ms",
    )


async def bad_registration(cluster: InProcessCluster) -> str:
    request = coordinator_pb2.RegisterParticipantRequest(name="Bad Name", address="x")
    return await expect_status(
        cluster.client.RegisterParticipant(request), Code.INVALID_ARGUMENT, "name"
    )


async def bad_registration_address(cluster: InProcessCluster) -> str:
    # Ports out of 1..65535 too: a registration the channel could never dial.
    for address in ("nohostport", "x:0", "x:65536"):
        request = coordinator_pb2.RegisterParticipantRequest(name="ok", address=address)
        await expect_status(
            cluster.client.RegisterParticipant(request), Code.INVALID_ARGUMENT, "host:port"
        )
    return "host:port"


async def unknown_transaction(cluster: InProcessCluster) -> str:
    return await expect_status(
        cluster.client.GetTransaction(
            coordinator_pb2.GetTransactionRequest(transaction_id="never")
        ),
        Code.NOT_FOUND,
        "never",
    )


async def participant_prepare_with_bad_id(cluster: InProcessCluster) -> str:
    stub = cluster.participant_stub("inventory")
    request = participant_pb2.PrepareRequest(
        transaction_id="", branch=0, operation=pack(shop_pb2.ReserveStock())
    )
    return await expect_status(stub.Prepare(request), Code.INVALID_ARGUMENT, "transaction_id")


async def commit_of_unknown_branch(cluster: InProcessCluster) -> str:
    stub = cluster.participant_stub("payment")
    request = participant_pb2.CommitRequest(transaction_id="ghost", branch=0)
    return await expect_status(stub.Commit(request), Code.NOT_FOUND, "never prepared")


async def forget_of_a_bad_branch_id(cluster: InProcessCluster) -> str:
    request = participant_pb2.ForgetBranchRequest(transaction_id="bad id", branch=0)
    return await expect_status(
        cluster.admin("inventory").ForgetBranch(request), Code.INVALID_ARGUMENT, "transaction_id"
    )


async def forget_of_an_unknown_branch(cluster: InProcessCluster) -> str:
    request = participant_pb2.ForgetBranchRequest(transaction_id="ghost", branch=0)
    return await expect_status(
        cluster.admin("inventory").ForgetBranch(request), Code.NOT_FOUND, "no branch ghost/0"
    )


async def fault_injection_without_permission(cluster: InProcessCluster) -> str:
    # The harness enables test control; check the refusal path of a server without it.
    server = cluster.participants["inventory"]
    server.config.test_control = False
    try:
        return await expect_status(
            cluster.set_fault("inventory", participant_pb2.FAULT_MODE_DOWN),
            Code.PERMISSION_DENIED,
            "--test-control",
        )
    finally:
        server.config.test_control = True


async def long_type_url_echoed_in_the_error(cluster: InProcessCluster) -> str:
    # The message echoes it: uncut, the status would overflow gRPC's metadata limit and the
    # caller would get RESOURCE_EXHAUSTED "metadata size exceeds" instead.
    branch = coordinator_pb2.BranchRequest(participant="inventory")
    branch.operation.type_url = "x/" + "A" * 100_000
    branch.operation.value = b""
    details = await expect_status(
        submit(cluster, branches=[branch]),
        Code.INVALID_ARGUMENT,
        "type URL must be ASCII, at most",
        "'x/AAAA",
    )
    assert len(details) < 1_000
    return details


async def long_type_url_at_a_participant(cluster: InProcessCluster) -> str:
    request = participant_pb2.PrepareRequest(transaction_id="t-long-url", branch=0)
    request.operation.type_url = "x/" + "B" * 100_000
    return await expect_status(
        cluster.participant_stub("inventory").Prepare(request), Code.INVALID_ARGUMENT, "takes"
    )


async def query_outcome_with_a_malformed_id(cluster: InProcessCluster) -> str:
    # Presumed abort would answer ABORTED for it, and the id would go into the log line.
    forged = "x\n2026-11-29T00:00:00.000Z ERROR   coordinator: commit decision lost txn=t-42"
    for transaction_id in ("", forged):
        request = coordinator_pb2.QueryOutcomeRequest(transaction_id=transaction_id)
        await expect_status(
            cluster.client.QueryOutcome(request), Code.INVALID_ARGUMENT, "transaction_id"
        )
    request = coordinator_pb2.QueryOutcomeRequest(transaction_id="t-1", participant="Bad Name")
    return await expect_status(
        cluster.client.QueryOutcome(request), Code.INVALID_ARGUMENT, "participant name"
    )


async def get_and_retry_with_a_malformed_id(cluster: InProcessCluster) -> str:
    await expect_status(
        cluster.client.GetTransaction(coordinator_pb2.GetTransactionRequest(transaction_id="a b")),
        Code.INVALID_ARGUMENT,
        "transaction_id",
    )
    return await expect_status(
        cluster.client.RetryTransaction(coordinator_pb2.RetryTransactionRequest(transaction_id="")),
        Code.INVALID_ARGUMENT,
        "transaction_id",
    )


async def listing_an_unknown_state(cluster: InProcessCluster) -> str:
    await expect_status(
        cluster.client.ListTransactions(coordinator_pb2.ListTransactionsRequest(states=[99])),
        Code.INVALID_ARGUMENT,
        "unknown transaction state",
    )
    return await expect_status(
        cluster.admin("orders").ListBranches(participant_pb2.ListBranchesRequest(states=[99])),
        Code.INVALID_ARGUMENT,
        "unknown branch state",
    )


async def registration_with_too_many_operation_types(cluster: InProcessCluster) -> str:
    # The whole registry is one checkpoint record: unbounded, it made every checkpoint fail.
    request = coordinator_pb2.RegisterParticipantRequest(
        name="greedy",
        address="127.0.0.1:9",
        capabilities=coordinator_pb2.Capabilities(
            operation_types=[f"t{n}" for n in range(limits.OPERATION_TYPES_MAX + 1)]
        ),
    )
    return await expect_status(
        cluster.client.RegisterParticipant(request), Code.INVALID_ARGUMENT, "operation types"
    )


async def registration_with_a_non_ascii_port(cluster: InProcessCluster) -> str:
    for address in ("x:\u00b2", "x:\u0663", "a\nb c:80"):  # "²".isdigit() is True
        request = coordinator_pb2.RegisterParticipantRequest(name="odd", address=address)
        await expect_status(
            cluster.client.RegisterParticipant(request), Code.INVALID_ARGUMENT, "host:port"
        )
    listed = await cluster.client.ListParticipants(coordinator_pb2.ListParticipantsRequest())
    assert "odd" not in [p.name for p in listed.participants]
    return "host:port"


async def fault_mode_unknown(cluster: InProcessCluster) -> str:
    server = cluster.participants["payment"]
    before = server.fault.mode
    details = await expect_status(
        cluster.set_fault("payment", 99), Code.INVALID_ARGUMENT, "unknown fault mode"
    )
    assert before == server.fault.mode
    return details


async def force_of_a_bad_branch_id(cluster: InProcessCluster) -> str:
    request = participant_pb2.ForceOutcomeRequest(
        transaction_id="bad id", branch=99, i_understand_this_is_heuristic=True
    )
    return await expect_status(
        cluster.admin("inventory").ForceOutcome(request), Code.INVALID_ARGUMENT, "transaction_id"
    )


async def undecodable(channel: grpc.aio.Channel, method: str, request: bytes) -> str:
    """The status of `method` called with raw `request` bytes (no serializer)."""
    call = channel.unary_unary(method)
    return await expect_status(
        call(request, timeout=10),
        Code.INVALID_ARGUMENT,
        "the request is not a valid ",
        "UTF-8",
    )


async def undecodable_requests(cluster: InProcessCluster) -> str:
    # gRPC decodes the request before any project code runs, and answered UNKNOWN
    # "Unexpected <class 'DecodeError'>" (found by a bug hunt).
    coordinator = cluster.channel(cluster.coordinator_address)
    for method in ("Submit", "GetTransaction", "QueryOutcome"):
        details = await undecodable(coordinator, f"/dtm.v1.Coordinator/{method}", BAD_UTF8_ID)
        assert f"dtm.v1.{method}Request" in details
    participant = cluster.channel(cluster.address("inventory"))
    details = await undecodable(participant, "/dtm.v1.Participant/Prepare", BAD_UTF8_ID)
    assert "dtm.v1.PrepareRequest: String field had bad UTF-8" in details
    await undecodable(participant, "/dtm.v1.ParticipantAdmin/ForgetBranch", BAD_UTF8_ID)
    orders = cluster.channel(cluster.address("orders"))
    page_token = field_bytes(15, b"\xff")
    await undecodable(orders, "/dtm.v1.Orders/ListOrders", page_token)
    return details


async def undecodable_streaming_requests(cluster: InProcessCluster) -> str:
    # The two streaming methods every server has: health's Watch (one request, a stream of
    # answers) and reflection (a stream each way); field 1 is a string in both requests.
    channel = cluster.channel(cluster.address("payment"))
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(BAD_UTF8_ID, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in watch:
            pass
    assert Code.INVALID_ARGUMENT == raised.value.code(), raised.value.details()
    assert "grpc.health.v1.HealthCheckRequest" in (raised.value.details() or "")
    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    answers = reflect(iter([BAD_UTF8_ID]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in answers:
            pass
    details = raised.value.details() or ""
    assert Code.INVALID_ARGUMENT == raised.value.code(), details
    assert "grpc.reflection.v1alpha.ServerReflectionRequest" in details
    return details


CASES: list[Case] = [
    undecodable_requests,
    undecodable_streaming_requests,
    long_type_url_echoed_in_the_error,
    long_type_url_at_a_participant,
    query_outcome_with_a_malformed_id,
    get_and_retry_with_a_malformed_id,
    listing_an_unknown_state,
    registration_with_too_many_operation_types,
    registration_with_a_non_ascii_port,
    fault_mode_unknown,
    force_of_a_bad_branch_id,
    unknown_participant,
    empty_transaction,
    malformed_transaction_id,
    overlong_transaction_id,
    negative_quantity,
    negative_amount,
    wrong_payload_type,
    missing_operation,
    odd_type_url,
    too_many_branches,
    oversized_operation,
    oversized_request,
    too_long_timeout,
    bad_registration,
    bad_registration_address,
    unknown_transaction,
    participant_prepare_with_bad_id,
    commit_of_unknown_branch,
    forget_of_a_bad_branch_id,
    forget_of_an_unknown_branch,
    fault_injection_without_permission,
]


def test_every_bad_input_gets_a_precise_status_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            before = await state_fingerprint(cluster)
            for case in CASES:
                message = await case(cluster)
                assert message, f"{case.__name__}: empty error message"

                # Rollbacks of an aborted transaction land asynchronously: await them.
                async def unchanged() -> bool:
                    return before == await state_fingerprint(cluster)

                await eventually(unchanged, timeout_s=5)
            # Every server is still up and serving after all of it.
            ok = await cluster.submit(order_branches("o-after", [("sku-apple", 1)]))
            assert coordinator_pb2.OUTCOME_COMMITTED == ok.outcome

    asyncio.run(scenario())


def test_a_status_message_is_cut_to_what_grpc_metadata_carries() -> None:
    from dtm import grpc_edge

    short = "participant 'x' is not registered"
    assert short == grpc_edge.status_details(short)
    long = "é" * 50_000  # up to 12 bytes per character once percent-encoded
    cut = grpc_edge.status_details(long)
    assert cut.startswith("é" * grpc_edge.STATUS_DETAILS_CHARS_MAX)
    assert cut.endswith(f"... ({50_000 - grpc_edge.STATUS_DETAILS_CHARS_MAX} more characters)")
    assert len(cut.encode()) * 3 < 8 * 1024  # gRPC's soft limit on metadata


def test_unknown_enum_values_by_the_thousand_leave_the_known_names_in_the_status() -> None:
    """Before, every unknown value was listed before the known names, in full: a listing
    asked for 10,000 unknown states built a 60,000-character message, and the cut status
    kept no known name (what to send instead)."""
    from dtm import grpc_edge

    problem = grpc_edge.enum_problem(
        [*range(100, 10_100), coordinator_pb2.TRANSACTION_STATE_COMMITTED],
        coordinator_pb2.TransactionState,
        "transaction state(s)",
    )
    assert problem is not None
    details = grpc_edge.status_details(problem)
    assert f"known: {', '.join(coordinator_pb2.TransactionState.keys())})" in details, details
    assert details.endswith(": 100, 101, 102, 103, 104 and 9995 more"), details
    one = grpc_edge.enum_problem([99], participant_pb2.BranchState, "branch state(s)")
    assert one is not None and one.startswith("unknown branch state(s) (known: ")
    assert one.endswith("): 99")


def test_an_invalid_one_phase_operation_aborts_at_once_without_a_lost_answer(
    tmp_path: Path,
) -> None:
    """A one-phase Prepare whose operation the participant finds invalid (an item answered
    invalid_argument in a batched call: the SDK refuses it before any branch exists) was read
    as a lost answer: the transaction went UNKNOWN, its reason "one-phase answer lost", and a
    Rollback probe was sent to learn what had run (a review of the README). Nothing ran."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            branch = order_branches("o-neg1", [("sku-apple", -1)])[0]  # inventory's alone
            await expect_status(
                submit(cluster, branches=[branch], transaction_id="t-neg1"),
                Code.INVALID_ARGUMENT,
                "quantity",
            )
            view = cluster.coordinator.engine.lookup("t-neg1")
            assert view is not None
            assert coordinator_pb2.TRANSACTION_STATE_ABORTED == view.state, view
            assert "answer lost" not in view.reason and "quantity" in view.reason, view.reason

    asyncio.run(scenario())


class OnePhaseOutsideTheContract(participant_pb2_grpc.ParticipantServicer):
    """A one-phase participant (another language, or broken) that answers its Prepare with
    `answer`, as many times in an Exchange as `votes` says (None: one per prepare). Its
    Rollback, the coordinator's probe, finds the branch committed (FAILED_PRECONDITION) when
    `committed`, or rolls it back."""

    def __init__(
        self, answer: participant_pb2.PrepareResponse, committed: bool, votes: int | None
    ) -> None:
        self.answer = answer
        self.committed = committed
        self.votes = votes
        self.rollbacks = 0

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:
        return self.answer

    async def Exchange(self, request: Any, context: Any) -> participant_pb2.ExchangeResponse:
        votes = len(request.prepares) if self.votes is None else self.votes
        return participant_pb2.ExchangeResponse(votes=[self.answer] * votes)

    async def Rollback(self, request: Any, context: Any) -> participant_pb2.RollbackResponse:
        self.rollbacks += 1
        if self.committed:
            await context.abort(Code.FAILED_PRECONDITION, "branch 0 is committed")
        return participant_pb2.RollbackResponse()


@pytest.mark.parametrize("committed", [False, True], ids=["rolled back", "committed"])
@pytest.mark.parametrize(
    ("vote", "batch", "votes"),
    [
        (coordinator_pb2.VOTE_UNSPECIFIED, False, None),
        (99, True, None),  # a vote the contract does not define
        (coordinator_pb2.VOTE_PREPARED, False, None),  # not an answer to a one-phase Prepare
        (coordinator_pb2.VOTE_COMMITTED, True, 0),  # an Exchange with no vote for the prepare
    ],
    ids=["no vote", "unknown vote, batched", "prepared", "no vote in the exchange"],
)
def test_a_one_phase_answer_outside_the_contract_is_probed_and_called_a_protocol_error(
    vote: int, batch: bool, votes: int | None, committed: bool
) -> None:
    """A one-phase Prepare answered with no vote the contract allows may have committed (the
    participant ran something): the Rollback probe decides, as for a lost answer. But the
    answer was not lost: the reason said "one-phase answer lost: protocol error: ...", which
    sends an operator to the network instead of the participant's code."""

    async def scenario() -> None:
        peer = OnePhaseOutsideTheContract(
            participant_pb2.PrepareResponse(vote=vote),
            committed,
            votes,  # type: ignore[arg-type]
        )
        server = grpc.aio.server()
        participant_pb2_grpc.add_ParticipantServicer_to_server(peer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        registry = Registry()
        engine = Engine(MemoryLog(), registry, CoordinatorConfig())
        capabilities = coordinator_pb2.Capabilities(one_phase=True, batch=batch)
        registry.put(
            coordinator_pb2.ParticipantInfo(
                name="peer", address=f"127.0.0.1:{port}", capabilities=capabilities
            )
        )
        try:
            await engine.submit("t-outside", [("peer", any_pb2.Any())], 5_000, b"fp")

            async def over() -> bool:
                return "t-outside" not in engine.active

            await eventually(over)
            view = engine.lookup("t-outside")
            assert view is not None
            assert 1 == peer.rollbacks  # the probe
            if committed:
                assert coordinator_pb2.OUTCOME_COMMITTED == view.answer, view.reason
                return
            assert coordinator_pb2.OUTCOME_ABORTED == view.answer, view.reason
            assert "answer lost" not in view.reason, view.reason
            assert view.reason.startswith("one-phase answer unusable: protocol error: peer ")
            assert view.reason.endswith("; rolled back"), view.reason
        finally:
            await engine.close()
            await registry.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_refusal_a_participant_found_keeps_its_advice_however_long_its_reason() -> None:
    """The advice that the id is spent comes last: a participant's reason (up to
    REASON_CHARS_MAX) is cut so that the status, cut at STATUS_DETAILS_CHARS_MAX, keeps it."""
    from dtm import grpc_edge
    from dtm.coordinator.finished import TransactionView
    from dtm.coordinator.server import _spent

    reason = "branch 0 (x): " + "é" * limits.REASON_CHARS_MAX
    view = TransactionView("t-1", 0, 0, "", 0, 0, 0, b"", reason, "", b"", "", ())
    said = _spent(view)
    assert said == grpc_edge.status_details(said)
    assert said.startswith("branch 0 (x): éé")
    assert said.endswith("under a new transaction id (this one is spent)")
    short = _spent(view._replace(invalid_argument="branch 0 (x): quantity 0"))
    assert short.startswith("branch 0 (x): quantity 0; transaction t-1 was aborted")
