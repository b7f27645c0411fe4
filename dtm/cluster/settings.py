"""The processes of a cluster, their modules, and the bounds of starting and stopping them.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import random
from pathlib import Path

from dtm import limits

COORDINATOR = "coordinator"
SERVICES = ("inventory", "orders", "payment", "notification")
#: Every process, in start order: the coordinator first, so services register at once.
PROCESSES = (COORDINATOR, *SERVICES)

MODULES = {
    COORDINATOR: "dtm.coordinator.server",
    **{name: f"participants.services.{name}" for name in SERVICES},
}

#: Where `make up` (and `up` without --data-dir) keeps the cluster; `dtm trace` reads its
#: logs there by default.
DATA_DIR_DEFAULT = Path(".dtm-data")
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
#: The longest --timeout and --grace: far above any start or stop, and a bound on how long a
#: command may wait (1e300 s was accepted: finite, but an `up` that never ends).
WAIT_S_MAX = 3_600.0
# Readiness is observed by polling (a process exposes no event a parent could await); short
# enough to add little to a start, long enough not to spin.
POLL_INTERVAL_S = 0.05
HEALTH_CALL_TIMEOUT_S = 0.5
LOG_TAIL_LINES = 25
#: How much of the end of a service's log is read for its "registered" line since its last
#: start (`Cluster._registered_since_start`): a bound on one read, on a log kept across runs.
LOG_SCAN_BYTES = 1 << 20
#: The start of the line `_spawn` writes into a process's log before each start.
START_MARKER = "\n==== "
#: The servers' flag for their Prometheus /metrics endpoint (HOST:PORT).
METRICS_FLAG = "--metrics-listen"
#: How many times one start moves a process to another free port after another program took
#: the one chosen before the process bound it (FreePorts): enough for a busy machine, bounded
#: so that a process that cannot bind anywhere still fails.
PORT_MOVES_MAX = 3
#: free_ports picks from [PORT_FLOOR, start of the ephemeral range): above the well-known
#: ports and the usual fixed ones (the default /metrics ports 9100..9104 among them).
PORT_FLOOR = 10000
EPHEMERAL_RANGE_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
# Its own generator: a test that seeds the module-level one must not make two runs pick
# the same ports.
_random = random.SystemRandom()
#: The largest recorded *_timeout_ms, as the coordinator's own settings allow.
MS_MAX = limits.TRANSACTION_TIMEOUT_MS_MAX
