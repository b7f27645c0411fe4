"""Settings of the chaos runs (small timeouts, so that a run takes a second or two) and the
shop every chaos cluster starts with.

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

from dtm import crashpoints, invariants

#: Services ask the coordinator about a prepared branch after this long (default 2,000 ms).
IN_DOUBT_AFTER_MS = 300
# Checkpoints every 200 records instead of 20,000, in every process: a run of the matrix then
# meets one every few runs and a random-kill run several, so kills land before, during and
# after checkpoint writes (the segment is written on a worker thread while records are held).
CHECKPOINT_EVERY_RECORDS = 200
PREPARE_TIMEOUT_MS = 1_000
TRANSACTION_TIMEOUT_MS = 3_000
#: A client waits this long for Submit (the transaction's timeout plus a margin).
SUBMIT_TIMEOUT_S = 5.0
SETTLE_TIMEOUT_S = 30.0
SETTLE_POLL_S = 0.05
#: An armed target still running this long after its burst did not reach its crash point.
CRASH_GRACE_S = 0.5
#: A burst that did not reach the crash point is followed by at most this many more.
BURSTS_MAX = 2
ORDERS_PER_BURST = 10
#: Orders of a burst start at seeded offsets within this window, so a crash finds
#: transactions at different steps.
BURST_SPREAD_S = 0.15
# Calls in flight of the batching client odd seeds use (see batch_in_flight_of).
BATCH_IN_FLIGHT = 2
#: How long a process armed with a *.during_recovery point may take to reach it.
RECOVERY_CRASH_TIMEOUT_S = 20.0
#: A retry whose outcome is still open (UNAVAILABLE: a channel still reconnecting) is tried
#: again, spaced out (OrderClient.submit_until_known).
RETRY_ATTEMPTS = 5
RETRY_SPACING_S = 0.2
#: Bound on one run, whatever happens inside it.
RUN_TIMEOUT_S = 120.0
#: A cluster is replaced by a fresh one after this many orders, so that reading the services'
#: full state after each run stays cheap.
CLUSTER_ORDERS_MAX = 10_000

# Participants served unary calls: a run's services may start with `[participant] batch =
# false` (UNARY_FLAG), so that they register without the batch capability and the coordinator
# sends them one Prepare, Commit or Rollback per branch (its unary port, the plain contract's
# path), and their logs fsync on a sync thread (wal_sync "auto"). Drawn per crash-matrix and
# random-kill run (`unary_services`): this share of them with all four services unary, and
# this share with one of them unary (mixed: Exchange to three, unary calls to one, in the same
# transactions). Runs of one mode run one after another (`plan`): a switch restarts services.
PARTICIPANTS_UNARY_SHARE = 0.2
PARTICIPANTS_MIXED_SHARE = 0.1
#: The services' flag (the configuration key `batch`) that leaves the capability out.
UNARY_FLAG = "--no-batch"

# Random SIGKILL runs
LOAD_S = 2.0
LOAD_CLIENTS = 4
ORDERS_PER_CLIENT_MAX = 150
#: Pause after a Submit that did not commit (a process may be down): no tight loop.
CLIENT_ERROR_PAUSE_S = 0.1
NEMESIS_INTERVAL_S = (0.2, 0.7)
NEMESIS_DOWNTIME_S = (0.0, 0.3)
#: Relative chance of each process being the nemesis's victim, in PROCESSES order.
NEMESIS_WEIGHTS = (4.0, 1.5, 1.5, 1.5, 1.5)

# The fault soak (`--soak SECONDS`, `make chaos-fault-soak`): one long random-kill run, more
# clients, a SIGKILL every SOAK_FAULT_EVERY_S (design/reliability.md: "soak: concurrent
# clients with a fault every 10 s"), with the latency of every Submit reported.
SOAK = "soak"
SOAK_FAULT_EVERY_S = 10.0
SOAK_CLIENTS = 8

# Late-retry runs
#: The coordinator of the late-retry cluster remembers only this many finished transactions
#: (`finished_kept`, 20,000 by default): a few more orders push a run's out of its memory.
LATE_FINISHED_KEPT = 8
#: The load before the wave (LOAD_S in a random-kill run): fewer orders, as many kinds of end.
LATE_LOAD_S = 1.5
#: Rounds of those orders at most (each LATE_FINISHED_KEPT + 2 orders, concurrent).
LATE_PUSH_ROUNDS_MAX = 5
#: The wave: every order of the run again, each started at a seeded offset within this.
LATE_WAVE_SPREAD_S = 1.5
#: The wave's nemesis acts during this first part of it, then the rest runs unharmed.
LATE_NEMESIS_S = 1.0
#: What it does to its one victim each time, and how often (relative): SIGKILL (restarted
#: after the fault's duration), SIGSTOP (then SIGCONT: a participant that hangs), or a
#: participant's fault injection FAULT_MODE_DOWN (every call answered UNAVAILABLE).
LATE_FAULTS = ("kill", "stop", "down")
LATE_FAULT_WEIGHTS = (4.0, 3.0, 3.0)
#: Relative chance of each process being the wave's victim, in PROCESSES order (the
#: coordinator is only ever SIGKILLed).
LATE_VICTIM_WEIGHTS = (1.0, 2.0, 2.0, 2.0, 2.0)
LATE_FAULT_S = (0.2, 0.6)
LATE_FAULT_GAP_S = (0.05, 0.3)
#: A late retry whose outcome is still open is submitted again, up to this many times, with
#: this backoff: enough to outlast the nemesis and the restarts it causes.
LATE_RETRY_ATTEMPTS = 25
LATE_RETRY_BACKOFF_S = (0.1, 0.5)
#: Heuristic outcomes are read this long after the wave's processes were healed: the time a
#: Rollback still being retried needs to reach its branch (a heuristic commit was recorded
#: when it did). Its retries back off from 50 ms; five at most.
LATE_DRAIN_S = 1.0
#: Default --late-runs: one late-retry run per this many random-kill runs.
LATE_RUNS_PER_KILL_RUNS = 10
#: The plan's marker of a late-retry run (None marks a random-kill run).
LATE = "late"
_TITLES = {
    LATE: "late retries after kills",
    SOAK: f"fault soak: a SIGKILL every {SOAK_FAULT_EVERY_S:g} s",
}

LOG_TAIL_LINES = 30
#: A run slower than this prints where its time went.
SLOW_RUN_S = 4.0

# ---- the shop every chaos cluster starts with ----

PRICES_CENTS = {"sku-a": 150, "sku-b": 275, "sku-c": 990, "sku-rare": 5_000, "sku-none": 100}
COMMON_SKUS = ("sku-a", "sku-b", "sku-c")
RICH_ACCOUNTS = ("acct-1", "acct-2", "acct-3")
INITIAL = {
    "stock": {
        "sku-a": 10**12,
        "sku-b": 10**12,
        "sku-c": 10**12,
        # Sells out after a few orders: contention first, then every order for it refused.
        "sku-rare": 4,
        # Sold out from the start.
        "sku-none": 0,
    },
    "accounts": {
        **{account: {"balance_cents": 10**13} for account in RICH_ACCOUNTS},
        # Runs out of money after a few orders: then "insufficient funds".
        "acct-poor": {"balance_cents": 2_000},
        "acct-blocked": {"balance_cents": 10**9, "declines": True},
    },
}
#: The same, for the invariants: what every SKU and account must still be there with.
INITIAL_STATE = invariants.InitialState.of(INITIAL)
#: What a generated order is, and how often (percent); only "ok" orders can commit for sure.
ORDER_KINDS = ("ok", "rare", "no-stock", "declined", "poor")
ORDER_KIND_WEIGHTS = (60, 5, 10, 15, 10)

COMMITTED = "COMMITTED"
ABORTED = "ABORTED"
CRASH_EXIT_STATUS = crashpoints.CRASH_EXIT_STATUS

# ---- the command's exit statuses (2: argparse's, a usage error) ----

EXIT_PASSED = 0
#: A violation: of dtm's guarantees, a crash point never reached, a simulator seed failing.
EXIT_VIOLATIONS = 1
#: No violation, but runs the machine stopped (another program took a port a restarted
#: process needed): they checked less than they should, so not a pass, and not dtm's failure
#: either; each replays alone. A violation anywhere makes it EXIT_VIOLATIONS.
EXIT_ENVIRONMENT = 3
