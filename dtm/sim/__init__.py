"""A deterministic simulator of the whole commit protocol (principles.md section 5).

The coordinator and participant cores run together in one thread over an in-memory network and
disk that drop, duplicate, reorder and delay messages and crash and restart nodes, driven by a
seed. The invariants are checked after every step; a failure names its seed and replays from it:

    python -m dtm.sim --seeds 500          # many seeds, a summary
    python -m dtm.sim --seed 42 --trace    # one seed, step by step
"""

from dtm.sim.world import (
    FaultConfig,
    InvariantViolation,
    Memory,
    NodeModel,
    RunResult,
    Timing,
    Workload,
    run_seed,
)

__all__ = [
    "FaultConfig",
    "InvariantViolation",
    "Memory",
    "NodeModel",
    "RunResult",
    "Timing",
    "Workload",
    "run_seed",
]
