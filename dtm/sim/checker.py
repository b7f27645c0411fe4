"""The invariants, checked after every step of a simulated run, and liveness once it is quiet.

The checker looks at what is real, never at what a core believes about itself:

- a branch's state is what its participant holds in memory (while it is up) together with the
  records its disk made durable; memory lost in a crash is as if it never was, because the real
  service is rebuilt from its log;
- a vote counts once it left its participant; a decision counts once the coordinator stood by
  it: its status moved to committed or aborted, it sent Commit or Rollback, answered an inquiry,
  or answered the client.

Invariants (protocol.md rules in brackets):
  atomicity: no transaction with one branch committed and an updating branch rolled back [1];
  decisions never change: never both commit and abort from the coordinator, across its
    restarts; nothing it said commit for is rolled back anywhere, nothing it said abort for is
    committed anywhere (and so for what the client was told) [4, 6];
  no commit without all votes: the coordinator decides commit only on PREPARED/READ_ONLY from
    every branch it received, its decision record lists exactly the PREPARED ones, and a
    participant commits only if every branch sent such a vote and the coordinator said commit
    [2, 3, 8];
  persist before you speak: a PREPARED (or one-phase COMMITTED) vote leaves only once its
    record is durable [10], a Commit's acknowledgement only once the commit record is [12];
  durability: once the coordinator stands by a commit, its decision record is durable (or, for
    one phase, the participant's commit record is), so no crash can lose it [3, 9]; its end
    record is written only once every branch the decision lists holds a durable commit
    record (or a recorded heuristic outcome) [12];
  applied once: a branch's commit is applied once per life (an apply whose commit record a
    crash lost never was) [14];
  released: a decided branch holds neither its locks nor its reservation after its step, and
    nothing is held after healing (the participant model's `locked` and `reserved`);
  bounded, whatever the wall clocks do (`check_bounds`, before every step): no transaction
    stays preparing past its timeout, no branch stays unvoted (with its locks) past its
    lease, and no in-doubt branch waits longer than `in_doubt_after_ms` (or, after an
    inquiry, the inquiry backoff's ceiling) to be asked about, all counted on the simulated
    monotonic clock from when they began in the incarnation holding them (a crash ends
    them, so downtime never counts; a restarted participant's wait starts at the restart).
After healing: nothing left in doubt or preparing, every coordinator transaction terminal, and
every updating branch agrees with what the client and the coordinator said [11, 12, 13].

A client that got no answer submits again under the same id [14]. Joining a running attempt or
answering a finished one again must agree with it; a transaction the coordinator forgot in a
restart (no commit on record: presumed abort) is run again as a new attempt. What the earlier
attempt's coordinator said lived only in its memory and in its messages, so the decisions are
held per attempt, while every branch (and so every message the earlier attempt sent, delivered
late or not) is held to one outcome across all attempts: that is where a new attempt reusing an
earlier one's vote shows. Running again a transaction whose commit decision is durable is a
violation of its own (recovery must resume it), unless the coordinator's memory is bounded
(`Memory.finished_kept`) and that commit was complete: every branch its decision record lists
holds a durable commit record.

Forgetting (`Memory`, `--forgetful`): the coordinator forgets finished transactions beyond a
window, and participants may forget decided branches beyond theirs; a forgotten branch that
gets a message again starts a new life (its records and votes are the new life's). Then:
  - an attempt's abort is held against what it could still commit: a branch committed before
    the attempt began (by an earlier attempt) does not contradict it, any other does; its
    commit is held against the branch lives that began before it;
  - atomicity holds across attempts: no branch has a committed life while another updating
    branch has only rolled-back lives;
  - what the client is told never contradicts what happened: told COMMITTED, no updating
    branch has only rolled-back lives (and after healing each has a committed life); told
    ABORTED, no branch has a committed life;
  - a branch's effect is applied at most once across attempts (one committed life) as long as
    a participant of the transaction remembered the commit when the retry prepared: a Prepare
    of that attempt reached a participant holding its branch committed (its memory then, not
    the coordinator's view);
  - a client told COMMITTED by an attempt that committed nothing itself: a participant voted
    COMMITTED to that attempt, and that branch is committed.
Where README ("a client retries very late") documents a limit, the checker does not fail but
counts it (`RunResult.limits`, printed by `python -m dtm.sim`):
  - a retry that no participant remembering the commit answered (none held it, or those that
    did were down or their answers lost) runs afresh: it applies a branch again (a second
    committed life, where no participant held the commit when the retry prepared), or aborts:
    the client is told ABORTED although an earlier attempt committed, and the Rollbacks that
    meet the earlier commit are reported as heuristic commits;
  - an aborted transaction commits where its participant had forgotten the abort (the
    committed life began right after the branch's previous, uncommitted, life was forgotten),
    or a retry commits after an earlier attempt said abort;
  - a Commit retried after its participant forgot the committed branch is answered NOT_FOUND,
    which the coordinator records as a heuristic hazard, and a one-phase probe after its
    participant forgot the commit leaves a tombstone and resolves the transaction ABORTED
    (docs/architecture.md, the one-phase probe): a participant's window shorter than its
    coordinator's retries.

"After every step" is exact but cheap: a step marks the transactions it touched (a branch
event, a record made durable, a vote, a decision; a crash or restart marks all), and only those
are re-checked, since no other transaction's facts can have changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dtm.core import branch as bcore
from dtm.core.branch import Branch, BranchState, BranchVote
from dtm.core.transaction import TERMINAL_STATES, Outcome, Transaction, TxnState, Vote
from dtm.sim import messages as msg

if TYPE_CHECKING:
    from dtm.sim.nodes import CoordinatorRun, ParticipantNode
    from dtm.sim.world import RunResult, World

_YES_VOTES = (BranchVote.PREPARED, BranchVote.READ_ONLY)
_UPDATING_VOTES = (BranchVote.PREPARED, BranchVote.COMMITTED)


@dataclass(slots=True)
class TxnFacts:
    transaction_id: str
    began: bool = False
    branches: tuple[tuple[int, str], ...] = ()
    one_phase: bool = False
    answer: Outcome | None = None  # what the client received (it stops asking then)
    attempts: int = 0
    decision_requested: bool = False
    said_commit: str = ""  # first evidence that the coordinator decided commit
    said_abort: str = ""
    said_commit_seq: int = 0  # when (Checker.seq) said_commit was first seen
    # Every vote any life of each branch sent, and the votes of each branch's current life.
    votes_sent: dict[int, list[BranchVote]] = field(default_factory=dict)
    life_votes: dict[int, list[BranchVote]] = field(default_factory=dict)
    # (branch, life) committed when the current attempt began: an earlier attempt's commit.
    committed_before: frozenset[tuple[int, int]] = frozenset()
    # A Prepare of the current attempt reached a participant that held its branch committed.
    met_commit: set[int] = field(default_factory=set)  # the branches whose Prepare did
    aborted_before: bool = False  # an earlier attempt's coordinator said abort
    # The attempt that answered the client heard a vote from a branch of `met_commit` (whose
    # participant, holding the commit, must have said so), and whether `met_commit` was empty.
    heard: bool = False
    told_met_commit: bool = False
    limits: set[str] = field(default_factory=set)  # each limit counted once per transaction


@dataclass(slots=True)
class BranchView:
    label: str
    state: BranchState | None
    committed: bool
    updating: bool
    rolled_back: bool
    life: int = 0
    tombstone: bool = False  # rolled back before anything was prepared


@dataclass(slots=True)
class Lives:
    """A branch across its participant's forgetting: a view of each life that is over."""

    past: list[BranchView] = field(default_factory=list)
    began_seq: int = 0  # when the current life's first branch was created (0: not yet)
    # The lives that began right after an uncommitted one was forgotten (the abort forgotten).
    fresh_lives: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Net:
    """A branch over all its lives: what the transaction's effects are."""

    label: str
    committed_lives: int
    updating: bool
    reverted: bool  # updating, and every updating life rolled back


class Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.txns: dict[str, TxnFacts] = {}
        # The current life's durable records of each branch (all of them, unless forgotten).
        self.branch_durable: dict[tuple[str, int], list[msg.BranchRecordKind]] = {}
        self.lives: dict[tuple[str, int], Lives] = {}
        self.decisions_durable: dict[str, tuple[tuple[int, str], ...]] = {}
        self.seq = 0  # orders the observations that need a when
        self.business: dict[tuple[str, int], tuple[BranchVote, str]] = {}
        # (branch, life) whose commit was applied, as long as it is real: an apply whose commit
        # record a crash lost is as if it never was (the replay holds the branch PREPARED).
        self.applied: set[tuple[tuple[str, int], int]] = set()
        self.heuristics: set[tuple[str, int]] = set()  # branches the coordinator recorded
        self._dirty: dict[str, None] = {}  # a dict, not a set: iteration order is the seed's

    # ---- observations ----

    def planned(self, transaction_id: str) -> None:
        self.txns[transaction_id] = TxnFacts(transaction_id)

    def began(self, txn: Transaction) -> None:
        t = txn.transaction_id
        facts = self.txns[t]
        branches = tuple((b.index, b.participant) for b in txn.branches)
        facts.attempts += 1
        if facts.began:
            assert facts.branches == branches, "a client submits the same transaction again"
            decision = self.decisions_durable.get(t)
            if decision is not None:
                unfinished = [i for i, _ in decision if not self._ever_committed(t, i)]
                if self.world.memory.finished_kept is None or unfinished:
                    raise self.world.fail(
                        f"recovery: {t} runs again, but its commit decision is durable "
                        f"({facts.said_commit or 'decided'}; branches {unfinished} hold no "
                        "commit): the coordinator forgot it"
                    )
                self.world.cover("coordinator: a forgotten commit is submitted again")
            self.world.cover("coordinator: a forgotten transaction runs again")
            self.world.log(f"  {t}: attempt {facts.attempts}; the earlier one was forgotten")
            self._next_attempt(facts)
        facts.began = True
        facts.branches = branches
        facts.one_phase = txn.one_phase
        facts.committed_before = self._committed_lives(facts)

    def resumed(self, transaction_id: str) -> int:
        """A restarted coordinator resumes a commit from its decision record: an attempt of
        its own (the attempts after the one that decided it may have been forgotten since,
        by the window, and the restart forgot the rest). Returns its number."""
        facts = self.txns[transaction_id]
        facts.attempts += 1
        if facts.began:
            self._next_attempt(facts)
            facts.committed_before = self._committed_lives(facts)
        facts.decision_requested = True
        return facts.attempts

    def _next_attempt(self, facts: TxnFacts) -> None:
        # What the forgotten attempt's coordinator said, it said from memory now lost. An
        # abort counts as one where no branch was committed (not a late retry's own abort).
        if facts.said_abort and not facts.committed_before:
            facts.aborted_before = True
        facts.said_commit = facts.said_abort = ""
        facts.said_commit_seq = 0
        facts.decision_requested = False
        facts.met_commit = set()
        # The votes stay: they are the branches' own (a duplicate Prepare answers with one).

    def _committed_lives(self, facts: TxnFacts) -> frozenset[tuple[int, int]]:
        t = facts.transaction_id
        return frozenset(
            (index, number)
            for (index, _), view in zip(facts.branches, self._views(facts), strict=True)
            for number, life in enumerate(self._every(t, index, view))
            if life.committed
        )

    def business_vote(self, key: tuple[str, int]) -> tuple[BranchVote, str]:
        """The service's answer: deterministic per branch, as services must be (service.py),
        except a refusal. It rests on the service's state (no stock left), which may have
        changed by the time a participant that forgot the branch runs its prepare again: a
        restarted node gets here a second time only if nothing of the branch survived."""
        known = self.business.get(key)
        if known is not None and known[0] is BranchVote.REFUSED and self.world.rng.random() < 0.5:
            self.world.cover("participant: a refused branch, forgotten, prepares again")
            self.business[key] = (BranchVote.PREPARED, "")
        if key not in self.business:
            workload = self.world.workload
            draw = self.world.rng.random()
            if draw < workload.refuse_probability:
                self.business[key] = (BranchVote.REFUSED, "insufficient stock")
            elif draw < workload.refuse_probability + workload.read_only_probability:
                self.business[key] = (BranchVote.READ_ONLY, "")
            else:
                self.business[key] = (BranchVote.PREPARED, "")
        return self.business[key]

    # ---- a branch's lives (participants that forget decided branches) ----

    def branch_created(self, key: tuple[str, int]) -> None:
        """A participant made a branch from nothing (a first message, or one it forgot)."""
        lives = self.lives.setdefault(key, Lives())
        if not lives.began_seq:
            self.seq += 1
            lives.began_seq = self.seq

    def branch_forgotten(self, node: ParticipantNode, key: tuple[str, int]) -> None:
        """`node` drops decided branch `key` from memory and, durably, from its log (its
        records are all durable by then): what comes next for the key is a new life."""
        facts = self.txns[key[0]]
        lives = self.lives.setdefault(key, Lives())
        view = self._view(facts, key[1], node.name)
        lives.past.append(view)
        lives.began_seq = 0
        if not view.committed:  # what it forgets last is an abort (or nothing applied)
            lives.fresh_lives.add(len(lives.past))
        self.branch_durable[key] = []
        facts.life_votes[key[1]] = []
        self.world.log(
            f"  {node.name} forgets {key[0]}/{key[1]} ({_state(view.state)}): "
            f"life {len(lives.past)} begins"
        )
        self.world.cover(f"participant: forgot a decided branch ({_state(view.state)})")
        self._dirty[key[0]] = None

    def prepare_delivered(self, key: tuple[str, int], call: int, state: BranchState | None) -> None:
        """A Prepare reached a participant holding `key` in `state` (None: not at all)."""
        sent = self.world.coordinator.calls.get(call)
        current = self.world.coordinator.runs.get(key[0])
        if sent is None or current is None or sent.run is not current:
            return  # not the running attempt's call (a stale or late one)
        if state is BranchState.COMMITTED:
            self.txns[key[0]].met_commit.add(key[1])

    @staticmethod
    def _heard(facts: TxnFacts, run: CoordinatorRun) -> bool:
        """`run` received a vote from a branch whose participant held it committed when the
        run's Prepare reached it (a vote that had to say COMMITTED), or any COMMITTED vote."""
        votes = run.votes_received
        return Vote.COMMITTED in votes.values() or any(i in votes for i in facts.met_commit)

    def _ever_committed(self, transaction_id: str, index: int) -> bool:
        key = (transaction_id, index)
        lives = self.lives.get(key)
        if lives is not None and any(life.committed for life in lives.past):
            return True
        return "committed" in self.branch_durable.get(key, [])

    def _limit(self, facts: TxnFacts, what: str) -> None:
        if what not in facts.limits:
            facts.limits.add(what)
            self.world.limit(what, facts.transaction_id)

    def touch(self, transaction_id: str) -> None:
        self._dirty[transaction_id] = None

    def touch_all(self) -> None:
        for transaction_id in self.txns:
            self._dirty[transaction_id] = None

    def durable(self, node: str, records: list[msg.Record]) -> None:
        for record in records:
            if isinstance(record, msg.BranchRecord):
                key = (record.transaction_id, record.branch)
                self.branch_durable.setdefault(key, []).append(record.kind)
            elif isinstance(record, msg.DecisionRecord):
                self.decisions_durable[record.transaction_id] = record.branches
            self._dirty[record.transaction_id] = None

    def coordinator_said(self, transaction_id: str, commit: bool, evidence: str) -> None:
        facts = self.txns[transaction_id]
        if commit and not facts.said_commit:
            facts.said_commit = evidence
            self.seq += 1
            facts.said_commit_seq = self.seq
            if facts.aborted_before:
                self._limit(facts, "a retry committed what an earlier attempt aborted")
        elif not commit and not facts.said_abort:
            facts.said_abort = evidence
        self._dirty[transaction_id] = None

    def decision_persisted(
        self, run: CoordinatorRun, branches: tuple[tuple[int, str], ...]
    ) -> None:
        """Rules 2 and 3: commit only on a yes from every branch; the record lists every
        branch that voted PREPARED (phase 2 goes to exactly those)."""
        txn = run.txn
        facts = self.txns[txn.transaction_id]
        facts.decision_requested = True
        for progress in txn.branches:
            vote = run.votes_received.get(progress.index)
            if vote not in (Vote.PREPARED, Vote.READ_ONLY):
                raise self.world.fail(
                    f"no commit without all votes: coordinator decided commit of "
                    f"{txn.transaction_id} but branch {progress.index} ({progress.participant}) "
                    f"voted {vote.value if vote else 'nothing'}"
                )
        prepared = sorted(i for i, v in run.votes_received.items() if v is Vote.PREPARED)
        listed = sorted(i for i, _ in branches)
        if prepared != listed:
            raise self.world.fail(
                f"decision record of {txn.transaction_id} lists branches {listed}, but "
                f"{prepared} voted PREPARED"
            )

    def end_persisted(self, run: CoordinatorRun) -> None:
        """Rule 12: the end record (which lets a restart, and the window, forget the commit)
        is written once every branch the decision lists holds a durable commit record, or
        has a heuristic outcome on record."""
        txn = run.txn
        t = txn.transaction_id
        listed = self.decisions_durable.get(t)
        if listed is None:
            listed = tuple((b.index, b.participant) for b in txn.branches if b.needs_phase_two)
        unfinished = [
            f"branch {index} ({participant})"
            for index, participant in listed
            if not self._ever_committed(t, index) and (t, index) not in self.heuristics
        ]
        if unfinished:
            raise self.world.fail(
                f"end record too early: the coordinator ends {t}, but {unfinished} hold no "
                "durable commit record (nor a recorded heuristic outcome)"
            )

    def client_answered(self, run: CoordinatorRun, outcome: Outcome, reason: str) -> None:
        """The coordinator's Reply for this run (to every client call waiting on it)."""
        txn = run.txn
        if run.answer is not None:
            raise self.world.fail(
                f"{txn.transaction_id}: the coordinator replied twice: {run.answer.value}, "
                f"then {outcome.value}"
            )
        facts = self.txns[txn.transaction_id]
        if outcome is Outcome.COMMITTED:
            votes = [run.votes_received.get(b.index) for b in txn.branches]
            if not txn.one_phase and Vote.COMMITTED in votes:
                # Committed by an earlier attempt, as a participant said: it must hold that
                # commit. This attempt itself decided abort (its Rollbacks, its inquiries).
                nets = self._nets(facts, self._views(facts))
                said = [n for n, vote in zip(nets, votes, strict=True) if vote is Vote.COMMITTED]
                if not any(net.committed_lives for net in said):
                    raise self.world.fail(
                        f"client of {txn.transaction_id} told COMMITTED (committed earlier), "
                        f"but {[net.label for net in said]} voted COMMITTED and hold no commit"
                    )
                self.world.cover("coordinator: answered COMMITTED for an earlier attempt")
                return
            # The all-read-only path: every branch must have said READ_ONLY (rule 8).
            if (
                not txn.one_phase
                and not facts.decision_requested
                and any(v is not Vote.READ_ONLY for v in votes)
            ):
                raise self.world.fail(
                    f"client of {txn.transaction_id} told COMMITTED without a decision "
                    f"record, but the votes were {[v.value if v else None for v in votes]}"
                )
            self.coordinator_said(txn.transaction_id, True, "answered the client COMMITTED")
        elif outcome is Outcome.ABORTED:
            self.coordinator_said(txn.transaction_id, False, "answered the client ABORTED")

    def client_told(self, transaction_id: str, outcome: Outcome, reason: str) -> None:
        """An answer reached the client: it will not ask again."""
        facts = self.txns[transaction_id]
        assert facts.answer is None, "a client stops at its first answer"
        facts.answer = outcome
        run = self.world.coordinator.runs.get(transaction_id)
        facts.heard = run is not None and self._heard(facts, run)
        facts.told_met_commit = bool(facts.met_commit)
        self.world.log(f"  client of {transaction_id} told {outcome.value} ({reason})")
        self._dirty[transaction_id] = None

    def heuristic_reported(
        self, run: CoordinatorRun, index: int, outcome: str, detail: str
    ) -> None:
        """A participant's answer contradicted the attempt's decision (PersistHeuristic). No
        operator forces anything here, so it is an atomicity bug, but for README's limits:
        a Rollback of a late retry that met an earlier attempt's commit no vote told it of,
        and a Commit retried after its participant forgot the committed branch."""
        txn = run.txn
        t = txn.transaction_id
        self.heuristics.add((t, index))
        facts = self.txns[t]
        participant = txn.branch(index).participant
        view = self._view(facts, index, participant)
        lives = self.lives.get((t, index))
        if (
            outcome == bcore.HEURISTIC_COMMIT
            and txn.state is TxnState.ABORTED
            and run.attempt == facts.attempts
            and view.committed
            and (index, view.life) in facts.committed_before
            and not self._heard(facts, run)
        ):
            self._limit(
                facts,
                "a late retry's Rollback met an earlier attempt's commit no vote told it of "
                "(recorded as a heuristic commit)",
            )
            return
        if (
            outcome == bcore.HEURISTIC_HAZARD
            and txn.state in (TxnState.COMMITTING, TxnState.COMMITTED)
            and view.state is None
            and lives is not None
            and any(life.committed for life in lives.past)
        ):
            self._limit(
                facts,
                "a Commit retried after its participant forgot the committed branch "
                "(recorded as a heuristic hazard)",
            )
            return
        raise self.world.fail(
            f"atomicity: {t}/{index} reported {outcome} ({detail}) against the "
            f"{txn.state.value} decision"
        )

    def vote_sent(self, node: ParticipantNode, key: tuple[str, int], vote: BranchVote) -> None:
        facts = self.txns[key[0]]
        facts.votes_sent.setdefault(key[1], []).append(vote)
        facts.life_votes.setdefault(key[1], []).append(vote)
        self._dirty[key[0]] = None
        durable = self.branch_durable.get(key, [])
        if vote in _UPDATING_VOTES and "prepared" not in durable and "committed" not in durable:
            raise self.world.fail(
                f"persist before you speak: {node.name} voted {vote.value} for "
                f"{key[0]}/{key[1]} before its record was durable"
            )

    def commit_ack_sent(self, node: ParticipantNode, key: tuple[str, int]) -> None:
        """Rule 12 counts on it: the coordinator ends a commit on its acknowledgements, so a
        branch acknowledges a Commit only once its commit record is durable (a Rollback's
        record may be lazy: presumed abort answers a lost one)."""
        if "committed" not in self.branch_durable.get(key, []):
            raise self.world.fail(
                f"persist before you speak: {node.name} acknowledged the Commit of "
                f"{key[0]}/{key[1]} before its commit record was durable"
            )

    def branch_holds(self, node: ParticipantNode, branch: Branch) -> None:
        """After each step of a branch: a decided branch holds nothing (its commit or rollback
        released the service's reservation and the locks, or its prepare was cancelled)."""
        key = branch.key
        held = [
            what
            for what, keys in (("locks", node.locked), ("reservation", node.reserved))
            if key in keys
        ]
        if held and branch.state in bcore.DECIDED_STATES:
            raise self.world.fail(
                f"released: {node.name} holds {' and '.join(held)} of {key[0]}/{key[1]}, "
                f"which is {branch.state.value}"
            )

    def participant_crashed(self, node: ParticipantNode) -> None:
        """`node` lost its memory: a commit applied without a durable record never was."""
        self.applied = {
            (key, life)
            for key, life in self.applied
            if "committed" in self.branch_durable.get(key, [])
            or dict(self.txns[key[0]].branches).get(key[1]) != node.name
        }

    def branch_committing(self, node: ParticipantNode, branch: Branch) -> None:
        facts = self.txns[branch.transaction_id]
        lives = self.lives.get(branch.key)
        life = (branch.key, len(lives.past) if lives is not None else 0)
        if life in self.applied:
            raise self.world.fail(
                f"applied twice: {node.name} commits {branch.transaction_id}/{branch.index} "
                "again in the same life of the branch (a duplicate Commit applied again)"
            )
        self.applied.add(life)
        if lives is not None and any(life.committed for life in lives.past):
            # A second committed life: the branch's effect applied again. In one phase the
            # Prepare that began this life is the commit, and it found nothing remembered.
            if branch.one_phase:
                self._limit(
                    facts,
                    "a one-phase Prepare (a retry's, or a late copy) reached its participant "
                    "after it forgot the commit, and applied the branch again",
                )
            elif facts.met_commit:
                raise self.world.fail(
                    f"applied twice: {node.name} commits {branch.transaction_id}/{branch.index} "
                    "again (an earlier life of the branch committed), although a participant "
                    "held the transaction committed when this attempt prepared"
                )
            else:
                self._limit(facts, "a late retry no participant remembered applied a branch again")
        elif lives is not None and len(lives.past) in lives.fresh_lives:
            self._limit(facts, "a branch whose participant forgot its abort committed")
        if branch.one_phase:
            return  # a one-phase commit is its own vote
        for index, participant in facts.branches:
            votes = facts.votes_sent.get(index, [])
            if not any(v in _YES_VOTES for v in votes):
                raise self.world.fail(
                    f"no commit without all votes: {node.name} commits "
                    f"{branch.transaction_id}/{branch.index} but branch {index} ({participant}) "
                    f"sent {[v.value for v in votes] or 'no vote'}"
                )
        if not facts.said_commit:
            raise self.world.fail(
                f"{node.name} commits {branch.transaction_id}/{branch.index}, which the "
                "coordinator never decided to commit"
            )

    # ---- the per-step check ----

    def _views(self, facts: TxnFacts) -> list[BranchView]:
        """Each branch's current life."""
        return [self._view(facts, index, participant) for index, participant in facts.branches]

    def _view(self, facts: TxnFacts, index: int, participant: str) -> BranchView:
        key = (facts.transaction_id, index)
        node = self.world.participants[participant]
        branch = node.branches.get(key) if node.alive else None
        state = branch.state if branch is not None else None
        durable = self.branch_durable.get(key, [])
        votes = facts.life_votes.get(index, [])
        committed = state is BranchState.COMMITTED or "committed" in durable
        updating = (
            "prepared" in durable
            or "committed" in durable
            or any(v in _UPDATING_VOTES for v in votes)
        )
        reverted = state is BranchState.ROLLED_BACK or "rolled_back" in durable
        rolled_back = updating and reverted
        tombstone = reverted and not updating
        lives = self.lives.get(key)
        life = len(lives.past) if lives is not None else 0
        label = f"branch {index} ({participant})" + (f" life {life}" if life else "")
        return BranchView(label, state, committed, updating, rolled_back, life, tombstone)

    def _every(self, transaction_id: str, index: int, view: BranchView) -> list[BranchView]:
        """Every life of a branch, the current one (`view`) last."""
        lives = self.lives.get((transaction_id, index))
        return [*(lives.past if lives is not None else []), view]

    def _nets(self, facts: TxnFacts, views: list[BranchView]) -> list[Net]:
        """Each branch over all its lives."""
        nets: list[Net] = []
        for (index, participant), view in zip(facts.branches, views, strict=True):
            every = self._every(facts.transaction_id, index, view)
            updating = [life for life in every if life.updating]
            committed = sum(life.committed for life in every)
            reverted = bool(updating) and not committed and all(u.rolled_back for u in updating)
            label = f"branch {index} ({participant})"
            nets.append(Net(label, committed, bool(updating), reverted))
        return nets

    def check_step(self) -> None:
        if not self._dirty:
            return
        dirty = list(self._dirty)
        self._dirty.clear()
        for transaction_id in dirty:
            facts = self.txns.get(transaction_id)
            if facts is not None and facts.began:
                self._check(facts)

    def _check(self, facts: TxnFacts) -> None:
        fail = self.world.fail
        t = facts.transaction_id
        views = self._views(facts)
        nets = self._nets(facts, views)
        committed = [n.label for n in nets if n.committed_lives]
        reverted = [n.label for n in nets if n.reverted]
        if committed and reverted:
            raise fail(f"atomicity: {t} has {committed} committed and {reverted} rolled back")
        if facts.said_commit and facts.said_abort:
            raise fail(
                f"decision changed: the coordinator {facts.said_commit} and "
                f"{facts.said_abort} for {t}"
            )
        # What the client was told first, for the clearest message; then anything else the
        # coordinator said (its status, a resolved UNKNOWN, an inquiry's answer) is held too.
        if facts.answer is Outcome.COMMITTED and reverted:
            raise fail(f"decision changed: client told {t} COMMITTED, but {reverted} rolled back")
        if facts.answer is Outcome.ABORTED and committed:
            said = f"client told {t} ABORTED"
            self._aborted_but_committed(facts, views, said, facts.heard, facts.told_met_commit)
        # This attempt's decision, against the branch lives it governs: its commit, those that
        # began before it (a life that began later never voted for it); its abort, all but
        # those an earlier attempt committed before this one began, and those that began after
        # their participant forgot the abort (a limit, counted where the branch commits).
        if facts.said_commit:
            against = [
                view.label
                for (index, _), view in zip(facts.branches, views, strict=True)
                if view.rolled_back and self._began_before(t, index, facts.said_commit_seq)
            ]
            if against:
                raise fail(
                    f"decision changed: the coordinator {facts.said_commit} for {t}, but "
                    f"{against} rolled back"
                )
        if facts.said_abort:
            against = [
                view.label
                for (index, _), view in zip(facts.branches, views, strict=True)
                if view.committed
                and (index, view.life) not in facts.committed_before
                and not self._forgot_abort(t, index, view.life)
            ]
            if against:
                raise fail(
                    f"decision changed: the coordinator {facts.said_abort} for {t}, but "
                    f"{against} committed"
                )
        if not facts.said_commit:
            return
        # Durability: a commit the coordinator stands by survives any crash from here on.
        if facts.one_phase:
            read_only = BranchVote.READ_ONLY in facts.votes_sent.get(0, [])
            if not nets[0].committed_lives and not read_only:
                raise fail(
                    f"durability: the coordinator {facts.said_commit} for one-phase {t} "
                    f"(client: {_outcome(facts.answer)}), and the commit is lost "
                    f"({views[0].label} is {_state(views[0].state)} with durable records "
                    f"{self.branch_durable.get((t, 0), [])})"
                )
        elif facts.decision_requested and t not in self.decisions_durable:
            raise fail(
                f"durability: the coordinator {facts.said_commit} for {t} without a durable "
                "decision record"
            )

    def _forgot_abort(self, transaction_id: str, index: int, life: int) -> bool:
        lives = self.lives.get((transaction_id, index))
        return lives is not None and life in lives.fresh_lives

    def _began_before(self, transaction_id: str, index: int, seq: int) -> bool:
        lives = self.lives.get((transaction_id, index))
        began = lives.began_seq if lives is not None else 0
        return began == 0 or began < seq

    def _aborted_but_committed(
        self, facts: TxnFacts, views: list[BranchView], said: str, heard: bool, met: bool
    ) -> None:
        """`said` ABORTED, and a branch has a committed life: a violation, unless README's
        limits of a late retry explain every such life (then counted)."""
        t = facts.transaction_id
        unexplained: list[str] = []
        earlier = forgot_abort = probe = False
        for (index, _), view in zip(facts.branches, views, strict=True):
            lives = self.lives.get((t, index))
            every = self._every(t, index, view)
            for number, life in enumerate(every):
                if not life.committed:
                    continue
                if facts.one_phase and any(later.tombstone for later in every[number + 1 :]):
                    probe = True  # the probe's Rollback left a tombstone in a later life
                elif (index, number) in facts.committed_before and not heard:
                    earlier = True
                elif lives is not None and number in lives.fresh_lives:
                    forgot_abort = True
                else:
                    unexplained.append(life.label)
        if unexplained:
            raise self.world.fail(f"decision changed: {said}, but {unexplained} committed")
        if earlier and not met:
            self._limit(
                facts,
                "a late retry whose Prepares reached no participant holding the commit aborted "
                "(an earlier attempt committed; all forgot, or were down or unreachable)",
            )
        elif earlier:
            self._limit(
                facts,
                "a late retry aborted although a Prepare of it reached a participant holding "
                "the commit (its VOTE_COMMITTED lost or late, as from one down)",
            )
        if forgot_abort:
            self._limit(facts, "a branch whose participant forgot its abort committed")
        if probe:
            # docs/architecture.md, the one-phase probe: "A probe that arrived after the branch
            # was forgotten would leave a tombstone and report 'rolled back' for a branch that
            # had committed."
            self._limit(
                facts,
                "a one-phase probe reached its participant after it forgot the commit "
                "(resolved ABORTED)",
            )

    # ---- bounds on time, before every step ----

    def check_bounds(self) -> None:
        """What a timer ends has ended by its time: a late timer (one that read a stepped wall
        clock) shows here, at the first step after it was due, before it fires."""
        world = self.world
        now = world.now_ms
        coordinator = world.coordinator
        if coordinator.alive:
            for transaction_id, run in coordinator.runs.items():
                if run.txn.state is TxnState.PREPARING and now > run.due_ms:
                    raise world.fail(
                        f"bounded: the coordinator still has {transaction_id} preparing "
                        f"{now - run.began_ms} ms after it began, past its timeout of "
                        f"{run.due_ms - run.began_ms} ms"
                    )
        lease_ms = world.timing.lease_unvoted_ms
        timing = world.timing
        unasked_ms = max(timing.in_doubt_after_ms, timing.inquiry_backoff_ms_max)
        for node in world.participants.values():
            if not node.alive:
                continue
            for key, since in node.unasked_since_ms.items():
                branch = node.branches.get(key)
                in_doubt = branch is not None and branch.state is BranchState.PREPARED
                if in_doubt and key not in node.inquiries and now - since > unasked_ms:
                    raise world.fail(
                        f"bounded: {node.name} has not asked about in-doubt {key[0]}/{key[1]} "
                        f"for {now - since} ms, past {unasked_ms} ms"
                    )
            for key, work in node.work.items():
                branch = node.branches.get(key)
                preparing = branch is not None and branch.state is BranchState.PREPARING
                if preparing and now - work.started_ms > lease_ms:
                    raise world.fail(
                        f"bounded: {node.name} still has {key[0]}/{key[1]} preparing, holding "
                        f"its locks, {now - work.started_ms} ms after its prepare began, past "
                        f"its lease of {lease_ms} ms"
                    )

    # ---- after healing ----

    def check_settled(self) -> None:
        """Liveness: everything decided, and decided the way the clients were told."""
        world = self.world
        fail = world.fail
        self.touch_all()
        self.check_step()
        for transaction_id, run in world.coordinator.runs.items():
            if run.txn.state not in TERMINAL_STATES:
                raise fail(
                    f"liveness: coordinator still has {transaction_id} {run.txn.state.value} "
                    "after healing"
                )
        for node in world.participants.values():
            for (t, index), branch in node.branches.items():
                if branch.state in (BranchState.PREPARING, BranchState.PREPARED):
                    raise fail(
                        f"liveness: {node.name} still has {t}/{index} {branch.state.value} "
                        "after healing"
                    )
        for node in world.participants.values():
            # Nothing is left preparing or prepared (above), so nothing may be held.
            for key in sorted(node.locked | node.reserved):
                holder = node.branches.get(key)
                raise fail(
                    f"released: {node.name} still holds what {key[0]}/{key[1]} took after "
                    f"healing ({_state(holder.state if holder is not None else None)})"
                )
        for facts in self.txns.values():
            if not facts.began:
                raise fail(f"liveness: {facts.transaction_id} was never started")
            kept = world.coordinator.runs.get(facts.transaction_id)
            final = kept.txn.answer if kept is not None else None
            views = self._views(facts)
            must_commit = Outcome.COMMITTED in (facts.answer, final)
            for view, net in zip(views, self._nets(facts, views), strict=True):
                if must_commit and net.updating and not net.committed_lives:
                    raise fail(
                        f"liveness: {facts.transaction_id} committed (client: "
                        f"{_outcome(facts.answer)}, coordinator: {_outcome(final)}) but "
                        f"{view.label} ended {_state(view.state)}"
                    )
            if kept is not None and final is Outcome.ABORTED:
                heard = self._heard(facts, kept)
                said = f"{facts.transaction_id} aborted (coordinator: {_outcome(final)})"
                self._aborted_but_committed(facts, views, said, heard, bool(facts.met_commit))

    def result(self) -> RunResult:
        from dtm.sim.world import RunResult

        world = self.world
        answers = [facts.answer for facts in self.txns.values()]
        return RunResult(
            seed=world.seed,
            transactions=len(self.txns),
            committed=answers.count(Outcome.COMMITTED),
            aborted=answers.count(Outcome.ABORTED),
            unknown=answers.count(Outcome.UNKNOWN),
            unanswered=answers.count(None),
            crashes=world.crashes,
            drops=world.drops,
            duplicates=world.duplicates,
            messages=world.messages,
            steps=world.step,
            heal_steps=world.heal_steps,
            sim_ms=world.now_ms,
            resubmits=world.resubmits,
            clock_steps=world.clock_steps,
            coverage=tuple(sorted(world.coverage.items())),
            limits=tuple(sorted(world.limits.items())),
        )


def _state(state: BranchState | None) -> str:
    return state.value if state is not None else "unknown"


def _outcome(outcome: Outcome | None) -> str:
    return outcome.value if outcome is not None else "none"
