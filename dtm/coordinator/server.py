"""The coordinator's gRPC edge: translates dtm.v1.Coordinator calls to the engine and engine
errors to precise status codes. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import grpc

from dtm import config, crashpoints, grpc_edge, limits, logs, metrics, security
from dtm.batcher import DECISION_LINGER_MS_DEFAULT, LINGER_MS_DEFAULT, BatchPolicy
from dtm.coordinator.engine import CoordinatorConfig, Engine, Refused, SubmitRejected, wall_ms
from dtm.coordinator.finished import TransactionView
from dtm.coordinator.heuristics import HeuristicTable, heuristic_pb
from dtm.coordinator.ports import PREPARE_SEND_MARGIN_S, ParticipantPort
from dtm.coordinator.registry import (
    RegistrationError,
    Registry,
    name_problem,
    quoted,
    validate_registration,
)
from dtm.records import stamp_format
from dtm.wal import WriteAheadLog, async_log
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
# Trailing metadata of an inquiry refused because the asker's incarnation was replaced: the
# registered incarnation. The participant SDK stops on it (participants/server.py).
REPLACED_METADATA_KEY = "dtm-replaced"


def transaction_pb(view: TransactionView) -> coordinator_pb2.Transaction:
    return coordinator_pb2.Transaction(
        transaction_id=view.transaction_id,
        state=view.state,  # type: ignore[arg-type]  # a TransactionState value is an int
        reason=view.reason,
        created_at_unix_ms=view.created_at_ms,
        decided_at_unix_ms=view.decided_at_ms,
        timeout_ms=view.timeout_ms,
        branches=branch_statuses(view),
        committed_earlier=view.committed_earlier,
        transaction_fingerprint=view.fingerprint,
    )


def branch_statuses(view: TransactionView) -> list[coordinator_pb2.BranchStatus]:
    return [
        coordinator_pb2.BranchStatus(
            branch=b.branch,
            participant=b.participant,
            vote=b.vote,  # type: ignore[arg-type]  # a Vote value is an int
            reason=b.reason,
            acknowledged=b.acknowledged,
            phase_two_attempts=b.phase_two_attempts,
            last_error=b.last_error,
            heuristic=b.heuristic,
        )
        for b in view.branches
    ]


def _list_limit(requested: int) -> int:
    """How many a list call answers: 0 asks for the default; more than the cap gets the cap."""
    return min(
        requested or limits.LIST_TRANSACTIONS_LIMIT_DEFAULT, limits.LIST_TRANSACTIONS_LIMIT_MAX
    )


def listed_transactions(
    views: Iterable[TransactionView], requested: int
) -> coordinator_pb2.ListTransactionsResponse:
    """The first of `views` (newest first) a list asked for, as many as fit one answer: 1,000
    transactions of 32 branches, each with a reason and an error of up to about 1 KiB, can take
    tens of MB, and an answer over the message limit failed (RESOURCE_EXHAUSTED) with nothing
    listed. The answer then says it was cut, so the caller can ask for fewer; and whether more
    match than it lists (`dtm txn list --stuck` looks among the 1,000 newest in doubt only)."""
    matching = iter(views)
    listed, cut = grpc_edge.that_fit(map(transaction_pb, islice(matching, _list_limit(requested))))
    # One more looked for (not converted): whether the list shows all that match.
    more_match = cut or next(matching, None) is not None
    return coordinator_pb2.ListTransactionsResponse(
        transactions=listed, cut_at_message_limit=cut, more_match=more_match
    )


def listed_heuristics(
    kept: HeuristicTable, requested: int
) -> coordinator_pb2.ListHeuristicsResponse:
    """The oldest of the heuristic outcomes `kept` a list asked for, as many as fit one answer:
    a detail keeps up to REASON_CHARS_MAX characters of up to 4 bytes, and 1,000 such outcomes
    took 4.4 MB, over the message limit (RESOURCE_EXHAUSTED, nothing listed). `total` tells
    the caller that the list is cut."""
    listed, _ = grpc_edge.that_fit(map(heuristic_pb, islice(kept, _list_limit(requested))))
    return coordinator_pb2.ListHeuristicsResponse(heuristics=listed, total=len(kept))


# What fitted() leaves of each text in an answer that would not fit otherwise.
_TEXT_KEPT_IN_A_CROWDED_ANSWER = 64


def fitted(response: coordinator_pb2.SubmitBatchResponse) -> coordinator_pb2.SubmitBatchResponse:
    """The answer, within MESSAGE_BYTES_MAX. Reasons come from participants, unbounded, and
    256 transactions of 32 branches each could outgrow one message: the call would then fail
    after every transaction had run, and a retry would fail the same way. So in that rare case
    every reason and error is cut short; every outcome and code is kept."""
    if response.ByteSize() <= limits.ANSWER_BYTES_MAX:
        return response
    kept = _TEXT_KEPT_IN_A_CROWDED_ANSWER
    for result in response.results:
        result.message = result.message[:kept]
        if not result.HasField("response"):
            continue
        result.response.reason = result.response.reason[:kept]
        for status in result.response.branches:
            status.reason = status.reason[:kept]
            status.last_error = status.last_error[:kept]
    return response


async def _check_transaction_id(context: Context, transaction_id: str) -> None:
    problem = limits.transaction_id_problem(transaction_id)
    if problem:
        await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)


async def _check_asker(
    context: Context,
    request: coordinator_pb2.QueryOutcomeRequest | coordinator_pb2.ReportHeuristicRequest,
) -> None:
    """The participant, incarnation and fingerprint a participant's inquiry or report
    carries: INVALID_ARGUMENT when malformed."""
    problem = limits.addressing_problem(request.participant, request.incarnation)
    if problem:
        await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
    await _check_fingerprint(context, request.transaction_fingerprint)


def _of_attempt(attempt: bytes | None) -> str:
    """The attempt an operator named to ForgetHeuristic, as a refusal names it."""
    if attempt is None:
        return ""
    return f" of attempt {attempt.hex()}..." if attempt else " of an unknown attempt"


async def _check_fingerprint(context: Context, fingerprint: bytes) -> None:
    if len(fingerprint) > limits.TRANSACTION_FINGERPRINT_BYTES_MAX:
        await grpc_edge.abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"transaction_fingerprint is {len(fingerprint)} bytes; at most "
            f"{limits.TRANSACTION_FINGERPRINT_BYTES_MAX}",
        )


_DECIDED = (coordinator_pb2.OUTCOME_COMMITTED, coordinator_pb2.OUTCOME_ABORTED)


def _report_problem(request: coordinator_pb2.ReportHeuristicRequest) -> str | None:
    """What is wrong with the form of a ReportHeuristic, its ids aside, or None."""
    if not request.participant:
        return "participant is required: the name of the participant holding the forced branch"
    if request.forced not in _DECIDED or request.decision not in _DECIDED:
        return (
            f"forced is {request.forced} and decision {request.decision}: each must be "
            f"OUTCOME_COMMITTED ({coordinator_pb2.OUTCOME_COMMITTED}) or OUTCOME_ABORTED "
            f"({coordinator_pb2.OUTCOME_ABORTED})"
        )
    if request.forced == request.decision:
        name = coordinator_pb2.Outcome.Name(request.forced)
        return (
            f"forced and decision are both {name}: the forced outcome agrees with the "
            "coordinator's, which is no heuristic outcome; nothing to report"
        )
    if len(request.detail) > limits.REASON_CHARS_MAX:
        return f"detail is {len(request.detail)} characters; at most {limits.REASON_CHARS_MAX}"
    return None


def _refused(code: grpc.StatusCode, message: str) -> coordinator_pb2.SubmitResult:
    return coordinator_pb2.SubmitResult(
        code=code.value[0], message=grpc_edge.status_details(message)
    )


def _spent(view: TransactionView) -> str:
    """The refusal of a transaction a participant found malformed: what to fix (what the
    participant said, cut so that the rest fits a status: see grpc_edge.status_details),
    then that its id is spent."""
    spent = (
        f"; transaction {view.transaction_id} was aborted and nothing was applied: submit the "
        "corrected transaction under a new transaction id (this one is spent)"
    )
    room = grpc_edge.STATUS_DETAILS_CHARS_MAX - len(spent)
    said = view.invalid_argument
    return (said if len(said) <= room else f"{said[: room - 3]}...") + spent


def _fingerprint(request: coordinator_pb2.SubmitRequest) -> bytes:
    """Identity of a Submit's content, so a reused id with other content is caught."""
    digest = hashlib.blake2b(digest_size=16)
    for branch in request.branches:
        digest.update(branch.SerializeToString(deterministic=True))
    return digest.digest()


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: CoordinatorServer) -> None:
        self.coordinator = coordinator
        self.engine = coordinator.engine
        self.registry = coordinator.engine.registry

    async def RegisterParticipant(
        self, request: coordinator_pb2.RegisterParticipantRequest, context: Context
    ) -> coordinator_pb2.RegisterParticipantResponse:
        try:
            validate_registration(request)
        except RegistrationError as error:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # The interceptor let a participant identity in; it may register only its own name,
        # or one participant could redirect another's branches to itself.
        if not security.may_register_as(context, self.coordinator.server_config.tls, request.name):
            await grpc_edge.abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {security.peer_name(context)!r} may not register participant "
                f"{request.name!r}: a participant registers under its own certificate's Common "
                "Name, which must be a participant identity (--authz-participants)",
            )
        info = coordinator_pb2.ParticipantInfo(
            name=request.name,
            address=request.address,
            capabilities=request.capabilities,
            registered_at_unix_ms=wall_ms(),
            incarnation=request.incarnation,
        )
        if not self.registry.is_change(info):
            await self.coordinator.engine.renew(info.name, info.registered_at_unix_ms)
            return coordinator_pb2.RegisterParticipantResponse(changed=False)
        try:
            await self.coordinator.engine.register(info, replace=request.replace)
        except RegistrationError as error:
            await grpc_edge.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except Refused as refused:  # another incarnation while the name is owed answers
            self.coordinator.log.warning(
                "registration refused", name=info.name, address=info.address, reason=str(refused)
            )
            await grpc_edge.abort(context, refused.code, str(refused))
        self.coordinator.log.info(
            "participant registered",
            name=info.name,
            address=info.address,
            incarnation=info.incarnation or None,
            replace=request.replace or None,
        )
        return coordinator_pb2.RegisterParticipantResponse(changed=True)

    async def UnregisterParticipant(
        self, request: coordinator_pb2.UnregisterParticipantRequest, context: Context
    ) -> coordinator_pb2.UnregisterParticipantResponse:
        problem = name_problem(request.name)
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            info = await self.engine.unregister(request.name)
        except Refused as refused:
            await grpc_edge.abort(context, refused.code, str(refused))
        return coordinator_pb2.UnregisterParticipantResponse(participant=info)

    async def ListParticipants(
        self, request: coordinator_pb2.ListParticipantsRequest, context: Context
    ) -> coordinator_pb2.ListParticipantsResponse:
        return coordinator_pb2.ListParticipantsResponse(
            participants=[
                self.registry.participants[name] for name in sorted(self.registry.participants)
            ]
        )

    async def Submit(
        self, request: coordinator_pb2.SubmitRequest, context: Context
    ) -> coordinator_pb2.SubmitResponse:
        result = await self._submit(request)
        if result.code:
            await grpc_edge.abort(context, grpc_edge.STATUS_OF_CODE[result.code], result.message)
        return result.response

    async def SubmitBatch(
        self, request: coordinator_pb2.SubmitBatchRequest, context: Context
    ) -> coordinator_pb2.SubmitBatchResponse:
        count = len(request.transactions)
        if not 1 <= count <= limits.SUBMIT_BATCH_MAX:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} transactions; a SubmitBatch carries 1..{limits.SUBMIT_BATCH_MAX} "
                "(nothing was run)",
            )
        # Each one runs as its own Submit would, concurrently: one slow transaction does not
        # hold the others back from their participants, only from this call's answer.
        answers = await asyncio.gather(
            *map(self._submit, request.transactions), return_exceptions=True
        )
        results = []
        for transaction, answer in zip(request.transactions, answers, strict=True):
            if isinstance(answer, Exception):  # a bug: this one fails alone, the rest answer
                self.coordinator.log.error(
                    "submit failed inside the coordinator",
                    txn=transaction.transaction_id,
                    error=f"{type(answer).__name__}: {answer}",
                    exc_info=answer,
                )
                answer = _refused(grpc.StatusCode.INTERNAL, f"internal error: {answer}")
            elif isinstance(answer, BaseException):
                raise answer
            results.append(answer)
        return fitted(coordinator_pb2.SubmitBatchResponse(results=results))

    async def _submit(self, request: coordinator_pb2.SubmitRequest) -> coordinator_pb2.SubmitResult:
        """Run one transaction; its answer as a value (Submit turns a failure into a status)."""
        started = time.perf_counter()
        try:
            return await self._run_submit(request)
        finally:
            self.engine.observer.submit_handled(started)

    async def _run_submit(
        self, request: coordinator_pb2.SubmitRequest
    ) -> coordinator_pb2.SubmitResult:
        problem = self._check_submit(request)
        if problem is not None:
            return _refused(*problem)
        timeout_ms = request.timeout_ms or self.coordinator.config.transaction_timeout_ms
        try:
            view = await self.engine.submit(
                request.transaction_id,
                [(b.participant, b.operation) for b in request.branches],
                timeout_ms,
                _fingerprint(request),
            )
        except SubmitRejected as rejected:
            return _refused(rejected.code, str(rejected))
        committed = view.answer == coordinator_pb2.OUTCOME_COMMITTED  # (an earlier attempt)
        if view.id_reused and not committed:
            # Beyond the coordinator's own memory (finished_kept): a participant remembered.
            return _refused(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{view.id_reused}; this attempt was aborted and nothing was applied: choose a "
                "new transaction id",
            )
        if view.invalid_argument and not committed:
            # Found by a participant, after the transaction started: it ran and aborted, and
            # its id now holds it (other content under it is ALREADY_EXISTS), unlike a
            # request _check_submit refused, which leaves its id free.
            return _refused(grpc.StatusCode.INVALID_ARGUMENT, _spent(view))
        return coordinator_pb2.SubmitResult(
            response=coordinator_pb2.SubmitResponse(
                transaction_id=view.transaction_id,
                outcome=view.answer,  # type: ignore[arg-type]  # an Outcome value is an int
                reason=view.reason,
                branches=branch_statuses(view),
            )
        )

    def _check_submit(
        self, request: coordinator_pb2.SubmitRequest
    ) -> tuple[grpc.StatusCode, str] | None:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if request.transaction_id and not limits.TRANSACTION_ID_PATTERN.fullmatch(
            request.transaction_id
        ):
            return invalid, (
                f"transaction_id {request.transaction_id[:40]!r} is malformed: use 1..128 "
                "characters of [A-Za-z0-9._:-], or leave it empty to get one assigned"
            )
        if not request.branches:
            return invalid, "a transaction needs at least one branch"
        if len(request.branches) > limits.BRANCHES_PER_TRANSACTION_MAX:
            return invalid, (
                f"{len(request.branches)} branches; at most "
                f"{limits.BRANCHES_PER_TRANSACTION_MAX} per transaction"
            )
        if request.timeout_ms > limits.TRANSACTION_TIMEOUT_MS_MAX:
            return invalid, f"timeout_ms is at most {limits.TRANSACTION_TIMEOUT_MS_MAX}"
        floor_ms = round(PREPARE_SEND_MARGIN_S * 1000)
        if 0 < request.timeout_ms <= floor_ms:
            # A prepare with less than PREPARE_SEND_MARGIN_S left is never sent.
            return invalid, (
                f"timeout_ms {request.timeout_ms} is too short to send a prepare: more than "
                f"{floor_ms}, or 0 for the default"
            )
        # A retry of a transaction the engine knows is answered from what it knows, whatever
        # the registry says now (a participant unregistered or changed since).
        retried = bool(request.transaction_id) and self.engine.knows(request.transaction_id)
        for index, branch in enumerate(request.branches):
            if not retried and branch.participant not in self.registry.participants:
                return grpc.StatusCode.NOT_FOUND, self.registry.unknown_branch(
                    index, branch.participant
                )
            if not branch.HasField("operation") or not branch.operation.type_url:
                return (
                    invalid,
                    f"branch {index} ({quoted(branch.participant)}): the operation is missing",
                )
            type_url = branch.operation.type_url
            if len(type_url) > limits.TYPE_URL_CHARS_MAX or not type_url.isascii():
                return invalid, (
                    f"branch {index} ({quoted(branch.participant)}): the operation's type URL "
                    f"must be ASCII, at most {limits.TYPE_URL_CHARS_MAX} characters "
                    f"(got {len(type_url)}: {type_url[:60]!r}...)"
                )
            if len(branch.operation.value) > limits.OPERATION_BYTES_MAX:
                return invalid, (
                    f"branch {index} ({quoted(branch.participant)}): operation is "
                    f"{len(branch.operation.value)} bytes, at most {limits.OPERATION_BYTES_MAX}"
                )
            type_name = branch.operation.type_url.rsplit("/", 1)[-1]
            if not retried and not self.registry.accepts(branch.participant, type_name):
                return invalid, self.registry.wrong_type(index, branch.participant, type_name)
        return None

    async def GetTransaction(
        self, request: coordinator_pb2.GetTransactionRequest, context: Context
    ) -> coordinator_pb2.Transaction:
        await _check_transaction_id(context, request.transaction_id)
        view = self.engine.lookup(request.transaction_id)
        if view is None:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no transaction {request.transaction_id[:128]!r}: never submitted here, "
                f"finished and forgotten (the last {self.coordinator.config.finished_kept} "
                "finished transactions are kept), or aborted before the coordinator's last "
                "restart (aborts are not logged: presumed abort)",
            )
        return transaction_pb(view)

    async def ListTransactions(
        self, request: coordinator_pb2.ListTransactionsRequest, context: Context
    ) -> coordinator_pb2.ListTransactionsResponse:
        problem = grpc_edge.enum_problem(
            request.states, coordinator_pb2.TransactionState, "transaction state(s)"
        )
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        return listed_transactions(self.engine.views(set(request.states)), request.limit)

    async def RetryTransaction(
        self, request: coordinator_pb2.RetryTransactionRequest, context: Context
    ) -> coordinator_pb2.Transaction:
        await _check_transaction_id(context, request.transaction_id)
        view = await self.engine.retry_phase_two_now(request.transaction_id)
        if view is None:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no transaction {request.transaction_id[:128]!r} is known here",
            )
        self.coordinator.log.info("phase 2 retried by an operator", txn=request.transaction_id)
        return transaction_pb(view)

    async def ListHeuristics(
        self, request: coordinator_pb2.ListHeuristicsRequest, context: Context
    ) -> coordinator_pb2.ListHeuristicsResponse:
        return listed_heuristics(self.engine.heuristics, request.limit)

    async def ForgetHeuristic(
        self, request: coordinator_pb2.ForgetHeuristicRequest, context: Context
    ) -> coordinator_pb2.ForgetHeuristicResponse:
        problem = limits.branch_ids_problem(request.transaction_id, request.branch)
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        await _check_fingerprint(context, request.transaction_fingerprint)
        # Set and empty: the outcome whose attempt is not known; unset: any.
        attempt = (
            request.transaction_fingerprint if request.HasField("transaction_fingerprint") else None
        )
        try:
            forgotten = await self.engine.forget_heuristic(
                request.transaction_id, request.branch, attempt
            )
        except Refused as refused:
            await grpc_edge.abort(context, refused.code, str(refused))
        if forgotten is None:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no heuristic outcome{_of_attempt(attempt)} is kept for "
                f"{request.transaction_id}/{request.branch}: never recorded, or already "
                "forgotten (list them with ListHeuristics: `dtm heuristics`)",
            )
        return coordinator_pb2.ForgetHeuristicResponse(forgotten=heuristic_pb(forgotten))

    async def ReportHeuristic(
        self, request: coordinator_pb2.ReportHeuristicRequest, context: Context
    ) -> coordinator_pb2.ReportHeuristicResponse:
        problem = limits.branch_ids_problem(request.transaction_id, request.branch) or (
            _report_problem(request)
        )
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        await _check_asker(context, request)
        # As RegisterParticipant: a participant identity reports only its own branches.
        if not security.may_register_as(
            context, self.coordinator.server_config.tls, request.participant
        ):
            await grpc_edge.abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {security.peer_name(context)!r} may not report the heuristic "
                f"outcomes of participant {request.participant!r}: only its own (its "
                "certificate's Common Name)",
            )
        await self._refuse_if_replaced(request, context, "heuristic report")
        try:
            kept = await self.engine.report_heuristic(
                request.transaction_id,
                request.branch,
                request.participant,
                forced_commit=request.forced == coordinator_pb2.OUTCOME_COMMITTED,
                fingerprint=request.transaction_fingerprint,
                detail=request.detail,
            )
        except Refused as refused:
            self.coordinator.log.warning(
                "heuristic report refused",
                txn=request.transaction_id,
                branch=request.branch,
                participant=request.participant,
                reason=str(refused),
            )
            await grpc_edge.abort(context, refused.code, str(refused))
        return coordinator_pb2.ReportHeuristicResponse(heuristic=heuristic_pb(kept))

    async def QueryOutcome(
        self, request: coordinator_pb2.QueryOutcomeRequest, context: Context
    ) -> coordinator_pb2.QueryOutcomeResponse:
        # Checked first: presumed abort answers ABORTED for any id it has no record of, and
        # the id and the name go into the log line.
        await _check_transaction_id(context, request.transaction_id)
        await _check_asker(context, request)
        await self._refuse_if_replaced(request, context)
        answer = self.engine.answer_inquiry(request.transaction_id, request.transaction_fingerprint)
        self.coordinator.log.info(
            "outcome asked",
            txn=request.transaction_id,
            participant=request.participant,
            incarnation=request.incarnation or None,
            outcome=coordinator_pb2.Outcome.Name(answer.outcome),
            presumed_abort=answer.presumed_abort,
        )
        return coordinator_pb2.QueryOutcomeResponse(
            outcome=answer.outcome,  # type: ignore[arg-type]
            presumed_abort=answer.presumed_abort,
        )

    async def _refuse_if_replaced(
        self,
        request: coordinator_pb2.QueryOutcomeRequest | coordinator_pb2.ReportHeuristicRequest,
        context: Context,
        what: str = "inquiry",
    ) -> None:
        """Refuse an inquiry (or a report: `what`) from an incarnation the registry no longer
        holds, before any outcome is looked up: a replaced process that still runs would
        otherwise apply the decisions now owed to its replacement (which hears of branches it
        does not know, and reports them as heuristic hazards), both acting on one decision."""
        registered = self.registry.replacing(request.participant, request.incarnation)
        if registered is None:
            return
        registered_at_s = registered.registered_at_unix_ms / 1000
        since = (  # 0: not recorded (this build stamps every registration it takes)
            f" since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(registered_at_s))}"
            if registered_at_s > 0
            else ""
        )
        message = (
            f"participant {request.participant!r} incarnation {request.incarnation!r} was "
            f"replaced: incarnation {registered.incarnation!r} at {registered.address} is "
            f"registered under this name{since}, and every decision about its branches goes to "
            "it. This process must stop: it may learn no outcome, and must apply none. Its "
            "prepared branches stay in doubt in its log: reconcile them by hand with the "
            "coordinator's outcomes (dtm txn show ID) and the heuristic hazards recorded at the "
            "replacement (dtm heuristics)"
        )
        self.coordinator.log.warning(
            f"{what} from a replaced incarnation refused",
            txn=request.transaction_id,
            participant=request.participant,
            incarnation=request.incarnation,
            registered_incarnation=registered.incarnation,
        )
        context.set_trailing_metadata(((REPLACED_METADATA_KEY, registered.incarnation),))
        await grpc_edge.abort(context, grpc.StatusCode.FAILED_PRECONDITION, message)


@dataclass
class ServerConfig:
    data_dir: Path
    listen: str = "127.0.0.1:50050"
    engine: CoordinatorConfig | None = None
    # None: plaintext and no authorization (local development only); see dtm.security.
    tls: security.TlsConfig | None = None
    # host:port of the Prometheus endpoint; "" = off (see dtm.metrics).
    metrics_listen: str = ""
    # None: DTM_LOG_LEVEL, else INFO (see dtm.logs).
    log_level: str | None = None
    # "loop" or "thread": see dtm.wal.LoopCommitLog.
    wal_sync: str = "loop"
    # See dtm.batcher.BatchPolicy.
    batch_linger_ms: float = LINGER_MS_DEFAULT
    batch_decision_linger_ms: float = DECISION_LINGER_MS_DEFAULT


class CoordinatorServer:
    def __init__(self, config: ServerConfig) -> None:
        self.server_config = config
        self.config = config.engine or CoordinatorConfig()
        self.log = logs.get("coordinator")
        wal, records = WriteAheadLog.open(config.data_dir / "coordinator" / "wal")
        self.wal = async_log(wal, config.wal_sync)
        policy = BatchPolicy(
            linger_ms=config.batch_linger_ms,
            decision_linger_ms=config.batch_decision_linger_ms,
            phase_two_timeout_ms=self.config.phase_two_timeout_ms,
        )
        self.engine = Engine(self.wal, Registry(policy, tls=config.tls), self.config)
        try:
            self._pending = self.engine.replay(records, wal.directory)
        except BaseException:
            # The start is refused (ReplayError) before anything is appended: let go of the
            # directory, so that a process embedding the coordinator can start again on the
            # log instead of finding it "in use by another process (pid <itself>)".
            self.wal.abandon()
            raise
        stamp_format(self.wal, records)
        self.server = grpc_edge.new_server(security.server_interceptors(config.tls))
        self.port = 0
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopped = False
        self.metrics = metrics.for_coordinator(
            self.engine, self.wal, config.metrics_listen, config.tls
        )

    async def start(self) -> int:
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
            CoordinatorServicer(self), self.server
        )
        grpc_edge.add_health_and_reflection(
            self.server, [coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name]
        )
        tls = self.server_config.tls
        try:
            self._bind(tls)
        except BaseException:
            await self._release_unserved()
            raise
        # Recovery before serving, once every port is bound: a start refused for a port must
        # not have resumed phase 2 (nor said so in the log) for the few moments before it exits.
        crashpoints.hit("coordinator.during_recovery")
        resumed = self.engine.resume(self._pending)
        self._pending = []
        await self.server.start()
        self.log.info(
            "coordinator serving",
            port=self.port,
            participants=len(self.engine.registry.participants),
            commits_resumed=resumed,
            security=security.describe(tls),
        )
        self._housekeeping = asyncio.get_running_loop().create_task(self._checkpoints())
        return self.port

    def _bind(self, tls: security.TlsConfig | None) -> None:
        """Bind /metrics, then the gRPC port. In that order: /metrics can be let go of when the
        gRPC port is refused, while a gRPC server holds its port until it has been started."""
        self.metrics_port = self.metrics.start() if self.metrics is not None else 0
        credentials = security.server_credentials(tls) if tls is not None else None
        self.port = grpc_edge.bind(self.server, self.server_config.listen, credentials)

    async def _release_unserved(self) -> None:
        """Let go of what a start refused for a port holds, so that a process embedding the
        coordinator can start it again (on another port, say) on the same directory, instead
        of finding its log "in use by another process (pid <itself>)". Nothing was resumed or
        served: there is nothing to drain, and nothing to say but the error."""
        self._stopped = True  # stop() after this has nothing left to do
        if self.metrics is not None:
            await self.metrics.stop()
        await self.wal.close()

    async def _checkpoints(self) -> None:
        while True:  # until stop() cancels it
            await asyncio.sleep(0.5)
            try:
                written = await self.engine.checkpoint_if_due()
            except Exception as error:  # the loop must go on: the next one may succeed
                # Nothing is lost: the log keeps every record since the last checkpoint, it
                # only grows. A failed fsync never reaches here (the process stops). The next
                # attempt comes after as many records again (checkpoint_if_due reset the count).
                self.log.error(
                    "checkpoint failed; the log grows until one succeeds",
                    error=f"{type(error).__name__}: {error}",
                )
                continue
            if written:
                self.log.info(
                    "checkpoint written",
                    active=len(self.engine.active),
                    ms=self.engine.checkpoints.last_ms,
                )

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop gracefully within `grace_s`: refuse new calls, let the Submits in flight finish,
        then let phase 2 of every transaction finish, so that participants are left with
        nothing in doubt. What is still in flight at the end is left to recovery, as after a
        crash: its log has every commit decision."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        answer_waiting: asyncio.TimerHandle | None = None
        if grace_s > 0:  # 0 is an abrupt stop (tests use it as a crash): no last calls
            self.engine.registry.hurry()
            # Aborts still waiting for a Prepare are answered as the grace runs out, not at
            # once: the vote still out may say an earlier attempt committed the transaction.
            answer_at = max(0.0, grace_s - min(0.2, grace_s / 2))
            answer_waiting = loop.call_later(answer_at, self.engine.stop_waiting)
        await self.server.stop(grace_s)
        left = await self.engine.drain(grace_s - (loop.time() - started))
        if answer_waiting is not None:
            answer_waiting.cancel()
        counters = self.engine.counters
        # WARNING when something is left: participants stay in doubt until the next start,
        # and the outcome of a one-phase commit left is for its participant to tell.
        (self.log.warning if any(left) else self.log.info)(
            "coordinator stopping",
            committed=counters.committed,
            aborted=counters.aborted,
            unknown=counters.unknown or None,
            left_to_recovery=left.to_recovery,
            one_phase_unknown=left.one_phase_unknown or None,
            presumed_aborted=left.presumed_aborted or None,
            **_batching_fields(self.engine.registry.ports()),
        )
        if self.metrics is not None:
            await self.metrics.stop()
        await self.engine.close()
        await self.engine.registry.close()
        await self.wal.close()


def _batching_fields(ports: Mapping[str, ParticipantPort]) -> dict[str, Any]:
    """How well batching worked, for the stopping line: items per call over every participant
    called, and of the busiest LOG_PARTICIPANTS_NAMED_MAX by calls. A field per participant
    made a line of up to PARTICIPANTS_MAX (256) fields."""
    called = [(name, port) for name, port in ports.items() if port.calls]
    busiest = heapq.nlargest(
        limits.LOG_PARTICIPANTS_NAMED_MAX, called, key=lambda entry: entry[1].calls
    )
    items, calls = sum(p.items for _, p in called), sum(p.calls for _, p in called)
    return {
        "items_per_call": round(items / max(1, calls), 1),
        "participants_called": len(called),
        # name:items-per-call, the busiest first: one token (names have no ',' or ':').
        "busiest_items_per_call": ",".join(
            f"{name}:{round(port.items / port.calls, 1)}" for name, port in busiest
        )
        or None,
    }


def parse_args(argv: list[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        prog="dtm coordinator", description=f"The dtm coordinator. {config.PRECEDENCE_HELP}"
    )
    # Every [coordinator] key as a flag (--listen, --data-dir, ...), plus --config, --log-level.
    config.add_flags(parser, config.COORDINATOR)
    security.add_arguments(parser)
    options = parser.parse_args(argv)
    try:
        settings = config.from_options(options, config.COORDINATOR)
        tls = security.from_options(
            options,
            configured=config.tls_files(settings.coordinator),
            configured_in=config.tls_origin(settings, config.COORDINATOR),
        )
    except security.TlsMaterialError as error:
        # A configuration refused, so status 2 as for any other; but one line without the
        # usage text, since the flags themselves were fine: the files they name are not.
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:  # config.ConfigError included: it names the key and the value
        parser.error(str(error))
    coordinator = settings.coordinator
    return ServerConfig(
        data_dir=coordinator.data_dir,
        listen=coordinator.listen,
        engine=CoordinatorConfig(
            prepare_timeout_ms=coordinator.prepare_timeout_ms,
            transaction_timeout_ms=coordinator.transaction_timeout_ms,
            checkpoint_every_records=coordinator.checkpoint_every_records,
            finished_kept=coordinator.finished_kept,
        ),
        tls=tls,
        metrics_listen=coordinator.metrics_listen,
        log_level=settings.log.level,
        wal_sync=coordinator.wal_sync,
        batch_linger_ms=coordinator.batch_linger_ms,
        batch_decision_linger_ms=coordinator.batch_decision_linger_ms,
    )


def main(argv: list[str] | None = None) -> None:
    server_config = parse_args(argv)
    logs.configure("coordinator", server_config.log_level)
    grpc_edge.use_fast_event_loop()
    grpc_edge.run_server(lambda: CoordinatorServer(server_config))


if __name__ == "__main__":
    main()
