"""A participant whose own record contradicts phase 2 (rolled back when told to commit,
committed when told to roll back, or no longer knowing a branch that voted PREPARED): the
coordinator records a heuristic outcome, shows it, counts it and stops phase 2 for that
branch, instead of retrying forever what no retry can change."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from dtm import grpc_edge
from dtm.coordinator.ports import BatchPolicy, DecideItem, DecideResult, ParticipantPort
from dtm.coordinator.ports import reported_heuristic as heuristic
from dtm.core.branch import HEURISTIC_COMMIT, HEURISTIC_HAZARD, HEURISTIC_ROLLBACK
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc, shop_pb2
from tests.harness import InProcessCluster, eventually, order_branches, pack

Code = grpc.StatusCode


def test_which_phase_two_answers_are_heuristic_outcomes() -> None:
    # An operator's forced outcome, named by the participant, comes first.
    assert "heuristic rollback" == heuristic(True, Code.FAILED_PRECONDITION, "heuristic rollback")
    # The branch's own record contradicts the decision.
    assert HEURISTIC_ROLLBACK == heuristic(True, Code.FAILED_PRECONDITION, "")
    assert HEURISTIC_COMMIT == heuristic(False, Code.FAILED_PRECONDITION, "")
    # A Commit for a branch that voted PREPARED and is now unknown: outcome unknown there.
    assert HEURISTIC_HAZARD == heuristic(True, Code.NOT_FOUND, "")
    # A Rollback of an unknown branch leaves a tombstone; NOT_FOUND there is not a contradiction.
    assert "" == heuristic(False, Code.NOT_FOUND, "")
    # Failures that a retry may cure stay failures.
    for code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN):
        assert "" == heuristic(True, code, "")
        assert "" == heuristic(False, code, "")


class ScriptedParticipant(participant_pb2_grpc.ParticipantServicer):
    """A plain unary participant, as one in another language would be: it votes PREPARED and
    answers phase 2 with the status it was given (OK when None)."""

    def __init__(self, commit: Code | None = None, rollback: Code | None = None) -> None:
        self.answers = {"Commit": commit, "Rollback": rollback}
        self.calls = {"Commit": 0, "Rollback": 0}

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:
        return participant_pb2.PrepareResponse(vote=coordinator_pb2.VOTE_PREPARED)

    async def _decide(self, rpc: str, context: Any) -> None:
        self.calls[rpc] += 1
        code = self.answers[rpc]
        if code is not None:
            await context.abort(code, f"scripted: {rpc} answered {code.name}")

    async def Commit(self, request: Any, context: Any) -> participant_pb2.CommitResponse:
        await self._decide("Commit", context)
        return participant_pb2.CommitResponse()

    async def Rollback(self, request: Any, context: Any) -> participant_pb2.RollbackResponse:
        await self._decide("Rollback", context)
        return participant_pb2.RollbackResponse()


async def _with_scripted(
    cluster: InProcessCluster, scripted: ScriptedParticipant
) -> grpc.aio.Server:
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServicer_to_server(scripted, server)
    port = grpc_edge.bind(server, "127.0.0.1:0")
    await server.start()
    await cluster.client.RegisterParticipant(
        coordinator_pb2.RegisterParticipantRequest(name="scripted", address=f"127.0.0.1:{port}")
    )
    return server


def _scripted_branch() -> coordinator_pb2.BranchRequest:
    return coordinator_pb2.BranchRequest(
        participant="scripted", operation=pack(shop_pb2.StockLine(sku="x", quantity=1))
    )


def _heuristics_counted(cluster: InProcessCluster, outcome: str) -> float:
    registry = cluster.coordinator.engine.observer.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value(
        "dtm_heuristic_outcomes_total", {"participant": "scripted", "outcome": outcome}
    )
    return float(value or 0)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(Code.FAILED_PRECONDITION, HEURISTIC_ROLLBACK), (Code.NOT_FOUND, HEURISTIC_HAZARD)],
)
def test_a_commit_the_participant_contradicts_is_recorded_once_not_retried(
    tmp_path: Path, answer: Code, outcome: str
) -> None:
    async def scenario() -> None:
        cluster = InProcessCluster(tmp_path)
        cluster.coordinator_config = dataclasses.replace(
            cluster.coordinator_config, metrics_listen="127.0.0.1:0"
        )
        async with cluster:
            scripted = ScriptedParticipant(commit=answer)
            server = await _with_scripted(cluster, scripted)
            branches = [*order_branches("o-c", [("sku-apple", 1)]), _scripted_branch()]
            response = await cluster.submit(branches, "txn-c")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            get = coordinator_pb2.GetTransactionRequest(transaction_id="txn-c")

            async def finished() -> bool:
                status = await cluster.client.GetTransaction(get)
                return bool(status.state == coordinator_pb2.TRANSACTION_STATE_COMMITTED)

            await eventually(finished)
            status = await cluster.client.GetTransaction(get)
            assert outcome == status.branches[4].heuristic
            assert "scripted: Commit answered" in status.branches[4].last_error
            assert all("" == branch.heuristic for branch in status.branches[:4])
            assert 1 == _heuristics_counted(cluster, outcome)
            # Several backoff periods (50 ms and up) later: not one more Commit.
            await asyncio.sleep(0.5)
            assert 1 == scripted.calls["Commit"]
            # The four services committed as usual.
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            orders = await cluster.orders()
            assert shop_pb2.ORDER_STATE_CONFIRMED == orders["o-c"].state
            await server.stop(0)

    asyncio.run(scenario())


def test_a_rollback_the_participant_contradicts_is_recorded_once_not_retried(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        cluster = InProcessCluster(tmp_path)
        cluster.coordinator_config = dataclasses.replace(
            cluster.coordinator_config, metrics_listen="127.0.0.1:0"
        )
        async with cluster:
            scripted = ScriptedParticipant(rollback=Code.FAILED_PRECONDITION)
            server = await _with_scripted(cluster, scripted)
            # The blocked account declines: the transaction aborts after the scripted vote.
            declined = order_branches("o-r", [("sku-apple", 1)], account="acct-blocked")
            response = await cluster.submit([*declined, _scripted_branch()], "txn-r")
            assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
            get = coordinator_pb2.GetTransactionRequest(transaction_id="txn-r")

            async def recorded() -> bool:
                status = await cluster.client.GetTransaction(get)
                return bool(status.branches[4].heuristic == HEURISTIC_COMMIT)

            await eventually(recorded)
            assert 1 == _heuristics_counted(cluster, HEURISTIC_COMMIT)
            await asyncio.sleep(0.5)
            # Before, a contradicted Rollback was tried five times and then dropped in silence.
            assert 1 == scripted.calls["Rollback"]
            orders = await cluster.orders()
            assert shop_pb2.ORDER_STATE_CANCELLED == orders["o-r"].state
            await server.stop(0)

    asyncio.run(scenario())


def test_a_batched_participant_says_which_status_a_failed_decision_has(tmp_path: Path) -> None:
    """The SDK's Exchange answer carries the status a unary Commit or Rollback would have, so
    the coordinator reads a contradiction the same way on both paths."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            response = await cluster.submit(order_branches("o-b", [("sku-apple", 1)]), "txn-b")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            get = coordinator_pb2.GetTransactionRequest(transaction_id="txn-b")

            async def acknowledged() -> bool:
                status = await cluster.client.GetTransaction(get)
                return bool(status.state == coordinator_pb2.TRANSACTION_STATE_COMMITTED)

            await eventually(acknowledged)  # every branch committed
            stub = cluster.participant_stub("orders")
            decisions = [
                participant_pb2.Decision(transaction_id="txn-b", branch=1, commit=False),
                participant_pb2.Decision(transaction_id="txn-nobody", branch=1, commit=True),
                participant_pb2.Decision(transaction_id="txn-b", branch=1, commit=True),
                participant_pb2.Decision(transaction_id="bad id!", branch=1, commit=True),
            ]
            exchange = await stub.Exchange(participant_pb2.ExchangeRequest(decisions=decisions))
            codes = [(result.ok, result.code) for result in exchange.results]
            assert [
                (False, Code.FAILED_PRECONDITION.value[0]),  # committed: cannot roll back
                (False, Code.NOT_FOUND.value[0]),  # never prepared here
                (True, 0),  # a duplicate Commit is acknowledged
                (False, Code.INVALID_ARGUMENT.value[0]),
            ] == codes

    asyncio.run(scenario())


def test_the_coordinator_reads_a_batched_contradiction_as_a_heuristic() -> None:
    async def scenario() -> list[DecideResult]:
        results = [
            participant_pb2.DecisionResult(
                ok=False, error="rolled back", code=Code.FAILED_PRECONDITION.value[0]
            ),
            participant_pb2.DecisionResult(ok=False, error="unreachable"),  # no code: retried
            participant_pb2.DecisionResult(ok=True),
        ]

        async def exchange(request: Any, **options: Any) -> participant_pb2.ExchangeResponse:
            return participant_pb2.ExchangeResponse(results=results)

        client: Any = SimpleNamespace(name="p", stub=SimpleNamespace(Exchange=exchange))
        port = ParticipantPort(client, batch=True, policy=BatchPolicy())
        answered: list[DecideResult] = []
        done = answered.append
        await port._send_exchange([DecideItem(f"t-{n}", 0, True, done) for n in range(3)])
        return answered

    answered = asyncio.run(scenario())
    assert [HEURISTIC_ROLLBACK, "", ""] == [result.heuristic for result in answered]
    assert [False, False, True] == [result.ok for result in answered]
