"""Benchmarks of dtm against baselines measured in the same run on the same box.

`python -m bench.run` (`make bench`) measures committed transactions per second and latency of
the real coordinator and services, as deployed (separate processes, durable logs), next to two
baselines: a raw unary gRPC echo and a naive two-phase-commit shape with nothing logged.
`python -m bench.plot` (`make bench-plot`) runs a small sweep and draws it.

Modules:
    run        the CLI: options, the three measurements in order, table and JSON
    stats      latency percentiles and the outcome tally of one measurement window
    harness    the closed-loop client driver shared by every measurement
    workload   the order requests and the initial stock and money of a run
    baselines  the echo and naive-2PC servers, and their measurements
    measure    the dtm measurement: cluster, extra instances, load, settling, invariants
    instance   extra instances of the order-flow services under other names (N > 4)
    checks     the invariant check of the final state, adapted to the branches used
    hooks      fsyncs and messages per transaction from the servers' /metrics counters
    procs      server processes the bench starts itself, always stopped on the way out
    report     the results document, its JSON files and the summary table
    plot       the sweep and its PNGs
"""
