"""`make chaos`: kill real processes at every named crash point, and at random, and check that
nothing a client was told is ever lost, and that the order flow stays consistent.

Three kinds of runs, all against the coordinator and the four services as real processes on
loopback ports (`dtm.cluster.Cluster`, reused from run to run while it stays healthy):

* The crash matrix: every crash point of `dtm.crashpoints` x every component it applies to
  (coordinator.* in the coordinator, participant.* in each of the four services, wal.* in all
  five when dtm/wal/ calls them) x seeds. A run restarts its target with DTM_CRASH_AT armed
  at a seeded count ("<point>@<n>", so the crash hits a different transaction each time),
  submits a seeded burst of concurrent orders (some commit; some abort: out of stock, declined
  card, insufficient funds; odd seeds send them in SubmitBatch calls, even seeds one by one),
  waits for the target to die with status 86, restarts it plainly and lets everything settle.
  Points hit while a process recovers (*.during_recovery) are reached by SIGKILLing the target
  mid-burst and restarting it armed.
* Random SIGKILLs under load: several clients submit orders back to back for a few seconds
  while a seeded nemesis SIGKILLs the coordinator or a service at random times and restarts it
  (odd seeds: the clients share one client that sends SubmitBatch calls).
* Late retries (after the random-kill runs, on a cluster of their own whose coordinator
  remembers only its last LATE_FINISHED_KEPT finished transactions, `finished_kept`): a
  random-kill run, checked as one; then a few more orders push every order of the run out of
  the coordinator's memory, and EVERY order of the run is submitted again (same transaction
  id, same content) while a seeded nemesis SIGKILLs, SIGSTOPs or fault-injects one process
  (FAULT_MODE_DOWN) during the first part of that wave. The coordinator no longer knows any of
  them: the participants' records answer (`check_late_retry`).

Participants served unary calls: a seeded share of the crash-matrix and random-kill runs
(drawn per run, `unary_services`: 1 in 5 with all four services, 1 in 10 with one of them)
start the services with `[participant] batch = false` (--no-batch), so that they register
without the batch capability: the coordinator calls them one Prepare, Commit or Rollback per
branch (its unary port), and their logs fsync on a sync thread (wal_sync "auto"). Runs of one
mode run one after another (a switch restarts services); the run's line says "participants
unary" or "participants mixed (payment unary)", its check fails if a service registered
otherwise, and its replay starts the services the same way.

After every run, once everything has healed and settled:

* every invariant of design/reliability.md holds over the services' state (`dtm.invariants`);
* every order the client was told COMMITTED is CONFIRMED, with one capture of its amount and
  one notification, and stays so in every later run (durability);
* no order the client was told ABORTED is CONFIRMED;
* every order whose answer was unknown (UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED, ...) is
  submitted again with the same transaction id: the answer must be COMMITTED or ABORTED and
  match what the services show, and after that retry has settled nothing is applied twice.

After a late-retry wave, in addition (once it has settled, and the coordinator has had
LATE_DRAIN_S to deliver its last Rollbacks):

* an order the client learned COMMITTED is answered COMMITTED (an answer that leaves the
  outcome open, UNAVAILABLE say, is retried until it is COMMITTED or ABORTED), never ABORTED;
* an order the client learned ABORTED never becomes CONFIRMED, with one exception, the known
  limit of README "Failure semantics" (a client retries very late): where no participant kept
  a record of the abort (a prepare that reached none of them, a lazy record lost), the retry
  runs afresh and may commit. Such reruns are counted apart, not as violations, and only when
  no service showed a rolled-back or refused branch of the transaction before the wave;
* every invariant still holds, every confirmed order has one capture and one notification,
  a branch decided before the wave is still in that state, and the coordinator recorded no
  heuristic outcome (a retry's Rollback to a committed branch was once recorded as one).

Each run prints one line; a summary table and the totals follow. The last line is always
`chaos: <runs> runs, <violations> violations` (then `, <E> environment problems (not
violations...)` when the machine stopped runs: another program took a port a restarted process
needed). The exit status is 0 when every run passed, 1 with any violation, and 3 with no
violation but environment problems (those runs checked less; each replays alone).
A violation prints its seed, its point and the tails of the relevant process logs, and a
command that replays that run alone (same point, count, orders and kill schedule, on a fresh
cluster; timing on real processes is never exactly the same). Defaults: --kill-runs is
--runs / 10; --late-runs is --kill-runs / LATE_RUNS_PER_KILL_RUNS; --sim-seeds 0 (with
M > 0, dtm.sim.run_seed runs seeds S..S+M-1 and its violations count in the total).

    python -m dtm.chaos --runs N [--seed S] [--kill-runs K] [--late-runs L] [--sim-seeds M]
    python -m dtm.chaos --replay coordinator.mid_phase_two:coordinator:1017
    python -m dtm.chaos --replay kill:2003
    python -m dtm.chaos --replay late:2103
"""

from __future__ import annotations

from dtm.chaos.checks import (
    LATE_ABORTED,
    LATE_COMMITTED,
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
    read_branch_states,
)
from dtm.chaos.command import (
    by_participants,
    main,
    parse_replay,
    plan,
)
from dtm.chaos.matrix import (
    Cell,
    matrix,
    participants_text,
    run_modes,
    unary_services,
)
from dtm.chaos.orders import (
    ClientRecord,
)
from dtm.chaos.report import (
    never_reached,
    print_violation,
)
from dtm.chaos.result import (
    RunResult,
    latency_summary,
)
from dtm.chaos.session import (
    Session,
)
from dtm.chaos.settings import (
    ABORTED,
    COMMITTED,
    CRASH_EXIT_STATUS,
    LATE,
    NEMESIS_INTERVAL_S,
    NEMESIS_WEIGHTS,
    SOAK,
)

__all__ = [
    "ABORTED",
    "COMMITTED",
    "CRASH_EXIT_STATUS",
    "LATE",
    "LATE_ABORTED",
    "LATE_COMMITTED",
    "LATE_RERUN",
    "NEMESIS_INTERVAL_S",
    "NEMESIS_WEIGHTS",
    "SOAK",
    "Cell",
    "ClientRecord",
    "RunResult",
    "Session",
    "abort_records",
    "branches_of",
    "by_participants",
    "check_after_late_retries",
    "check_branch_outcomes",
    "check_branches_kept",
    "check_client_outcomes",
    "check_late_retry",
    "check_ledger",
    "check_participant_modes",
    "check_retry",
    "latency_summary",
    "learned_outcome",
    "main",
    "matrix",
    "never_reached",
    "orders_by_id",
    "parse_replay",
    "participants_text",
    "plan",
    "print_violation",
    "read_branch_states",
    "run_modes",
    "unary_services",
]
