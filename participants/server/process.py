"""ParticipantServer: the participant process (serving, registration, recovery, leases,
inquiries, heuristic reports, checkpoints).

Part of `participants.server`: see its docstring."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import grpc

from dtm import crashpoints, grpc_edge, limits, logs, metrics, security
from dtm.core.branch import BranchState
from dtm.records import stamp_format
from dtm.wal import WriteAheadLog, async_log
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc
from participants.branches import (
    BranchEngine,
    BranchInfo,
    monotonic_ms,
)
from participants.locks import LockManager
from participants.server.admin import (
    AdminServicer,
)
from participants.server.servicer import (
    ParticipantServicer,
)
from participants.server.settings import (
    ParticipantConfig,
    wal_sync_mode,
)
from participants.server.wire import (
    REGISTRATION_FATAL,
    FaultState,
    _replacement,
    now_ms,
)
from participants.service import Service, service_problem

#: Where a service's TLS files come from, for the hints below.
_TLS_FILES = "--tls-ca, --tls-cert and --tls-key (or tls_* in the service's configuration section)"
#: What to check when a call to the coordinator failed in the TLS handshake, by what failed.
_TLS_HINTS = {
    security.HandshakeFailure.PLAINTEXT_PEER: (
        "the coordinator does not speak TLS: give it --tls-ca, --tls-cert and --tls-key too (or "
        "tls_* in its configuration section), or run this service without TLS"
    ),
    security.HandshakeFailure.TLS_PEER: (
        "the coordinator closed the connection: does it require TLS? Give this service "
        + _TLS_FILES
    ),
    security.HandshakeFailure.IDENTITY: (
        "the coordinator's certificate does not carry the coordinator identity expected "
        "(--authz-coordinator, DTM_AUTHZ_COORDINATOR; default: coordinator)"
    ),
    security.HandshakeFailure.EXPIRED: (
        "a certificate has expired (the coordinator's, or its CA; this service's own were "
        "checked at start): renew it"
    ),
    security.HandshakeFailure.NOT_YET_VALID: (
        "a certificate is not valid yet (the coordinator's, or its CA): is a clock wrong?"
    ),
    security.HandshakeFailure.UNTRUSTED: (
        "the coordinator's certificate is not signed by this service's CA, or the coordinator "
        f"does not trust this service's certificate: one CA must sign both; check {_TLS_FILES}"
    ),
    security.HandshakeFailure.OTHER: f"TLS handshake failed; check {_TLS_FILES}",
}


def tls_hint(details: str, tls: bool) -> str | None:
    """What to fix when a call to the coordinator failed in the TLS handshake (`details`: its
    status details; `tls`: whether this service speaks TLS), or None when it did not."""
    failure = security.handshake_failure(details, tls)
    return None if failure is None else _TLS_HINTS[failure]


def not_a_coordinator_hint(code: grpc.StatusCode, coordinator: str) -> str | None:
    """What to fix when the registration was answered UNIMPLEMENTED: what listens at the
    coordinator's address is another kind of server (a service's port, say), and the retries
    said only gRPC's "Method not found!"."""
    if code is not grpc.StatusCode.UNIMPLEMENTED:
        return None
    return (
        f"the server at {coordinator} is not a dtm coordinator (it does not serve "
        "RegisterParticipant): check --coordinator (coordinator in [participant] or in the "
        "service's section)"
    )


#: How long an inquiry waits for the coordinator's answer (the housekeeping's, and the one
#: before an operator's forget): a coordinator that takes longer is asked again later.
INQUIRY_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class CoordinatorAnswer:
    """The coordinator's answer to an inquiry about one branch: `outcome` (OUTCOME_COMMITTED,
    OUTCOME_ABORTED, or OUTCOME_UNSPECIFIED while undecided), or None when it gave none, with
    `problem` saying why; `unreachable` when no answer came at all (none configured,
    UNAVAILABLE, or none within FORCE_CHECK_TIMEOUT_S), as opposed to a refusal or a failed TLS
    handshake. `presumed_abort`: ABORTED for want of any record of the branch's attempt
    (QueryOutcomeResponse.presumed_abort), not an abort the coordinator keeps on record."""

    outcome: int | None
    problem: str = ""
    unreachable: bool = False
    presumed_abort: bool = False


@dataclass(frozen=True)
class Unsettled:
    """Why a forced branch still awaits its coordinator after `settle_forced` asked about it:
    `reason`; `on_record` when the coordinator answered from its record of the branch's
    attempt (it has not decided, or has not taken the report of a contradiction), so it did
    not lose its log, whatever an operator's coordinator_lost says."""

    reason: str
    on_record: bool = False


def registration_delay_s(attempt: int) -> float:
    """The wait after failed registration `attempt` (1, 2, ...): 50 ms, doubled each time, at
    most a second (a coordinator back up is found within a second)."""
    return min(0.05 * (1 << min(attempt - 1, 5)), 1.0)


class ParticipantServer:
    """One participant process: a service's business logic behind the SDK."""

    def __init__(self, service: Service[Any], config: ParticipantConfig) -> None:
        # The coordinator's own check: a name it would refuse could never register (and it
        # names the data directory).
        problem = limits.participant_name_problem(service.name)
        if problem:
            raise ValueError(f"service {type(service).__name__}: {problem}")
        # Before the log is opened: a service that cannot run leaves no data directory.
        problem = service_problem(service)
        if problem:
            raise ValueError(problem)
        self.service = service
        self.config = config
        self.log_ = logs.get(service.name)
        self.fault = FaultState()
        wal, records = WriteAheadLog.open(config.data_dir / service.name / "wal")
        self.wal = async_log(wal, wal_sync_mode(config))
        self.locks = LockManager(
            wait_timeout_s=config.lock_wait_ms / 1000,
            clock=time.time,
            # Read when a branch takes its first lock, after the engine exists.
            transaction_of=lambda owner: self.engine.transaction_of(owner),
        )
        self.engine = BranchEngine(
            service, self.wal, self.locks, clock_ms=now_ms, monotonic_ms=monotonic_ms
        )
        try:
            self.engine.replay(records, wal.directory)
        except BaseException:
            # The start is refused (ReplayError) before anything is appended: let go of the
            # directory, so that a process embedding the server can start again on the log
            # (with its service fixed) instead of finding it "in use" by itself.
            self.wal.abandon()
            raise
        stamp_format(self.wal, records)
        # A new log starts with a checkpoint of the initial state (stock, accounts): until the
        # first periodic one, replay started from whatever initial state this process was
        # given, so a restart with another --initial file (or another DEFAULT_CATALOG)
        # rewrote committed stock and balances, or failed to replay a prepare at all.
        # That checkpoint also makes the incarnation durable, created here with the log (or
        # for a log written before incarnations: its checkpoint did not carry one).
        self._fresh_log = not records or not self.engine.incarnation
        if not self.engine.incarnation:
            self.engine.incarnation = secrets.token_hex(8)
        crashpoints.hit("participant.during_recovery")
        self.server = grpc_edge.new_server(security.server_interceptors(config.tls))
        self.port = 0
        self._background: list[asyncio.Task[None]] = []
        # By branch: when to ask about it again, by the engine's monotonic clock (as every
        # `now` of the housekeeping below), and how many times it was asked.
        self._next_inquiry_ms: dict[tuple[str, int], tuple[int, int]] = {}
        # The INFO summary of outcomes still unknown (_summarize_unknown): when it was last
        # written (None: never), the inquiries made since, and the last reason one stayed
        # unknown.
        self._summary_at_ms: int | None = None
        self._asked_since_summary = 0
        self._last_unknown_reason = ""
        self.registered = asyncio.Event()
        # Opened at the first call that needs it (coordinator_stub), closed by stop().
        self._coordinator: tuple[grpc.aio.Channel, coordinator_pb2_grpc.CoordinatorStub] | None = (
            None
        )
        # Set when the coordinator refused the registration for good (REGISTRATION_FATAL), or
        # an inquiry because another incarnation replaced this one (`_replaced`): `failure`
        # says why; run() then stops the process with exit status 1.
        self.failed = asyncio.Event()
        self.failure = ""
        self.metrics = metrics.for_participant(
            service.name, self.engine, self.locks, self.wal, config.metrics_listen, config.tls
        )

    async def start(self) -> int:
        participant_pb2_grpc.add_ParticipantServicer_to_server(
            ParticipantServicer(self), self.server
        )
        participant_pb2_grpc.add_ParticipantAdminServicer_to_server(
            AdminServicer(self), self.server
        )
        names = [
            participant_pb2.DESCRIPTOR.services_by_name["Participant"].full_name,
            participant_pb2.DESCRIPTOR.services_by_name["ParticipantAdmin"].full_name,
            *self.service.add_read_api(self.server),
        ]
        grpc_edge.add_health_and_reflection(self.server, names)
        tls = self.config.tls
        credentials = security.server_credentials(tls) if tls is not None else None
        self.port = grpc_edge.bind(self.server, self.config.listen, credentials)
        self.metrics_port = self.metrics.start() if self.metrics is not None else 0
        if self._fresh_log:
            await self.engine.checkpoint()
            self._fresh_log = False
        await self.server.start()
        recovered = len(self.engine.in_doubt())
        self.log_.info(
            "participant serving",
            port=self.port,
            incarnation=self.engine.incarnation,
            in_doubt_recovered=recovered,
            data_dir=str(self.config.data_dir),
            security=security.describe(tls),
        )
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._housekeeping()))
        if self.config.coordinator:
            self._background.append(loop.create_task(self._register()))
        return self.port

    @property
    def advertise(self) -> str:
        if self.config.advertise:
            return self.config.advertise
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float = 1.0) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.metrics is not None:
            await self.metrics.stop()
        await self.server.stop(grace_s)
        # After the server: an operator's force or forget finishing within the grace asks
        # the coordinator on this channel.
        if self._coordinator is not None:
            await self._coordinator[0].close(None)
            self._coordinator = None
        self._log_stopping()
        await self.wal.close()

    def _log_stopping(self) -> None:
        """The last line, as the coordinator's: without it a graceful stop looked like a kill
        (the log ended on whatever came before). A branch still prepared stays locked and
        reserved in the log until a restart asks its coordinator about it: a WARNING then."""
        in_doubt = len(self.engine.in_doubt())
        forced = self.engine.forced_awaiting_count
        (self.log_.warning if in_doubt or forced else self.log_.info)(
            "participant stopping",
            incarnation=self.engine.incarnation,
            in_doubt=in_doubt,
            forced_awaiting=forced or None,
        )

    # ---- background work ----

    def _coordinator_channel(self) -> grpc.aio.Channel:
        # With TLS the server must prove it is the coordinator: registration and inquiries
        # must not go to whatever process holds the coordinator's port.
        tls = self.config.tls
        return security.channel(self.config.coordinator, tls, security.coordinator_identity(tls))

    def coordinator_stub(self) -> coordinator_pb2_grpc.CoordinatorStub | None:
        """The coordinator's stub for inquiries and reports (None: no coordinator configured),
        on one channel the housekeeping and the operator's force and forget checks share."""
        if not self.config.coordinator:
            return None
        if self._coordinator is None:
            channel = self._coordinator_channel()
            self._coordinator = (channel, coordinator_pb2_grpc.CoordinatorStub(channel))
        return self._coordinator[1]

    def capabilities(self) -> coordinator_pb2.Capabilities:
        """What this participant registers as able to do (and `dtm` is told it can)."""
        return coordinator_pb2.Capabilities(
            one_phase=True,
            batch=self.config.batch,
            operation_types=[self.service.operation_type.DESCRIPTOR.full_name],
        )

    async def _register(self) -> None:
        """Register with the coordinator, retrying (capped backoff) until it answers; a refusal
        no retry can change (REGISTRATION_FATAL) sets `failed` instead."""
        request = coordinator_pb2.RegisterParticipantRequest(
            name=self.service.name,
            address=self.advertise,
            incarnation=self.engine.incarnation,
            replace=self.config.replace_registration,
            capabilities=self.capabilities(),
        )
        if request.replace:
            self.log_.warning(
                f"{limits.REPLACE_REGISTRATION_FLAG}: registering as a replacement; if the "
                "coordinator owes another incarnation of this participant decisions, this one "
                "takes them, and each owed Commit becomes a heuristic hazard",
                incarnation=self.engine.incarnation,
            )
        attempt = 0
        async with self._coordinator_channel() as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while True:
                attempt += 1
                try:
                    await stub.RegisterParticipant(request, timeout=2.0)
                except grpc.aio.AioRpcError as error:
                    if error.code() in REGISTRATION_FATAL:
                        self.failure = (
                            f"the coordinator at {self.config.coordinator} refused to register "
                            f"participant {self.service.name!r}: {error.code().name}: "
                            f"{error.details()}"
                        )
                        self.log_.error(
                            "registration refused; stopping",
                            coordinator=self.config.coordinator,
                            code=error.code().name,
                            detail=error.details(),
                        )
                        self.failed.set()
                        return
                    # RESOURCE_EXHAUSTED (the registry is full) included: a slot may free up.
                    # A failed TLS handshake is retried too (the coordinator may be restarted
                    # with the right files), but says what to fix: it reads as "unreachable".
                    # Retried every second for as long as it fails: a WARNING each time
                    # flooded the log of a long outage, so attempts 1, 2, 4, 8... warn.
                    log = self.log_.warning if logs.retry_warns(attempt) else self.log_.debug
                    log(
                        "registration failed; retrying",
                        coordinator=self.config.coordinator,
                        attempt=attempt,
                        code=error.code().name,
                        detail=error.details(),
                        hint=tls_hint(error.details() or "", self.config.tls is not None)
                        or not_a_coordinator_hint(error.code(), self.config.coordinator),
                    )
                    await asyncio.sleep(registration_delay_s(attempt))
                    continue
                self.log_.info(
                    "registered", coordinator=self.config.coordinator, address=self.advertise
                )
                self.registered.set()
                return

    async def _housekeeping(self) -> None:
        """Leases on unvoted branches, inquiries for in-doubt ones, and checkpoints."""
        stub = self.coordinator_stub()
        while True:  # until stop() cancels it
            await asyncio.sleep(self.config.tick_ms / 1000)
            try:
                await self._housekeeping_tick(stub)
            except Exception as error:  # a bug: say so loudly, and keep the loop alive
                # A housekeeping loop that dies takes leases, inquiries and checkpoints
                # with it, and nothing else would notice (a checkpoint bug did just that).
                self.log_.error(
                    "housekeeping failed; it goes on at the next tick",
                    error=f"{type(error).__name__}: {error}",
                    exc_info=error,
                )

    async def _housekeeping_tick(self, stub: coordinator_pb2_grpc.CoordinatorStub | None) -> None:
        # Intervals, so the monotonic clock: by the wall clock, a step back of an hour held an
        # unvoted branch (and an in-doubt one, not asked about) and its locks an hour.
        now = self.engine.monotonic_ms()
        for info in self.engine.preparing():
            if now - info.updated_monotonic_ms >= self.config.lease_unvoted_ms:
                self.log_.warning(
                    "lease expired before the vote: branch aborted, locks reclaimed",
                    txn=info.branch.transaction_id,
                    branch=info.branch.index,
                )
                self.engine.expire_lease(info.branch.key)
        if stub is not None:
            await self._ask_about_in_doubt(stub, now)
        if self.engine.records_since_checkpoint >= self.config.checkpoint_every_records:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        try:
            await self.engine.checkpoint()
        except Exception as error:  # leases and inquiries must go on regardless
            # Nothing is lost: the log keeps every record since the last checkpoint, it only
            # grows. A failed fsync never reaches here (the process stops); this is anything
            # else, a bug included, so it is retried only after as many records again.
            self.engine.records_since_checkpoint = 0
            self.log_.error(
                "checkpoint failed; the log grows until one succeeds",
                error=f"{type(error).__name__}: {error}",
                retry_after_records=self.config.checkpoint_every_records,
            )
            return
        # Built on the event loop (a stall of every call: dtm_checkpoint_building_seconds),
        # then written and fsynced on the log's thread with wal_sync = "loop".
        self.log_.info(
            "checkpoint written",
            in_doubt=len(self.engine.in_doubt()),
            ms=self.engine.checkpoints.last_ms,
        )

    async def _ask_about_in_doubt(
        self, stub: coordinator_pb2_grpc.CoordinatorStub, now: int
    ) -> None:
        """Ask the coordinator about every in-doubt branch, and every forced branch still
        awaiting its coordinator, due for it: `in_doubt_after_ms` after its prepare (after
        its forcing), then with a backoff while the answer stays unknown. A forced branch is
        asked too because a coordinator that has no record of its transaction (presumed
        abort) never sends a decision: without asking, a forced commit that contradicts it
        would never be reported (`_reconcile_forced`). `now` is the engine's monotonic clock's."""
        if self.failed.is_set():  # stopping: replaced, or refused for good; ask nothing more
            return
        engine = self.engine
        # Forget the backoff of branches decided meanwhile (by a Commit or Rollback), and of
        # forced ones no longer awaiting (decided by their coordinator, or forgotten).
        for key in [
            k
            for k in self._next_inquiry_ms
            if k not in engine.open and not engine.awaiting_coordinator(k)
        ]:
            del self._next_inquiry_ms[key]
        after = self.config.in_doubt_after_ms
        due = [
            info.branch.key
            for info in engine.in_doubt()
            if now - info.prepared_monotonic_ms >= after
            and self._next_inquiry_ms.get(info.branch.key, (0, 0))[0] <= now
        ][: limits.INQUIRIES_PER_TICK_MAX]
        if len(due) < limits.INQUIRIES_PER_TICK_MAX:
            due += [
                key
                for key, forced_at_ms in engine.forced_awaiting()
                if now - forced_at_ms >= after and self._next_inquiry_ms.get(key, (0, 0))[0] <= now
            ][: limits.INQUIRIES_PER_TICK_MAX - len(due)]
        if not due:
            return
        # Concurrently: with the coordinator down, one-by-one timeouts would stall this loop
        # (and the leases it also enforces) for minutes.
        await asyncio.gather(*(self._ask(stub, key, now) for key in due))
        self._asked_since_summary += len(due)
        self._summarize_unknown(now)

    def _summarize_unknown(self, now: int) -> None:
        """One INFO line for the branches whose outcome is still unknown, at most once per
        `inquiry_backoff_ms_max` (the longest a branch waits between two inquiries, so about
        one line per round of them), instead of one per branch per attempt (a coordinator
        down with 30 branches in doubt wrote 250 lines in 20 s). The per-branch lines are
        DEBUG."""
        unknown = self._next_inquiry_ms
        last = self._summary_at_ms
        if not unknown or (last is not None and now - last < self.config.inquiry_backoff_ms_max):
            return
        oldest = next(iter(unknown))  # the first still unknown: kept in its place since
        in_doubt = sum(1 for key in unknown if key in self.engine.open)
        self.log_.info(
            "outcome of branches still unknown: will ask the coordinator again",
            txn=oldest[0],  # the oldest's, so that grep txn= finds the line
            branch=oldest[1],
            attempts=unknown[oldest][1],
            in_doubt=in_doubt,
            forced=len(unknown) - in_doubt,
            asked=self._asked_since_summary,
            reason=self._last_unknown_reason,
        )
        self._summary_at_ms = now
        self._asked_since_summary = 0

    def _inquiry(self, key: tuple[str, int]) -> coordinator_pb2.QueryOutcomeRequest:
        """The question about branch `key`'s outcome, as this participant asks it."""
        info = self.engine.open.get(key)
        if info is None and self.engine.awaiting_coordinator(key):
            info = self.engine.branch(key)  # forced, awaiting its coordinator
        return coordinator_pb2.QueryOutcomeRequest(
            transaction_id=key[0],
            participant=self.service.name,
            # So that a replaced process that still runs learns nothing.
            incarnation=self.engine.incarnation,
            # So that a branch of an attempt that reused the id is not answered with the
            # outcome of the transaction the id belongs to.
            transaction_fingerprint=info.fingerprint if info is not None else b"",
        )

    async def ask_outcome(self, key: tuple[str, int]) -> CoordinatorAnswer:
        """Ask the coordinator, once and now, for branch `key`'s outcome (in doubt, or forced
        and awaiting its coordinator), changing nothing here: what an operator's force, and
        a forget with coordinator_lost, are checked against."""
        stub = self.coordinator_stub()
        if stub is None:
            return CoordinatorAnswer(None, "no coordinator is configured", unreachable=True)
        try:
            answer = await stub.QueryOutcome(
                self._inquiry(key), timeout=limits.FORCE_CHECK_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            hint = tls_hint(details, self.config.tls is not None)
            # A failed TLS handshake reads as UNAVAILABLE too, but that coordinator answers
            # (with other TLS settings): not a reason to go on unchecked.
            unreachable = hint is None and error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            problem = f"{error.code().name}: {details}" + (f" ({hint})" if hint else "")
            return CoordinatorAnswer(None, problem, unreachable)
        return CoordinatorAnswer(answer.outcome, presumed_abort=answer.presumed_abort)

    async def settle_forced(
        self, key: tuple[str, int], coordinator_lost: bool = False
    ) -> Unsettled | None:
        """Ask the coordinator now about forced branch `key`, as the next inquiry would (a
        contradiction is reported to it: `_reconcile_forced`), before an operator forgets it.
        None once the branch may go: it no longer awaits its coordinator, or, with
        `coordinator_lost` (the operator's word that the coordinator lost its log), the
        coordinator gave no answer that a lost log could not give: it cannot be reached, or
        it presumes abort for want of any record of the branch's attempt (that "no record"
        decides nothing then, so nothing is reported against it). An answer from a record is
        heard as without the override: that coordinator did not lose its log, and the
        branch is how it hears of a contradiction. Else why the branch still awaits."""
        stub = self.coordinator_stub()
        if coordinator_lost:
            # The force check's question (as patient, and telling the two aborts apart): a
            # busy coordinator is not a lost one.
            answer = await self.ask_outcome(key)
            if answer.unreachable or answer.presumed_abort:
                return None
            if answer.outcome is None:
                return Unsettled(answer.problem)
            assert stub is not None  # it answered: one is configured
            await self._heard(stub, key, answer.outcome, self.engine.monotonic_ms())
        elif stub is None:
            return Unsettled("no coordinator is configured, so none can be asked")
        else:
            await self._ask(stub, key, self.engine.monotonic_ms())
        if not self.engine.awaiting_coordinator(key):
            return None
        # Set by the _back_off that left the branch awaiting: nothing awaits between it and
        # here, so no other inquiry's reason replaced it.
        return Unsettled(self._last_unknown_reason, on_record=coordinator_lost)

    async def _ask(
        self, stub: coordinator_pb2_grpc.CoordinatorStub, key: tuple[str, int], now: int
    ) -> None:
        try:
            answer = await stub.QueryOutcome(self._inquiry(key), timeout=INQUIRY_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            replacement = _replacement(error)
            if replacement is not None:
                self._replaced(replacement, error.details() or "")
            # The branch stays in doubt either way: a refusal is no outcome to guess from.
            self._back_off(key, now, f"{error.code().name}: {error.details()}")
            return
        await self._heard(stub, key, answer.outcome, now)

    async def _heard(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        key: tuple[str, int],
        outcome: int,
        now: int,
    ) -> None:
        """The coordinator answered `outcome` about branch `key`: an in-doubt branch learns
        it, a forced one is reconciled with it; undecided, the branch is asked again later."""
        if outcome not in (coordinator_pb2.OUTCOME_COMMITTED, coordinator_pb2.OUTCOME_ABORTED):
            self._back_off(key, now, "coordinator: still undecided")
            return
        commit = outcome == coordinator_pb2.OUTCOME_COMMITTED
        if key not in self.engine.open and self.engine.awaiting_coordinator(key):
            await self._reconcile_forced(stub, key, commit, now)
            return
        self._next_inquiry_ms.pop(key, None)
        name = coordinator_pb2.Outcome.Name(outcome)
        resolved = self.engine.learn_outcome(key, commit=commit)
        if resolved:
            self.log_.info(
                "in-doubt branch resolved by inquiry", txn=key[0], branch=key[1], outcome=name
            )
        else:  # its Commit or Rollback came while the inquiry was in flight
            self.log_.debug(
                "inquiry answered; the branch was decided meanwhile",
                txn=key[0],
                branch=key[1],
                outcome=name,
            )

    def _replaced(self, registered_incarnation: str, detail: str) -> None:
        """The coordinator refused an inquiry: another incarnation holds this name. Once this
        process's own registration was accepted, that can only be a later registration that
        replaced it (--replace-registration, or a second process while nothing was owed), so
        it stops, as on a registration refused for good: it will never hear a decision again,
        its locks would only block its data, and serving on would hide the misuse. Its prepared
        branches stay in doubt in its log, never guessed. Before its registration is answered
        (a restart on its own log while another incarnation is registered), that registration
        decides: refused, the process stops there; accepted, the next inquiry is answered."""
        if not self.registered.is_set() or self.failed.is_set():  # the latter: log it once
            return
        self.failure = (  # worded as the registration's refusal for good
            f"the coordinator at {self.config.coordinator} refused the inquiries of participant "
            f"{self.service.name!r} incarnation {self.engine.incarnation!r}: "
            f"FAILED_PRECONDITION: {detail}"
        )
        self.log_.error(
            "replaced by another incarnation: the coordinator refuses to tell this one any "
            "outcome; stopping, with branches in doubt",
            incarnation=self.engine.incarnation,
            registered_incarnation=registered_incarnation[:80],
            in_doubt=len(self.engine.in_doubt()),
            coordinator=self.config.coordinator,
            detail=detail,
        )
        self.failed.set()

    async def _reconcile_forced(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        key: tuple[str, int],
        commit: bool,
        now: int,
    ) -> None:
        """The coordinator's outcome for a forced branch: it stops awaiting, as when its
        decision arrives; a contradiction is a heuristic outcome, and said so (rule 17). The
        coordinator has not heard of it (its Commit or Rollback would have reconciled the
        branch), so it is first reported to it (`_report`), and the branch awaits until the
        coordinator has recorded it: reported again after a failure, and after a restart. The
        engine logs the reconciliation (BranchReconciled, lazily, but forced once reported:
        see `BranchEngine.reconcile_forced`), so that this line, the count and the report
        are not repeated after a restart."""
        info = self.engine.branch(key)
        if info is None or not self.engine.awaiting_coordinator(key):
            return  # decided by its coordinator, or forgotten, meanwhile
        forced_commit = info.branch.state is BranchState.COMMITTED
        reported = False
        if forced_commit != commit:
            acknowledged = await self._report(stub, key, info, commit, now)
            if acknowledged is None:  # asked and reported again after a backoff
                return
            reported = acknowledged
        self._next_inquiry_ms.pop(key, None)
        info = self.engine.reconcile_forced(key, commit, reported=reported)
        if info is None:  # decided by its coordinator, or forgotten, while reporting
            return
        forced = info.branch.state.value  # committed or rolled_back
        decided = "committed" if commit else "aborted"
        if forced_commit == commit:
            self.log_.info(
                "forced branch reconciled: its coordinator's outcome is the same",
                txn=key[0],
                branch=key[1],
                forced=forced,
                decided=decided,
            )
            return
        if reported:
            await self.engine.wait_durable([key])  # reported once: not again after a restart
        self.log_.warning(
            "forced branch contradicts its coordinator's outcome: a heuristic outcome, "
            "to be reconciled by hand"
            + (
                " (recorded by the coordinator: dtm heuristics)"
                if reported
                else " (the coordinator takes no reports: only this line and "
                "dtm_forced_outcomes_total show it)"
            ),
            txn=key[0],
            branch=key[1],
            forced=forced,
            decided=decided,
            heuristic=info.branch.heuristic,
        )

    async def _report(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        key: tuple[str, int],
        info: BranchInfo,
        commit: bool,
        now: int,
    ) -> bool | None:
        """Report to the coordinator that a forced branch contradicts its outcome (`commit`),
        which it answered to an inquiry: it records it (ReportHeuristic), since neither a
        Commit nor a Rollback of its own reached the branch. True once it has recorded it;
        False when it cannot take reports (a coordinator from before the call); None when
        it did not answer, or refused, for now: backed off, so asked and reported again."""
        forced_commit = info.branch.state is BranchState.COMMITTED
        decision = coordinator_pb2.OUTCOME_COMMITTED if commit else coordinator_pb2.OUTCOME_ABORTED
        request = coordinator_pb2.ReportHeuristicRequest(
            transaction_id=key[0],
            branch=key[1],
            participant=self.service.name,
            incarnation=self.engine.incarnation,
            transaction_fingerprint=info.fingerprint,
            forced=coordinator_pb2.OUTCOME_COMMITTED
            if forced_commit
            else coordinator_pb2.OUTCOME_ABORTED,
            decision=decision,
            detail=(
                f"{info.branch.heuristic}, forced by an operator here; the coordinator "
                f"answered {coordinator_pb2.Outcome.Name(decision)} to an inquiry"
            ),
        )
        try:
            await stub.ReportHeuristic(request, timeout=INQUIRY_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                return False
            replacement = _replacement(error)
            if replacement is not None:
                self._replaced(replacement, error.details() or "")
            self._back_off(key, now, f"report: {error.code().name}: {error.details()}")
            return None
        return True

    def _back_off(self, key: tuple[str, int], now: int, reason: str) -> None:
        _, attempts = self._next_inquiry_ms.get(key, (0, 0))
        delay = min(self.config.inquiry_backoff_ms_max, 100 * 2 ** min(attempts, 10))
        delay = int(delay * random.uniform(0.5, 1.0))  # jitter: no synchronized storms
        self._next_inquiry_ms[key] = (now + delay, attempts + 1)
        self._last_unknown_reason = reason
        self.log_.debug(
            "branch outcome unknown, will ask again",
            txn=key[0],
            branch=key[1],
            attempt=attempts + 1,
            forced=key not in self.engine.open,
            reason=reason,
        )
