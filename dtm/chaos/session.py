"""The session: one cluster reused across runs, and every kind of run on it (a matrix cell,
random SIGKILLs under load, the late-retry wave, the fault soak).

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

from dtm import config, crashpoints, invariants, wal
from dtm.chaos.checks import (
    FINISHED_STATES,
    LATE_RERUN,
    abort_records,
    branches_of,
    check_after_late_retries,
    check_branch_outcomes,
    check_branches_kept,
    check_client_outcomes,
    check_late_retry,
    check_ledger,
    check_participant_modes,
    check_retry,
    learned_outcome,
    orders_by_id,
    read_batching,
    read_branch_states,
    read_heuristics,
    remembered_transactions,
    set_fault,
)
from dtm.chaos.matrix import (
    Cell,
    crash_count,
    run_modes,
    unary_services,
)
from dtm.chaos.orders import (
    ClientRecord,
    batch_in_flight_of,
    make_order,
    record_of,
)
from dtm.chaos.result import (
    RunResult,
)
from dtm.chaos.settings import (
    ABORTED,
    BURST_SPREAD_S,
    BURSTS_MAX,
    CHECKPOINT_EVERY_RECORDS,
    CLIENT_ERROR_PAUSE_S,
    CLUSTER_ORDERS_MAX,
    COMMITTED,
    CRASH_EXIT_STATUS,
    CRASH_GRACE_S,
    IN_DOUBT_AFTER_MS,
    INITIAL,
    INITIAL_STATE,
    LATE,
    LATE_DRAIN_S,
    LATE_FAULT_GAP_S,
    LATE_FAULT_S,
    LATE_FAULT_WEIGHTS,
    LATE_FAULTS,
    LATE_FINISHED_KEPT,
    LATE_LOAD_S,
    LATE_NEMESIS_S,
    LATE_PUSH_ROUNDS_MAX,
    LATE_RETRY_ATTEMPTS,
    LATE_RETRY_BACKOFF_S,
    LATE_VICTIM_WEIGHTS,
    LATE_WAVE_SPREAD_S,
    LOAD_CLIENTS,
    LOAD_S,
    LOG_TAIL_LINES,
    NEMESIS_DOWNTIME_S,
    NEMESIS_INTERVAL_S,
    NEMESIS_WEIGHTS,
    ORDER_KIND_WEIGHTS,
    ORDERS_PER_BURST,
    ORDERS_PER_CLIENT_MAX,
    PREPARE_TIMEOUT_MS,
    RECOVERY_CRASH_TIMEOUT_S,
    RETRY_ATTEMPTS,
    RETRY_SPACING_S,
    RUN_TIMEOUT_S,
    SETTLE_POLL_S,
    SETTLE_TIMEOUT_S,
    SOAK,
    SOAK_CLIENTS,
    SOAK_FAULT_EVERY_S,
    SUBMIT_TIMEOUT_S,
    TRANSACTION_TIMEOUT_MS,
    UNARY_FLAG,
)
from dtm.cluster import (
    COORDINATOR,
    PROCESSES,
    SERVICES,
    Cluster,
    ClusterError,
    Ports,
    PortTakenError,
)
from dtm.orderflow import OrderClient, SubmitResult
from dtmpb.v1 import coordinator_pb2, participant_pb2


def participant_args(unary: bool) -> list[str]:
    """A service's arguments in a chaos cluster, at every start of it; with UNARY_FLAG when it
    serves unary calls."""
    args = ["--in-doubt-after-ms", str(IN_DOUBT_AFTER_MS)]
    args += ["--checkpoint-every-records", str(CHECKPOINT_EVERY_RECORDS)]
    return [*args, UNARY_FLAG] if unary else args


def served_unary(cluster: Cluster) -> frozenset[str]:
    """The services of `cluster` that every start of them makes serve unary calls."""
    return frozenset(name for name in SERVICES if UNARY_FLAG in cluster.extra_args.get(name, ()))


class Session:
    """Runs one after another against one cluster, replaced only when it must be."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.soak_s = 0.0  # the fault soak's length (`--soak`)
        self.cluster: Cluster | None = None
        #: Whether `cluster` is the late-retry runs' (its coordinator's memory is small).
        self.cluster_late = False
        self.clusters_started = 0
        #: Order id -> must be CONFIRMED; every order whose outcome is known, for this cluster.
        self.ledger: dict[str, bool] = {}
        #: Heuristic outcomes already reported as violations, for this cluster.
        self.heuristics_reported: set[str] = set()
        self.orders_on_cluster = 0

    # ---- the cluster ----

    def _new_cluster(self, late: bool = False, unary: frozenset[str] = frozenset()) -> Cluster:
        self.clusters_started += 1
        checkpoints = ["--checkpoint-every-records", str(CHECKPOINT_EVERY_RECORDS)]
        coordinator_args = list(checkpoints)
        if late:
            # Every start of it, restarts included: its checkpoints keep the same window.
            coordinator_args += ["--finished-kept", str(LATE_FINISHED_KEPT)]
        return Cluster(
            self.root / f"cluster-{self.clusters_started}",
            Ports.free(),
            initial=INITIAL,
            test_control=True,
            prepare_timeout_ms=PREPARE_TIMEOUT_MS,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            extra_args={
                COORDINATOR: coordinator_args,
                **{name: participant_args(name in unary) for name in SERVICES},
            },
        )

    async def ensure_cluster(
        self, late: bool = False, unary: frozenset[str] | None = None
    ) -> Cluster:
        """The cluster for a run: the late-retry runs have their own (see _new_cluster). Its
        services in `unary` serve unary calls (`unary_services`), the others batch; None:
        as they are (a new cluster's batch)."""
        if self.cluster is not None and self.orders_on_cluster >= CLUSTER_ORDERS_MAX:
            await self.drop_cluster()
        if self.cluster is not None and self.cluster_late != late:
            await self.drop_cluster()
        if self.cluster is not None and unary is not None:
            await self.switch_participants(self.cluster, unary)
        if self.cluster is None:
            cluster = self._new_cluster(late, unary or frozenset())
            await asyncio.to_thread(cluster.start)
            self.cluster = cluster
            self.cluster_late = late
            self.ledger = {}
            self.heuristics_reported = set()
            self.orders_on_cluster = 0
        return self.cluster

    async def switch_participants(self, cluster: Cluster, unary: frozenset[str]) -> None:
        """Restart the services that do not serve as `unary` says with the flag that makes
        them (the next run's mode; between runs, so nothing is in flight), and wait until
        they registered again: with their capabilities, which the coordinator's port for
        each follows."""
        changing = [name for name in SERVICES if (name in unary) != (name in served_unary(cluster))]
        if not changing:
            return
        for name in changing:
            cluster.extra_args[name] = participant_args(name in unary)

        def restart() -> None:
            for name in changing:
                cluster.terminate(name)
            cluster.start()

        await asyncio.to_thread(restart)

    async def drop_cluster(self) -> None:
        """Stop the cluster; the next run starts a fresh one (after a violation, or when it
        has grown big)."""
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await asyncio.to_thread(cluster.stop, 2.0)

    async def close(self) -> None:
        await self.drop_cluster()

    # ---- the pieces of a run ----

    def _next_order_id(self, result: RunResult, number: int) -> str:
        return f"r{result.index}-s{result.seed}-{number}"

    async def burst(
        self, cluster: Cluster, result: RunResult, rng: random.Random, first: int
    ) -> list[ClientRecord]:
        """ORDERS_PER_BURST seeded orders, started at seeded offsets, all concurrent."""
        planned = []
        for number in range(first, first + ORDERS_PER_BURST):
            order_id = self._next_order_id(result, number)
            request, amount, _ = make_order(rng, order_id)
            planned.append((rng.uniform(0.0, BURST_SPREAD_S), order_id, request, amount))
        self.orders_on_cluster += len(planned)
        async with OrderClient(
            cluster.coordinator_address, batch_in_flight=batch_in_flight_of(result.seed)
        ) as client:

            async def one(
                delay: float, order_id: str, request: coordinator_pb2.SubmitRequest, amount: int
            ) -> ClientRecord:
                await asyncio.sleep(delay)
                answer = await client.submit(request, timeout_s=SUBMIT_TIMEOUT_S)
                return record_of(order_id, request, amount, answer)

            return list(await asyncio.gather(*(one(*plan) for plan in planned)))

    def _unexpected_exits(self, cluster: Cluster, expected: Iterable[str]) -> list[str]:
        """Processes that died on their own although nothing was meant to kill them."""
        violations: list[str] = []
        allowed = set(expected)
        for name in PROCESSES:
            if name in allowed or cluster.running(name):
                continue
            code = cluster.exit_code(name)
            violations.append(f"{name} exited on its own with status {code} (not a crash point)")
        return violations

    async def heal(self, cluster: Cluster) -> None:
        """Start every process that is not running; wait until all are ready."""
        await asyncio.to_thread(cluster.start)

    async def nemesis_kill(self, cluster: Cluster, result: RunResult, victim: str) -> bool:
        """SIGKILL `victim` on the nemesis's behalf; True if it was running and is now killed.

        A process already down at this point died on its own: it is reported (and started
        again) first, so that the kill neither hides its death nor is counted for it. Only a
        kill that found the victim running (`Cluster.kill` returned its pid) is counted; if the
        victim died on its own in between, the caller must not exempt it from
        `_unexpected_exits`."""
        found = self._unexpected_exits(cluster, ())
        if found:
            result.violations += found
            await self.heal(cluster)
        pid = await asyncio.to_thread(cluster.kill, victim)
        if pid is None:
            return False
        result.kills[victim] += 1
        return True

    async def settle(self, cluster: Cluster, result: RunResult) -> invariants.Snapshot | None:
        try:
            return await invariants.wait_until_settled(
                cluster.service_addresses, timeout_s=SETTLE_TIMEOUT_S, poll_s=SETTLE_POLL_S
            )
        except TimeoutError as error:
            result.violations.append(f"did not settle: {error}")
        except Exception as error:  # an unreadable service is a failed run, with its reason
            result.violations.append(f"could not read the services: {error!r}")
        return None

    async def settle_and_report(
        self, cluster: Cluster, result: RunResult, when: str
    ) -> invariants.Snapshot | None:
        """Settle again after more orders ran (`when`: "after the retries"...) and hold the
        state to the invariants, each violation named with `when`; None if it never settled."""
        snapshot = await self.settle(cluster, result)
        result.mark(f"settle {when}")
        if snapshot is not None:
            result.violations += [
                f"{when}: {v}"
                for v in invariants.report(snapshot, initial=INITIAL_STATE).violations
            ]
        return snapshot

    async def retry_all(
        self, cluster: Cluster, records: Sequence[ClientRecord]
    ) -> list[SubmitResult]:
        """Submit each record's request again, with the same transaction id, concurrently."""

        async def retry(client: OrderClient, record: ClientRecord) -> SubmitResult:
            assert record.request is not None
            return await client.submit_until_known(
                record.request,
                attempts=RETRY_ATTEMPTS,
                timeout_s=SUBMIT_TIMEOUT_S,
                backoff_s=(RETRY_SPACING_S, RETRY_SPACING_S),
            )

        if not records:
            return []
        async with OrderClient(cluster.coordinator_address) as client:
            return list(await asyncio.gather(*(retry(client, record) for record in records)))

    async def check(self, cluster: Cluster, result: RunResult) -> None:
        """Settle, check everything, retry the unknown outcomes, settle and check again."""
        snapshot = await self.settle(cluster, result)
        result.mark("settle")
        if snapshot is None:
            return
        result.violations += invariants.report(snapshot, initial=INITIAL_STATE).violations
        result.violations += check_client_outcomes(result.records, snapshot)
        for record in result.records:
            if record.known:
                self.ledger[record.order_id] = record.outcome == COMMITTED
        unknown = [record for record in result.records if not record.known]
        answers = await self.retry_all(cluster, unknown)
        result.mark("retry")
        before = orders_by_id(snapshot)
        for record, answer in zip(unknown, answers, strict=True):
            record.retry_outcome = answer.outcome
            found, confirmed = check_retry(record, answer, before)
            result.violations += found
            if confirmed is not None:
                self.ledger[record.order_id] = confirmed
        if unknown:
            # A retry may have run a transaction that never ran before: let it settle too, and
            # see that nothing was applied twice.
            snapshot = await self.settle_and_report(cluster, result, "after the retries")
            if snapshot is None:
                return
        result.violations += check_ledger(self.ledger, snapshot)
        try:
            states = await read_branch_states(cluster)
            result.violations += check_participant_modes(result.unary, await read_batching(cluster))
            # The coordinator keeps a heuristic until an operator forgets it: report it once,
            # in the run that made it, not in every later run on this cluster.
            heuristics = await read_heuristics(cluster)
            result.violations += [h for h in heuristics if h not in self.heuristics_reported]
            self.heuristics_reported.update(heuristics)
        except grpc.aio.AioRpcError as error:
            result.violations.append(f"could not list the branches: {error.code().name}")
            return
        result.violations += check_branch_outcomes(
            (record.transaction_id for record in result.records), states
        )

    async def arm(self, cluster: Cluster, target: str, env: Mapping[str, str]) -> int | None:
        """Restart `target` with `env`; None once it is ready, or its exit status if it died
        while starting (a point reached during start-up)."""
        await asyncio.to_thread(lambda: cluster.restart(target, kill=True, env=env, wait=False))
        try:
            await asyncio.to_thread(cluster.wait_ready, cluster.start_timeout_s)
        except ClusterError:
            code = cluster.exit_code(target)
            if code is None:
                raise
            return code
        return None

    # ---- the two kinds of runs ----

    async def matrix_run(self, index: int, cell: Cell, seed: int) -> RunResult:
        result = RunResult(index=index, kind="matrix", seed=seed, cell=cell)
        result.unary = unary_services(cell, seed)
        rng = random.Random(f"chaos:{cell}:{seed}")
        cluster = await self.ensure_cluster(unary=result.unary)
        result.mark("cluster")
        target = cell.component
        # Estimate the burst's mix to choose a count it is likely to reach.
        ok = round(ORDERS_PER_BURST * ORDER_KIND_WEIGHTS[0] / sum(ORDER_KIND_WEIGHTS))
        count = crash_count(cell.point, ok, ORDERS_PER_BURST - ok, rng)
        result.crash_at = f"{cell.point}@{count}"
        armed = {crashpoints.ENVIRONMENT_VARIABLE: result.crash_at}
        result.loses_unsynced, thread = run_modes(cell, seed)
        if result.loses_unsynced:
            armed[wal.LOSE_UNSYNCED_VARIABLE] = "1"
        if thread:
            # Half of those with the other group commit, whose fsync runs on its own thread
            # while the loop goes on: what a reply sent too early needs to escape before the
            # power goes (with "loop", the fsync holds the loop that would send it).
            section = "coordinator" if target == COORDINATOR else "participant"
            armed[config.environment_variable(section, "wal_sync")] = "thread"
            result.wal_sync = "thread"
        elif target in result.unary:
            result.wal_sync = "thread"  # "auto" of a participant that serves unary calls
        if cell.during_recovery:
            # Something to recover: SIGKILL the target mid-burst, then restart it armed.
            kill_after = rng.uniform(0.0, BURST_SPREAD_S + 0.1)

            async def kill_later() -> None:
                await asyncio.sleep(kill_after)
                if not await self.nemesis_kill(cluster, result, target):
                    # It died on its own after the check: say so before restarting it armed.
                    others = [name for name in PROCESSES if name != target]
                    result.violations += self._unexpected_exits(cluster, others)

            killer = asyncio.create_task(kill_later())
            result.records += await self.burst(cluster, result, rng, 0)
            await killer
            await asyncio.to_thread(
                lambda: cluster.restart(target, kill=True, env=armed, wait=False)
            )
            code = await asyncio.to_thread(cluster.wait_exit, target, RECOVERY_CRASH_TIMEOUT_S)
        else:
            code = await self.arm(cluster, target, armed)
            result.mark("arm")
            for number in range(BURSTS_MAX if code is None else 0):
                result.records += await self.burst(cluster, result, rng, number * ORDERS_PER_BURST)
                code = await asyncio.to_thread(cluster.wait_exit, target, CRASH_GRACE_S)
                if code is not None:
                    break
        if code not in (None, CRASH_EXIT_STATUS):
            # Restarted on its port, which another program may have taken while it was down.
            taken = cluster.port_taken(target)
            if taken is not None:
                raise taken
        if code is None:
            result.target = "not reached"
            await asyncio.to_thread(cluster.kill, target)  # still armed: restart it plainly
        elif code == CRASH_EXIT_STATUS:
            result.target = "crashed"
        else:
            result.target = f"exit {code}"
            result.violations.append(
                f"{target} exited with status {code}, not {CRASH_EXIT_STATUS} (a crash point)"
            )
        result.mark("burst and crash")
        result.violations += self._unexpected_exits(cluster, [target])
        await self.heal(cluster)
        result.mark("heal")
        await self.check(cluster, result)
        return result

    async def kill_run(self, index: int, seed: int) -> RunResult:
        result = RunResult(index=index, kind="kill", seed=seed, unary=unary_services(None, seed))
        cluster = await self.ensure_cluster(unary=result.unary)
        await self.load_under_kills(cluster, result, f"chaos:kill:{seed}")
        await self.check(cluster, result)
        return result

    async def soak_run(self, index: int, seed: int, seconds: float) -> RunResult:
        result = RunResult(index=index, kind=SOAK, seed=seed, soak_s=seconds)
        cluster = await self.ensure_cluster(unary=result.unary)  # batched
        await self.load_under_kills(
            cluster,
            result,
            f"chaos:soak:{seed}",
            seconds,
            every_s=(SOAK_FAULT_EVERY_S, SOAK_FAULT_EVERY_S),
            clients=SOAK_CLIENTS,
            orders_max=1_000_000,  # bounded by `seconds`
        )
        await self.check(cluster, result)
        return result

    async def load_under_kills(
        self,
        cluster: Cluster,
        result: RunResult,
        name: str,
        load_s: float = LOAD_S,
        *,
        every_s: tuple[float, float] = NEMESIS_INTERVAL_S,
        clients: int = LOAD_CLIENTS,
        orders_max: int = ORDERS_PER_CLIENT_MAX,
    ) -> None:
        """LOAD_CLIENTS clients submit orders back to back for `load_s` while a nemesis
        SIGKILLs processes at random and restarts them; then every process is healed. `name`
        seeds it all (each client too)."""
        rng = random.Random(name)
        seed = result.seed
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        # Batching (odd seeds): every client's orders travel in one shared client's calls.
        # Unused otherwise, it costs nothing: a gRPC channel connects at its first call.
        batching = batch_in_flight_of(seed)
        shared = OrderClient(cluster.coordinator_address, batch_in_flight=batching)

        async def client(number: int) -> None:
            client_rng = random.Random(f"{name}:client:{number}")
            async with contextlib.AsyncExitStack() as stack:
                # Not batching: a client (and a channel) of its own, as before.
                orders = shared
                if not batching:
                    orders = await stack.enter_async_context(
                        OrderClient(cluster.coordinator_address)
                    )
                for count in range(orders_max):
                    if stop.is_set():
                        return
                    order_id = self._next_order_id(result, number * orders_max + count)
                    request, amount, _ = make_order(client_rng, order_id)
                    self.orders_on_cluster += 1
                    sent = time.perf_counter()
                    answer = await orders.submit(request, timeout_s=SUBMIT_TIMEOUT_S)
                    result.latencies_ms.append((time.perf_counter() - sent) * 1000)
                    record = record_of(order_id, request, amount, answer)
                    result.records.append(record)
                    if record.outcome != COMMITTED:
                        # A process may be down: back off a little rather than fail fast in
                        # a tight loop.
                        await asyncio.sleep(CLIENT_ERROR_PAUSE_S)

        async def nemesis() -> None:
            deadline = loop.time() + load_s
            try:
                while True:
                    await asyncio.sleep(rng.uniform(*every_s))
                    if loop.time() >= deadline:
                        return
                    victim = rng.choices(PROCESSES, NEMESIS_WEIGHTS)[0]
                    killed = await self.nemesis_kill(cluster, result, victim)
                    await asyncio.sleep(rng.uniform(*NEMESIS_DOWNTIME_S))
                    # Anything else down now died by itself (the victim too, if the kill
                    # found it gone): say so before restarting it.
                    result.violations += self._unexpected_exits(cluster, [victim] if killed else [])
                    await self.heal(cluster)
            finally:
                stop.set()

        async with shared:
            await asyncio.gather(nemesis(), *(client(number) for number in range(clients)))
        result.mark("load and kills")
        result.violations += self._unexpected_exits(cluster, ())
        await self.heal(cluster)
        result.mark("heal")

    # ---- late retries ----

    async def late_run(self, index: int, seed: int) -> RunResult:
        """A random-kill run on the late-retry cluster, checked as one; then every order of it
        again once the coordinator has forgotten them all, under a nemesis (see the module's
        docstring)."""
        result = RunResult(index=index, kind=LATE, seed=seed)
        cluster = await self.ensure_cluster(late=True)
        await self.load_under_kills(cluster, result, f"chaos:late:{seed}", LATE_LOAD_S)
        await self.check(cluster, result)
        if result.violations:
            return result  # the wave would only bury what is wrong already
        await self.push_out(cluster, result, random.Random(f"chaos:late:{seed}:push"))
        result.mark("push out of memory")
        if result.violations:
            return result
        before = await read_branch_states(cluster)
        await self.late_wave(cluster, result, before, random.Random(f"chaos:late:{seed}:wave"))
        result.mark("late wave")
        healed = time.perf_counter()
        await self.check_late(cluster, result, before, healed)
        return result

    async def push_out(self, cluster: Cluster, result: RunResult, rng: random.Random) -> None:
        """Orders after the run's, until the coordinator remembers none of the run's
        transactions: it keeps its last LATE_FINISHED_KEPT finished ones, and those not
        finished yet (a commit whose phase 2 is still being retried, its participant having
        learned the outcome by its own inquiry) are waited for. The orders are checked with
        the wave, not retried."""
        run_ids = {record.transaction_id for record in result.records}
        deadline = time.perf_counter() + SETTLE_TIMEOUT_S
        rounds = 0
        async with OrderClient(cluster.coordinator_address) as client:
            while True:
                remembered = {
                    transaction_id: state
                    for transaction_id, state in (await remembered_transactions(cluster)).items()
                    if transaction_id in run_ids
                }
                if not remembered:
                    return
                if rounds >= LATE_PUSH_ROUNDS_MAX or time.perf_counter() > deadline:
                    break
                if not FINISHED_STATES & set(remembered.values()):
                    await asyncio.sleep(SETTLE_POLL_S)
                    continue
                rounds += 1
                first = len(result.pushers)
                planned = []
                for number in range(first, first + LATE_FINISHED_KEPT + 2):
                    order_id = f"r{result.index}-s{result.seed}-push-{number}"
                    request, amount, _ = make_order(rng, order_id)
                    planned.append((order_id, request, amount))
                self.orders_on_cluster += len(planned)
                answers = await asyncio.gather(
                    *(client.submit(item[1], timeout_s=SUBMIT_TIMEOUT_S) for item in planned)
                )
                result.pushers += [
                    record_of(order_id, request, amount, answer)
                    for (order_id, request, amount), answer in zip(planned, answers, strict=True)
                ]
                await asyncio.sleep(SETTLE_POLL_S)  # their last acknowledgements finish them
        example, state = sorted(remembered.items())[0]
        result.violations.append(
            f"the coordinator (finished_kept {LATE_FINISHED_KEPT}) still remembers "
            f"{len(remembered)} of the run's transactions after {len(result.pushers)} newer "
            f"orders, e.g. {example} ({coordinator_pb2.TransactionState.Name(state)})"
        )

    async def late_wave(
        self,
        cluster: Cluster,
        result: RunResult,
        before: Mapping[str, Mapping[str, int]],
        rng: random.Random,
    ) -> None:
        """Every order of the run again, same transaction id and content, each at a seeded
        offset within LATE_WAVE_SPREAD_S and retried until its outcome is known, while the
        nemesis harms one process for LATE_NEMESIS_S; then everything is healed and each
        answer checked (`check_late_retry`)."""
        # The nemesis's draws first: they do not depend on how many orders the load made.
        victim = rng.choices(PROCESSES, LATE_VICTIM_WEIGHTS)[0]
        nemesis_rng = random.Random(rng.random())
        records = [record for record in result.records if record.request is not None]
        offsets = [rng.uniform(0.0, LATE_WAVE_SPREAD_S) for _ in records]
        loop = asyncio.get_running_loop()
        faults: list[tuple[float, float]] = []  # (on, off), loop time

        async with OrderClient(
            cluster.coordinator_address, batch_in_flight=batch_in_flight_of(result.seed)
        ) as client:

            async def one(offset: float, record: ClientRecord) -> tuple[SubmitResult, float, float]:
                assert record.request is not None
                await asyncio.sleep(offset)
                started = loop.time()
                answer = await client.submit_until_known(
                    record.request,
                    attempts=LATE_RETRY_ATTEMPTS,
                    timeout_s=SUBMIT_TIMEOUT_S,
                    backoff_s=LATE_RETRY_BACKOFF_S,
                )
                return answer, started, loop.time()

            nemesis = asyncio.create_task(
                self.late_nemesis(cluster, result, victim, nemesis_rng, faults)
            )
            try:
                answers = await asyncio.gather(
                    *(one(offset, record) for offset, record in zip(offsets, records, strict=True))
                )
            except BaseException:
                nemesis.cancel()  # it undoes its fault on the way out
                raise
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await nemesis
        result.violations += self._unexpected_exits(cluster, ())
        await self.heal(cluster)
        for record, (answer, started, ended) in zip(records, answers, strict=True):
            record.late_outcome = answer.outcome
            found, record.late_kind = check_late_retry(
                record, answer, abort_records(record.transaction_id, before)
            )
            result.violations += found
            result.late_during_faults += any(on < ended and started < off for on, off in faults)

    async def late_nemesis(
        self,
        cluster: Cluster,
        result: RunResult,
        victim: str,
        rng: random.Random,
        faults: list[tuple[float, float]],
    ) -> None:
        """For LATE_NEMESIS_S from now, one fault after another on `victim` (LATE_FAULTS),
        each for a seeded time; every fault is undone before this returns, cancelled or not.
        Appends each fault's (on, off) loop times to `faults`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LATE_NEMESIS_S
        await asyncio.sleep(rng.uniform(*LATE_FAULT_GAP_S))
        while loop.time() < deadline:
            fault = "kill"
            if victim != COORDINATOR:
                fault = rng.choices(LATE_FAULTS, LATE_FAULT_WEIGHTS)[0]
            duration = rng.uniform(*LATE_FAULT_S)
            on = loop.time()
            if await self.fault_on(cluster, result, victim, fault):
                result.late_faults[f"{fault} {victim}"] += 1
                try:
                    await asyncio.sleep(duration)
                finally:
                    await self.fault_off(cluster, result, victim, fault)
                faults.append((on, loop.time()))
            await asyncio.sleep(rng.uniform(*LATE_FAULT_GAP_S))

    async def fault_on(self, cluster: Cluster, result: RunResult, victim: str, fault: str) -> bool:
        """Start `fault` on `victim`; whether it took (a process found down is reported, as
        one that died on its own, and healed instead)."""
        found = self._unexpected_exits(cluster, ())
        if found:
            result.violations += found
            await self.heal(cluster)
            return False
        if fault == "kill":
            return await asyncio.to_thread(cluster.kill, victim) is not None
        if fault == "stop":
            return cluster.pause(victim) is not None
        await set_fault(cluster, victim, participant_pb2.FAULT_MODE_DOWN)
        return True

    async def fault_off(self, cluster: Cluster, result: RunResult, victim: str, fault: str) -> None:
        if fault == "stop":
            cluster.resume(victim)
        elif fault == "down":
            await set_fault(cluster, victim, participant_pb2.FAULT_MODE_NONE)
        result.violations += self._unexpected_exits(cluster, [victim] if fault == "kill" else [])
        await self.heal(cluster)

    async def check_late(
        self,
        cluster: Cluster,
        result: RunResult,
        before: Mapping[str, Mapping[str, int]],
        healed: float,
    ) -> None:
        """After the wave: settle, then every check of the module's docstring."""
        snapshot = await self.settle_and_report(cluster, result, "after the late retries")
        if snapshot is None:
            return
        result.violations += check_after_late_retries(result.records, snapshot)
        result.violations += check_client_outcomes(result.pushers, snapshot)
        for record in result.records:
            if record.late_kind == LATE_RERUN:
                self.ledger[record.order_id] = True
            elif not learned_outcome(record) and record.late_outcome in (COMMITTED, ABORTED):
                self.ledger[record.order_id] = record.late_outcome == COMMITTED
        for record in result.pushers:
            if record.known:
                self.ledger[record.order_id] = record.outcome == COMMITTED
        result.violations += check_ledger(self.ledger, snapshot)
        # A Rollback still on its way may yet be answered "already committed" (recorded as a
        # heuristic commit before 56c8be8): give the last ones time to arrive.
        await asyncio.sleep(max(0.0, LATE_DRAIN_S - (time.perf_counter() - healed)))
        try:
            after = await read_branch_states(cluster)
            heuristics = await read_heuristics(cluster)
        except grpc.aio.AioRpcError as error:
            result.violations.append(f"could not list the branches: {error.code().name}")
            return
        result.violations += [
            f"made by the late retries: {h}"
            for h in heuristics
            if h not in self.heuristics_reported
        ]
        self.heuristics_reported.update(heuristics)
        transaction_ids = [record.transaction_id for record in result.records]
        result.violations += check_branch_outcomes(transaction_ids, after)
        result.violations += check_branches_kept(transaction_ids, before, after)
        for record in result.records:
            if record.late_kind == LATE_RERUN:
                result.reruns.append(
                    f"order {record.order_id} ({record.transaction_id}) learned ABORTED "
                    f"({record.reason[:80]}); its branches before the wave: "
                    f"{branches_of(record.transaction_id, before)}; the late retry committed it"
                )
        result.mark("check after the wave")

    async def run(self, index: int, cell: Cell | str | None, seed: int) -> RunResult:
        """One run, bounded in time; on a violation, keep the logs and drop the cluster so the
        next run starts clean."""
        started = time.perf_counter()
        if isinstance(cell, Cell):
            result = RunResult(index=index, kind="matrix", seed=seed, cell=cell)
        else:
            kind = cell if cell in (LATE, SOAK) else "kill"
            result = RunResult(index=index, kind=str(kind), seed=seed)
        result.unary = unary_services(cell, seed)  # what a failure before the run's own says
        timeout_s = RUN_TIMEOUT_S
        try:
            if isinstance(cell, Cell):
                work = self.matrix_run(index, cell, seed)
            elif cell == LATE:
                work = self.late_run(index, seed)
            elif cell == SOAK:
                work = self.soak_run(index, seed, self.soak_s)
                timeout_s += self.soak_s
            else:
                work = self.kill_run(index, seed)
            result = await asyncio.wait_for(work, timeout_s)
        except TimeoutError:
            result.violations.append(f"the run did not finish within {timeout_s:g} s")
        except PortTakenError as error:
            result.environment.append(str(error))
        except ClusterError as error:
            result.violations.append(f"the cluster failed: {error}")
        except Exception as error:  # reported as a failed run, and the next run starts clean
            detail = "".join(traceback.format_exception(error)[-4:])
            result.violations.append(f"the run failed: {error!r}\n{detail}")
        result.elapsed_s = time.perf_counter() - started
        if result.violations or result.environment:
            cluster = self.cluster
            if cluster is not None:
                # The target's log and the coordinator's; every log when something is stuck.
                targets = result.kills if result.cell is None else [result.cell.component]
                names = {COORDINATOR, *targets}
                names |= {fault.split()[-1] for fault in result.late_faults}
                if any("settle" in v or "exited" in v for v in result.violations):
                    names = set(PROCESSES)
                result.logs = {
                    name: cluster.log_tail(name, LOG_TAIL_LINES)
                    for name in PROCESSES
                    if name in names
                }
                result.data_dir = str(cluster.data_dir)
            await self.drop_cluster()
        return result
