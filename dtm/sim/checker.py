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
    record is durable [10];
  durability: once the coordinator stands by a commit, its decision record is durable (or, for
    one phase, the participant's commit record is), so no crash can lose it [3, 9].
After healing: nothing left in doubt or preparing, every coordinator transaction terminal, and
every updating branch agrees with what the client and the coordinator said [11, 12, 13].

A client that got no answer submits again under the same id [14]. Joining a running attempt or
answering a finished one again must agree with it; a transaction the coordinator forgot in a
restart (no commit on record: presumed abort) is run again as a new attempt. What the earlier
attempt's coordinator said lived only in its memory and in its messages, so the decisions are
held per attempt, while every branch (and so every message the earlier attempt sent, delivered
late or not) is held to one outcome across all attempts: that is where a new attempt reusing an
earlier one's vote shows. Running again a transaction whose commit decision is durable is a
violation of its own: recovery must resume it.

"After every step" is exact but cheap: a step marks the transactions it touched (a branch
event, a record made durable, a vote, a decision; a crash or restart marks all), and only those
are re-checked, since no other transaction's facts can have changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dtm.core.branch import Branch, BranchState, BranchVote
from dtm.core.transaction import TERMINAL_STATES, Outcome, Transaction, Vote
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
    votes_sent: dict[int, list[BranchVote]] = field(default_factory=dict)


@dataclass(slots=True)
class BranchView:
    label: str
    state: BranchState | None
    committed: bool
    updating: bool
    rolled_back: bool


class Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.txns: dict[str, TxnFacts] = {}
        self.branch_durable: dict[tuple[str, int], list[msg.BranchRecordKind]] = {}
        self.decisions_durable: dict[str, None] = {}
        self.business: dict[tuple[str, int], tuple[BranchVote, str]] = {}
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
            if t in self.decisions_durable:
                raise self.world.fail(
                    f"recovery: {t} runs again, but its commit decision is durable "
                    f"({facts.said_commit or 'decided'}): the restarted coordinator forgot it"
                )
            self.world.cover("coordinator: a forgotten transaction runs again")
            self.world.log(f"  {t}: attempt {facts.attempts}; the earlier one was forgotten")
            # What the forgotten attempt's coordinator said, it said from memory now lost.
            facts.said_commit = facts.said_abort = ""
            facts.decision_requested = False
            # The votes stay: they are the branches' own (a duplicate Prepare answers with one).
        facts.began = True
        facts.branches = branches
        facts.one_phase = txn.one_phase

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
                self.decisions_durable[record.transaction_id] = None
            self._dirty[record.transaction_id] = None

    def coordinator_said(self, transaction_id: str, commit: bool, evidence: str) -> None:
        facts = self.txns[transaction_id]
        if commit and not facts.said_commit:
            facts.said_commit = evidence
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
            if not txn.one_phase and not facts.decision_requested:
                # The all-read-only path: every branch must have said READ_ONLY (rule 8).
                votes = [run.votes_received.get(b.index) for b in txn.branches]
                if any(v is not Vote.READ_ONLY for v in votes):
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
        self.world.log(f"  client of {transaction_id} told {outcome.value} ({reason})")
        self._dirty[transaction_id] = None

    def vote_sent(self, node: ParticipantNode, key: tuple[str, int], vote: BranchVote) -> None:
        facts = self.txns[key[0]]
        facts.votes_sent.setdefault(key[1], []).append(vote)
        self._dirty[key[0]] = None
        durable = self.branch_durable.get(key, [])
        if vote in _UPDATING_VOTES and "prepared" not in durable and "committed" not in durable:
            raise self.world.fail(
                f"persist before you speak: {node.name} voted {vote.value} for "
                f"{key[0]}/{key[1]} before its record was durable"
            )

    def branch_committing(self, node: ParticipantNode, branch: Branch) -> None:
        if branch.one_phase:
            return  # a one-phase commit is its own vote
        facts = self.txns[branch.transaction_id]
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
        views: list[BranchView] = []
        for index, participant in facts.branches:
            key = (facts.transaction_id, index)
            node = self.world.participants[participant]
            branch = node.branches.get(key) if node.alive else None
            state = branch.state if branch is not None else None
            durable = self.branch_durable.get(key, [])
            votes = facts.votes_sent.get(index, [])
            committed = state is BranchState.COMMITTED or "committed" in durable
            updating = (
                "prepared" in durable
                or "committed" in durable
                or any(v in _UPDATING_VOTES for v in votes)
            )
            rolled_back = updating and (
                state is BranchState.ROLLED_BACK or "rolled_back" in durable
            )
            label = f"branch {index} ({participant})"
            views.append(BranchView(label, state, committed, updating, rolled_back))
        return views

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
        committed = [v.label for v in views if v.committed]
        reverted = [v.label for v in views if v.rolled_back]
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
            raise fail(f"decision changed: client told {t} ABORTED, but {committed} committed")
        if facts.said_commit and reverted:
            raise fail(
                f"decision changed: the coordinator {facts.said_commit} for {t}, but "
                f"{reverted} rolled back"
            )
        if facts.said_abort and committed:
            raise fail(
                f"decision changed: the coordinator {facts.said_abort} for {t}, but "
                f"{committed} committed"
            )
        if not facts.said_commit:
            return
        # Durability: a commit the coordinator stands by survives any crash from here on.
        if facts.one_phase:
            read_only = BranchVote.READ_ONLY in facts.votes_sent.get(0, [])
            if not views[0].committed and not read_only:
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
        for facts in self.txns.values():
            if not facts.began:
                raise fail(f"liveness: {facts.transaction_id} was never started")
            kept = world.coordinator.runs.get(facts.transaction_id)
            final = kept.txn.outcome if kept is not None else None
            views = self._views(facts)
            must_commit = Outcome.COMMITTED in (facts.answer, final)
            must_abort = Outcome.ABORTED in (facts.answer, final)
            for view in views:
                if must_commit and view.updating and not view.committed:
                    raise fail(
                        f"liveness: {facts.transaction_id} committed (client: "
                        f"{_outcome(facts.answer)}, coordinator: {_outcome(final)}) but "
                        f"{view.label} ended {_state(view.state)}"
                    )
                if must_abort and view.committed:
                    raise fail(
                        f"{facts.transaction_id} aborted (client: {_outcome(facts.answer)}, "
                        f"coordinator: {_outcome(final)}) but {view.label} committed"
                    )

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
            coverage=tuple(sorted(world.coverage.items())),
        )


def _state(state: BranchState | None) -> str:
    return state.value if state is not None else "unknown"


def _outcome(outcome: Outcome | None) -> str:
    return outcome.value if outcome is not None else "none"
