"""The simulated world: one thread, a simulated clock, an in-memory network and disks.

Everything that happens is an entry in one event queue, a heap ordered by (time, sequence), and
everything random comes from one `random.Random(seed)`, so a seed replays exactly (TigerBeetle's
VOPR, FoundationDB's simulator). A run has two phases:

1. Faults: clients submit transactions while the network drops, duplicates, delays and reorders
   messages and nodes crash (losing their memory and their unsynced log tail) and restart.
   A client that gets no answer (the coordinator went down, the answer was lost, its own
   deadline passed) submits again under the same transaction id, as the client SDK does: the
   coordinator joins the attempt it still runs, answers a finished one again, or, if a restart
   made it forget the transaction (presumed abort), runs it again.
2. Heal: faults stop, every node is restarted, and the run goes on until nothing is left to do.

The invariants (dtm.sim.checker) are checked after every step of both phases; liveness and the
final agreement with what the clients were told are checked once the world is quiet.
"""

from __future__ import annotations

import functools
import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dtm.core.transaction import Outcome
from dtm.sim import messages as msg
from dtm.sim.checker import Checker
from dtm.sim.nodes import CoordinatorNode, ParticipantNode

# ---- limits (TigerBeetle style: every loop and queue is bounded, bounds in one place) ----

STEPS_MAX_DEFAULT = 4_000  # steps of the fault phase
HEAL_STEPS_MAX = 20_000  # steps allowed for the healed world to go quiet
TRACE_TAIL_LINES = 60  # lines of trace kept for a violation report
PARTICIPANTS_MAX = 4
TRANSACTIONS_MAX = 8
BRANCHES_PER_TRANSACTION_MAX = 4
CLIENT_RETRY_MS = 40  # a client whose Submit found the coordinator down tries again this late
CLIENT_RESUBMITS_MAX = 3  # a client's submits again after an unanswered call, by default
CLOCK_STEP_MS_MAX = 3_600_000  # a wall-clock step (NTP, an operator) moves it up to an hour


@dataclass(frozen=True, slots=True)
class Timing:
    """Protocol timeouts in simulated ms: the real defaults (dtm.limits) scaled down ~10x so a
    seed covers many timeouts in few steps. `random` varies them per seed: safety must hold
    under any timing, and only odd timings reach some paths (an inquiry that finds the
    coordinator still undecided needs an in-doubt timeout shorter than phase 1)."""

    transaction_timeout_ms_min: int = 200
    transaction_timeout_ms_max: int = 800
    prepare_timeout_ms: int = 150
    phase_two_timeout_ms: int = 150
    backoff_ms_min: int = 5
    backoff_ms_max: int = 400
    connect_refused_ms_max: int = 3  # a call to a down node fails fast (UNAVAILABLE)
    lease_unvoted_ms: int = 400
    in_doubt_after_ms: int = 250
    inquiry_timeout_ms: int = 100
    inquiry_backoff_ms_base: int = 10
    inquiry_backoff_ms_max: int = 300
    prepare_work_ms_max: int = 15  # business logic of a normal participant
    slow_prepare_work_ms_max: int = 400  # ... of a slow one (beyond the prepare timeout)

    @classmethod
    def random(cls, rng: random.Random) -> Timing:
        timeout_min = rng.choice((100, 200, 400))
        return cls(
            transaction_timeout_ms_min=timeout_min,
            transaction_timeout_ms_max=timeout_min * rng.choice((1, 4)),
            prepare_timeout_ms=rng.choice((100, 150, 400)),
            phase_two_timeout_ms=rng.choice((150, 300)),
            backoff_ms_max=rng.choice((50, 400)),
            lease_unvoted_ms=rng.choice((100, 400, 1_000)),
            in_doubt_after_ms=rng.choice((20, 100, 250)),
            inquiry_timeout_ms=rng.choice((100, 300)),
            slow_prepare_work_ms_max=rng.choice((100, 400, 800)),
        )


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """What the world may do wrong. `swarm` picks a different mix for every seed (swarm testing:
    some seeds are calm, some drop a lot, some crash a lot), which finds more than one fixed mix.
    """

    drop_probability: float = 0.05
    duplicate_probability: float = 0.03
    latency_ms_min: int = 1
    latency_ms_max: int = 30
    # A stalled message (a full queue, a paused process) arrives up to stall_ms_max late: after
    # its call's deadline, after the decision, after the Rollback that was sent later.
    stall_probability: float = 0.02
    stall_ms_max: int = 1_000
    crash_probability: float = 0.005  # per step
    # Crash a node in the step right after it sent something: where "persist before you
    # speak" matters most, and too narrow a window for crashes at random steps to hit often.
    crash_after_send_probability: float = 0.0
    crashes_max: int = 4
    downtime_ms_min: int = 5
    downtime_ms_max: int = 500
    # Each record of an unsynced log tail survives a crash with this probability, in order (the
    # OS may have written some pages; a torn tail is truncated, so what survives is a prefix).
    unsynced_survival_probability: float = 0.5
    fsync_ms_min: int = 1
    fsync_ms_max: int = 12
    # False: a message is delivered only to the incarnation it was sent to, as with gRPC, whose
    # connection dies with the process. True: a request sent before a crash may still reach the
    # restarted node (a proxy, or a transport that retries), which is a harsher network.
    stale_delivery: bool = False
    # The coordinator's answer to a client is lost on its way (the connection broke after the
    # reply left): the client, told nothing, submits again under the same id.
    answer_loss_probability: float = 0.02
    # A client's own deadline passes while its transaction still runs: it gives up on that
    # call (whose answer it will never see) and submits again.
    impatient_probability: float = 0.05
    # A Rollback (or the lease) cancels a prepare whose business logic has already run, or
    # runs where a cancel cannot reach it (a service's prepare in a thread or another
    # process): its vote still reaches the branch, rolled back by then, and the branch core
    # must give back what that prepare took (branch.py _on_vote_after_rollback).
    # participants/branches.py cancels its prepare before the service runs it, so it never
    # sees such a vote; the core must not depend on that.
    prepare_past_cancel_probability: float = 0.5
    # Per step, a node's wall clock steps (NTP, an operator) by up to CLOCK_STEP_MS_MAX either
    # way. The cores get the wall clock's moments, as the real engines feed them; intervals
    # (the transaction timer, prepare timeouts, leases, inquiry delays) count on the simulated
    # monotonic clock, which never steps (NodeModel.intervals_on_monotonic_clock).
    clock_step_probability: float = 0.0

    @classmethod
    def calm(cls) -> FaultConfig:
        return cls(
            drop_probability=0.0,
            duplicate_probability=0.0,
            stall_probability=0.0,
            crash_probability=0.0,
            crashes_max=0,
            unsynced_survival_probability=0.0,
            answer_loss_probability=0.0,
            impatient_probability=0.0,
            prepare_past_cancel_probability=0.0,
        )

    @classmethod
    def swarm(
        cls,
        rng: random.Random,
        *,
        stale_delivery: bool = False,
        clock_rng: random.Random | None = None,
    ) -> FaultConfig:
        """`clock_rng` draws the clock steps' probability (none without it): a stream of its
        own, so that adding clock steps left every other draw of a seed as it was."""
        clock_step_probability = clock_rng.choice((0.0, 0.01, 0.05, 0.2)) if clock_rng else 0.0
        return cls(
            drop_probability=rng.choice((0.0, 0.01, 0.05, 0.15)),
            duplicate_probability=rng.choice((0.0, 0.02, 0.1)),
            latency_ms_min=1,
            latency_ms_max=rng.choice((2, 10, 40, 120)),
            stall_probability=rng.choice((0.0, 0.01, 0.05)),
            stall_ms_max=rng.choice((300, 1_000)),
            crash_probability=rng.choice((0.0, 0.003, 0.01, 0.03)),
            crash_after_send_probability=rng.choice((0.0, 0.005, 0.02, 0.08)),
            crashes_max=rng.choice((1, 3, 6, 12)),
            downtime_ms_max=rng.choice((20, 200, 800)),
            unsynced_survival_probability=rng.choice((0.0, 0.5, 0.9)),
            fsync_ms_max=rng.choice((2, 12, 40)),
            stale_delivery=stale_delivery,
            answer_loss_probability=rng.choice((0.0, 0.05, 0.3)),
            impatient_probability=rng.choice((0.0, 0.1, 0.4)),
            clock_step_probability=clock_step_probability,
        )


@dataclass(frozen=True, slots=True)
class NodeModel:
    """How the simulated participant behaves where the SDK once got it wrong.

    The defaults copy participants/branches.py as it is; each False reproduces a bug the
    simulator found (and the tests prove it would be caught again):
    - error_reply_waits_for_durability=False: a ReplyError (such as "already committed", which
      resolves a one-phase probe as COMMITTED) left before the record it reveals was durable
      (found at seed 7877 with --sdk-error-replies, on the simulator of that time).
    - one_phase_replay_votes_committed=False: a replayed one-phase commit record answered a
      stale duplicate Prepare with PREPARED, which the coordinator core rejects.
    - intervals_on_monotonic_clock=False: the coordinator's transaction timer, its prepares'
      timeouts, the participants' leases and their inquiry delays compare the node's wall
      clock with a moment of it, and a timer that finds itself early is armed again for the
      rest, as the engine and the SDK did before (git log --grep monotonic): a wall-clock step
      back held a transaction, a branch and its locks for the length of the step.
    """

    error_reply_waits_for_durability: bool = True
    one_phase_replay_votes_committed: bool = True
    intervals_on_monotonic_clock: bool = True


@dataclass(frozen=True, slots=True)
class Memory:
    """How much the nodes remember of what is over. None: everything (the default, as with
    `finished_kept` and the participants' window far larger than any run's transactions).

    A number models the real bounds: the coordinator keeps its last `finished_kept` finished
    transactions (dtm/coordinator/finished.py, 20,000 by default) and forgets older ones in the
    order they finished: a Submit again then runs a new attempt, and an inquiry hears ABORTED
    (presumed abort). A participant keeps its last `decided_kept` decided branches
    (participants/decided.py, 100,000): an older one is gone, as if a checkpoint had dropped it
    from the log, and a late Prepare runs the branch again. Forgetting is what makes a late
    retry meet its earlier attempt's commit (Transaction.committed_earlier).
    """

    finished_kept: int | None = None
    decided_kept: int | None = None

    @classmethod
    def forgetful(cls, rng: random.Random) -> Memory:
        return cls(
            finished_kept=rng.choice((0, 1, 2, 4)),
            decided_kept=rng.choice((None, 1, 2, 4, 8)),
        )


@dataclass(frozen=True, slots=True)
class Workload:
    participants: int
    transactions: int
    arrival_window_ms: int
    refuse_probability: float
    read_only_probability: float
    slow: tuple[bool, ...]
    one_phase_capable: tuple[bool, ...]
    # How often a client that got no answer submits again (0: once, as before clients did).
    resubmits_max: int = CLIENT_RESUBMITS_MAX

    @classmethod
    def random(cls, rng: random.Random) -> Workload:
        participants = rng.randint(1, PARTICIPANTS_MAX)
        return cls(
            participants=participants,
            transactions=rng.randint(1, TRANSACTIONS_MAX),
            arrival_window_ms=rng.choice((0, 50, 300, 1_000)),
            refuse_probability=rng.choice((0.0, 0.05, 0.2)),
            read_only_probability=rng.choice((0.0, 0.1, 0.3)),
            slow=tuple(rng.random() < 0.25 for _ in range(participants)),
            one_phase_capable=tuple(rng.random() < 0.8 for _ in range(participants)),
        )


@dataclass(frozen=True, slots=True)
class RunResult:
    seed: int
    transactions: int
    committed: int
    aborted: int
    unknown: int  # the client was told UNKNOWN (a lost one-phase answer)
    unanswered: int  # the client got no answer, after every submit it was allowed
    crashes: int
    drops: int
    duplicates: int
    messages: int
    steps: int
    heal_steps: int
    sim_ms: int
    resubmits: int = 0  # Submits again under the same id by clients that got no answer
    clock_steps: int = 0  # wall-clock steps of any node (FaultConfig.clock_step_probability)
    # How often each interesting protocol path ran: evidence that the seeds reach them.
    coverage: tuple[tuple[str, int], ...] = ()
    # How often an outcome README documents as a limit (a late retry no participant
    # remembers) happened: accepted by the checker, never silently.
    limits: tuple[tuple[str, int], ...] = ()


class InvariantViolation(Exception):
    def __init__(
        self, seed: int, step: int, message: str, trace_tail: list[str], *, replay: str = ""
    ) -> None:
        self.seed = seed
        self.step = step
        self.message = message
        self.trace_tail = trace_tail
        self.replay = replay or f"python -m dtm.sim --seed {seed} --trace"
        super().__init__(f"seed {seed}, step {step}: {message}\n  replay: {self.replay}")

    def report(self) -> str:
        tail = "\n".join(f"    {line}" for line in self.trace_tail)
        return f"{self}\n  last {len(self.trace_tail)} trace lines:\n{tail}"


@dataclass(slots=True)
class Client:
    """The client of one transaction: one Submit call at a time, each a new `call` number."""

    transaction_id: str
    participants: list[str]
    timeout_ms: int
    call: int = 0  # its current call; an answer to an earlier one is never seen
    resubmits: int = 0
    answered: bool = False  # it got an answer and stops (UNKNOWN too: it asks no more)


class Node(Protocol):
    name: str
    alive: bool
    incarnation: int

    def receive(self, source: str, message: msg.Message) -> None: ...


@dataclass(slots=True)
class _Entry:
    """One scheduled thing. Owned by a node incarnation unless `node` is None: a crash makes
    every entry of the old incarnation (timers, fsyncs, pending work) vanish."""

    node: Node | None
    incarnation: int
    label: str
    run: Callable[[], None]


class World:
    def __init__(
        self,
        seed: int,
        *,
        faults: FaultConfig | None,
        model: NodeModel | None = None,
        trace: Callable[[str], None] | None = None,
        stale_delivery: bool = False,
        workload: Workload | None = None,
        timing: Timing | None = None,
        memory: Memory | None = None,
        forgetful: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        # The wall-clock steps draw from a stream of their own: without them (or in the
        # unmutated model, where no interval reads the wall clock) a seed runs as before.
        self.clock_rng = random.Random(f"wall clock {seed}")
        self.faults = faults or FaultConfig.swarm(
            self.rng, stale_delivery=stale_delivery, clock_rng=self.clock_rng
        )
        self.model = model or NodeModel()
        self.timing = timing or Timing.random(self.rng)
        self.workload = workload or Workload.random(self.rng)
        # Drawn last, so a forgetful seed has the faults, timing and workload of the same seed
        # without forgetting.
        self.memory = memory or (Memory.forgetful(self.rng) if forgetful else Memory())
        self.now_ms = 0
        self.step = 0
        self.heal_steps = 0
        self.faulty = True
        self._trace = trace
        self._tail: deque[str] = deque(maxlen=TRACE_TAIL_LINES)
        self._queue: list[tuple[int, int, _Entry]] = []
        self._sequence = 0
        self._ids = 0
        self.crashes = 0
        self.clock_steps = 0
        self.resubmits = 0
        self.clients: dict[str, Client] = {}
        self.drops = 0
        self.duplicates = 0
        self.messages = 0
        self._crash_next: CoordinatorNode | ParticipantNode | None = None
        self.coverage: dict[str, int] = {}
        self.limits: dict[str, int] = {}
        self.replay = self._replay_hint(
            custom=faults is not None
            or workload is not None
            or timing is not None
            or memory is not None
            or not self.model.one_phase_replay_votes_committed,
            stale_delivery=stale_delivery,
            forgetful=forgetful,
        )
        self.checker: Checker = Checker(self)
        self.coordinator = CoordinatorNode(self)
        self.participants: dict[str, ParticipantNode] = {}
        for i in range(self.workload.participants):
            name = f"p{i}"
            self.participants[name] = ParticipantNode(
                self, name, slow=self.workload.slow[i], one_phase=self.workload.one_phase_capable[i]
            )
        self.nodes: dict[str, CoordinatorNode | ParticipantNode] = {
            self.coordinator.name: self.coordinator,
            **self.participants,
        }
        described = f"{self.workload}; {self.timing}; {self.faults}; {self.model}"
        if self.memory != Memory():
            described += f"; {self.memory}"
        self.log(f"world: seed {seed}; {described}")

    def _replay_hint(self, *, custom: bool, stale_delivery: bool, forgetful: bool) -> str:
        if custom:  # the command line draws everything from the seed; this run did not
            return f"run_seed({self.seed}, trace=print) with this run's other arguments"
        flags = " --stale-delivery" if stale_delivery else ""
        if forgetful:
            flags += " --forgetful"
        if not self.model.error_reply_waits_for_durability:
            flags += " --sdk-error-replies"
        if not self.model.intervals_on_monotonic_clock:
            flags += " --wall-clock-timers"
        return f"python -m dtm.sim --seed {self.seed} --trace{flags}"

    # ---- scheduling ----

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def after(self, delay_ms: int, node: Node | None, label: str, run: Callable[[], None]) -> None:
        assert delay_ms >= 0
        self._sequence += 1
        entry = _Entry(node, node.incarnation if node is not None else 0, label, run)
        heapq.heappush(self._queue, (self.now_ms + delay_ms, self._sequence, entry))

    def log(self, text: str) -> None:
        line = f"{self.now_ms:>6} ms  {text}"
        self._tail.append(line)
        if self._trace is not None:
            self._trace(line)

    def fail(self, message: str) -> InvariantViolation:
        """Build the violation for the caller to raise (so mypy sees the flow end)."""
        self.log(f"VIOLATION: {message}")
        return InvariantViolation(
            self.seed, self.step + self.heal_steps, message, list(self._tail), replay=self.replay
        )

    def cover(self, path: str) -> None:
        self.coverage[path] = self.coverage.get(path, 0) + 1

    def limit(self, what: str, where: str) -> None:
        """A documented limit was reached: not a violation, but counted and traced."""
        self.log(f"  LIMIT (documented): {what}: {where}")
        self.limits[what] = self.limits.get(what, 0) + 1

    # ---- the network ----

    def send(self, source: Node, destination: str, message: msg.Message) -> bool:
        """Put a message on the wire. False when the destination is down: the connection is
        refused at once (gRPC's UNAVAILABLE), which the caller may act on."""
        target = self.nodes[destination]
        self.messages += 1
        if not target.alive:
            self.log(f"{source.name} -> {destination}: {message} refused (down)")
            return False
        copies = 1
        if self.faulty and self.rng.random() < self.faults.duplicate_probability:
            copies = 2
            self.duplicates += 1
        for copy in range(copies):
            if self.faulty and self.rng.random() < self.faults.drop_probability:
                self.drops += 1
                self.log(f"{source.name} -> {destination}: {message} dropped")
                continue
            delay = self.rng.randint(self.faults.latency_ms_min, self.faults.latency_ms_max)
            if self.faulty and self.rng.random() < self.faults.stall_probability:
                delay += self.rng.randint(0, self.faults.stall_ms_max)
            incarnation = target.incarnation
            label = f"{source.name} -> {destination}: {message}" + (" (duplicate)" if copy else "")
            self.after(
                delay,
                None,
                label,
                functools.partial(self._deliver, target, incarnation, source.name, message),
            )
        if self.faulty and self.rng.random() < self.faults.crash_after_send_probability:
            self._crash_next = self.nodes[source.name]
        return True

    def _deliver(self, target: Node, incarnation: int, source: str, message: msg.Message) -> None:
        if not target.alive:
            self.log(f"  lost: {target.name} is down")
            return
        if target.incarnation != incarnation and not self.faults.stale_delivery:
            self.log(f"  lost: {target.name} restarted since it was sent")
            return
        if target.incarnation != incarnation:
            self.cover("message delivered to a later incarnation")
        target.receive(source, message)

    # ---- faults ----

    def _maybe_step_clock(self) -> None:
        """A node's wall clock steps, as NTP or an operator steps it: the node's process, its
        memory and the simulated monotonic clock go on as they were."""
        rng = self.clock_rng
        if rng.random() >= self.faults.clock_step_probability:
            return
        # The coordinator is one node among up to five, but its timer is the one that bounds
        # a whole transaction.
        nodes = list(self.nodes.values())
        node = self.coordinator if rng.random() < 0.4 else rng.choice(nodes)
        step_ms = rng.randint(-CLOCK_STEP_MS_MAX, CLOCK_STEP_MS_MAX)
        node.clock_offset_ms += step_ms
        self.clock_steps += 1
        self.log(f"CLOCK {node.name}: the wall clock steps {step_ms:+} ms")
        self.cover(f"clock: a wall clock stepped {'back' if step_ms < 0 else 'forward'}")

    def _maybe_crash(self) -> None:
        faults = self.faults
        node, self._crash_next = self._crash_next, None
        if self.crashes >= faults.crashes_max:
            return
        if node is None or not node.alive:
            if self.rng.random() >= faults.crash_probability:
                return
            alive = [node for node in self.nodes.values() if node.alive]
            if not alive:
                return
            # The coordinator is one node among up to five but the most interesting to crash.
            node = (
                self.coordinator
                if self.coordinator.alive and self.rng.random() < 0.4
                else self.rng.choice(alive)
            )
        self.crashes += 1
        node.crash()
        downtime = self.rng.randint(faults.downtime_ms_min, faults.downtime_ms_max)
        self.after(downtime, None, f"restart {node.name}", lambda: self._restart(node))
        self.checker.touch_all()
        self.checker.check_step()

    def _restart(self, node: CoordinatorNode | ParticipantNode) -> None:
        if not node.alive:
            node.restart()
            self.checker.touch_all()

    # ---- running ----

    def _submit(self, transaction_id: str) -> None:
        client = self.clients[transaction_id]
        if client.answered:
            return
        client.call += 1
        if not self.coordinator.alive:
            # Nothing started: the client's connection was refused; it tries again later.
            self.log(f"client: submit {transaction_id} refused, coordinator down")
            self.after(
                CLIENT_RETRY_MS,
                None,
                f"client submits {transaction_id} again",
                functools.partial(self._submit, transaction_id),
            )
            return
        if self.faulty and self.rng.random() < self.faults.impatient_probability:
            give_up_at = self.rng.randint(1, client.timeout_ms)
            self.after(
                give_up_at,
                None,
                f"client of {transaction_id}: deadline of call {client.call}",
                functools.partial(self._deadline, transaction_id, client.call),
            )
        self.coordinator.submit(
            transaction_id, client.participants, client.timeout_ms, call=client.call
        )

    def _deadline(self, transaction_id: str, call: int) -> None:
        client = self.clients[transaction_id]
        if not client.answered and client.call == call:
            self._resubmit(client, "its deadline passed")

    def _resubmit(self, client: Client, why: str) -> None:
        if client.resubmits >= self.workload.resubmits_max:
            self.log(f"client of {client.transaction_id}: {why}; gives up (no answer)")
            return
        client.resubmits += 1
        self.resubmits += 1
        self.cover(f"client: submitted again because {why}")
        client.call += 1  # the abandoned call's answer, should it come, is not seen
        self.after(
            self.rng.randint(1, CLIENT_RETRY_MS),
            None,
            f"client submits {client.transaction_id} again ({why})",
            functools.partial(self._submit, client.transaction_id),
        )

    def answer_client(self, transaction_id: str, call: int, outcome: Outcome, reason: str) -> None:
        """The coordinator answers call `call` of this transaction's client."""
        client = self.clients[transaction_id]
        if client.answered or client.call != call:
            self.log(f"  answer to {transaction_id}'s abandoned call {call} not seen")
            return
        if self.faulty and self.rng.random() < self.faults.answer_loss_probability:
            self.log(f"  answer to {transaction_id}'s call {call} lost on its way")
            self._resubmit(client, "its answer was lost")
            return
        client.answered = True
        self.checker.client_told(transaction_id, outcome, reason)

    def client_cut_off(self, transaction_id: str, call: int) -> None:
        """The coordinator went down while this call waited: gRPC's UNAVAILABLE."""
        client = self.clients[transaction_id]
        if not client.answered and client.call == call:
            self._resubmit(client, "the coordinator went down")

    def _plan_clients(self) -> None:
        names = list(self.participants)
        timing = self.timing
        for n in range(self.workload.transactions):
            transaction_id = f"t{n}"
            count = self.rng.randint(1, min(len(names), BRANCHES_PER_TRANSACTION_MAX))
            # Mostly distinct participants; sometimes two branches at one (branches are keyed
            # by (transaction, index), not by participant).
            if self.rng.random() < 0.1:
                chosen = [self.rng.choice(names) for _ in range(count)]
            else:
                chosen = self.rng.sample(names, count)
            timeout_ms = self.rng.randint(
                timing.transaction_timeout_ms_min, timing.transaction_timeout_ms_max
            )
            at = self.rng.randint(0, self.workload.arrival_window_ms)
            self.checker.planned(transaction_id)
            self.clients[transaction_id] = Client(transaction_id, chosen, timeout_ms)
            self.after(
                at,
                None,
                f"client submits {transaction_id} to {','.join(chosen)}",
                functools.partial(self._submit, transaction_id),
            )

    def _step(self) -> None:
        at, _, entry = heapq.heappop(self._queue)
        self.now_ms = at
        # Before the entry runs: a timer that fires late would end what it held in this step.
        self.checker.check_bounds()
        node = entry.node
        if node is not None and (not node.alive or node.incarnation != entry.incarnation):
            return  # the incarnation that scheduled it is gone, and so is this
        self.log(entry.label)
        entry.run()
        self.checker.check_step()

    def run(self, steps_max: int) -> RunResult:
        self._plan_clients()
        while self._queue and self.step < steps_max:
            self._maybe_step_clock()
            self._maybe_crash()
            self._step()
            self.step += 1
        self.heal()
        while self._queue and self.heal_steps < HEAL_STEPS_MAX:
            self._step()
            self.heal_steps += 1
        if self._queue:
            pending = sorted({entry.label for _, _, entry in self._queue})[:5]
            raise self.fail(
                f"liveness: the healed world did not go quiet within {HEAL_STEPS_MAX} steps "
                f"({len(self._queue)} entries queued, e.g. {pending})"
            )
        self.checker.check_settled()
        return self.checker.result()

    def heal(self) -> None:
        """Stop every fault and restart every node: from here on only the protocol runs."""
        self.faulty = False
        self.log("heal: faults stop, every node restarts")
        for node in self.nodes.values():
            if not node.alive:
                node.restart()
        self.checker.touch_all()
        self.checker.check_step()


def run_seed(
    seed: int,
    *,
    steps_max: int = STEPS_MAX_DEFAULT,
    faults: FaultConfig | None = None,
    model: NodeModel | None = None,
    stale_delivery: bool = False,
    trace: Callable[[str], None] | None = None,
    workload: Workload | None = None,
    timing: Timing | None = None,
    memory: Memory | None = None,
    forgetful: bool = False,
) -> RunResult:
    """Run one seeded world to quiescence; raise InvariantViolation on the first violation.

    `faults`, `workload` and `timing` left None are drawn from the seed (swarm testing);
    `stale_delivery` applies to a drawn fault mix only. Pass them to aim a run at a scenario.
    `forgetful` draws a `Memory` from the seed (small windows of what is over); `memory` sets
    one; neither: the nodes forget nothing they keep across restarts.
    """
    world = World(
        seed,
        faults=faults,
        model=model,
        trace=trace,
        stale_delivery=stale_delivery,
        workload=workload,
        timing=timing,
        memory=memory,
        forgetful=forgetful,
    )
    return world.run(steps_max)
