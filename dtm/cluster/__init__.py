"""Run the coordinator and the four order-flow services as separate real processes.

`Cluster` is what tests, the demo, chaos runs and benchmarks use: it starts every process in
its own process group (so a SIGKILL is a real crash of that process alone), sends its output to
a log file, and waits until each one answers the standard gRPC health check and the coordinator
lists all four services at their expected addresses.

Layout under the data directory (the servers keep their logs of record beside it):

    DIR/cluster.json        ports and settings, so `down` and `status` find the processes
    DIR/cluster.lock        held (flock) by `up`, `down` and the demo while they run
    DIR/pids/NAME.pid       one pidfile per process
    DIR/logs/NAME.log       each process's stdout and stderr (appended across restarts)
    DIR/initial.json        the initial stock and accounts, when given
    DIR/coordinator/, DIR/inventory/, ...   each server's own durable state

CLI (used by `make up`, `make down`, `make status`):

    python -m dtm.cluster up|down|status --data-dir DIR

`up` on a cluster that runs (wholly or partly) keeps its settings: it starts the processes
that are down as they were started, and it is refused when a flag given asks for another
setting than cluster.json records (--tls-dir on a plaintext cluster, say): `down` first.
When all five run, it checks that they are ready (each service registered at its own
address) and fails saying what is not. `up` on a stopped cluster that cluster.json records
starts it again with those settings, but those the flags give (`--tls-dir off` for
plaintext), and prints the ones it reused. A cluster.json it cannot use (unreadable, a key
it never holds, a value of the wrong type or range, a recorded initial.json gone) fails `up`
and starts nothing, unless the flags give every setting: never the defaults in its place.

`up`, `down` and the demo hold an exclusive lock on DIR/cluster.lock while they run: a second
one on the same data dir fails at once ("another dtm.cluster command is running on DIR")
instead of starting or stopping processes under the first one's feet. `status` only reads,
and takes no lock (it must not make an `up` fail).
"""

from __future__ import annotations

from dtm.cluster.command import (
    _setting_text,
    main,
)
from dtm.cluster.errors import (
    ClusterBusyError,
    ClusterError,
    ClusterLockError,
    ClusterStateError,
    PortTakenError,
)
from dtm.cluster.lock import (
    locked,
)
from dtm.cluster.ports import (
    FreePorts,
    Ports,
    free_ports,
)
from dtm.cluster.procfs import (
    _has_option,
)
from dtm.cluster.runner import (
    Cluster,
)
from dtm.cluster.settings import (
    COORDINATOR,
    DATA_DIR_DEFAULT,
    MODULES,
    PROCESSES,
    SERVICES,
)

__all__ = [
    "COORDINATOR",
    "DATA_DIR_DEFAULT",
    "MODULES",
    "PROCESSES",
    "SERVICES",
    "Cluster",
    "ClusterBusyError",
    "ClusterError",
    "ClusterLockError",
    "ClusterStateError",
    "FreePorts",
    "PortTakenError",
    "Ports",
    "_has_option",
    "_setting_text",
    "free_ports",
    "locked",
    "main",
]
