"""The crash matrix: every crash point x the components it applies to, and how a cell runs.

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import importlib
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from dtm import crashpoints
from dtm.chaos.settings import PARTICIPANTS_MIXED_SHARE, PARTICIPANTS_UNARY_SHARE
from dtm.cluster import COORDINATOR, PROCESSES, SERVICES


@dataclass(frozen=True)
class Cell:
    """One (crash point, component) pair of the matrix."""

    point: str
    component: str

    @property
    def during_recovery(self) -> bool:
        return self.point.endswith(".during_recovery")

    def __str__(self) -> str:
        return f"{self.point}:{self.component}"


def wal_points_wired() -> bool:
    """Whether the log (the dtm.wal package) calls its crash points (they are listed before
    they are wired)."""
    wal = importlib.import_module("dtm.wal")
    package = Path(wal.__file__).parent if wal.__file__ else None
    source = "".join(path.read_text() for path in sorted(package.glob("*.py"))) if package else ""
    return all(f'"{name}"' in source for name in crashpoints.POINTS if name.startswith("wal."))


def matrix(include_wal: bool | None = None) -> list[Cell]:
    """Every (point, component) pair, in the order of `crashpoints.POINTS`."""
    if include_wal is None:
        include_wal = wal_points_wired()
    cells: list[Cell] = []
    for point in crashpoints.POINTS:
        if point.startswith("coordinator."):
            components: Sequence[str] = (COORDINATOR,)
        elif point.startswith("participant."):
            components = SERVICES
        elif point.startswith("wal.") and include_wal:
            components = PROCESSES
        else:
            continue
        cells.extend(Cell(point, component) for component in components)
    return cells


def run_modes(cell: Cell, seed: int) -> tuple[bool, bool]:
    """(lose the unsynced writes, and group commit on its own thread) for a crash-matrix run:
    half the runs lose them, and half of those use wal_sync = thread. Drawn per (cell, seed),
    not from the seed's parity, which with an even number of cells gives each cell one mode."""
    modes = random.Random(f"chaos-modes:{cell}:{seed}")
    loses = modes.random() < 0.5
    return loses, loses and modes.random() < 0.5


def unary_services(cell: Cell | str | None, seed: int) -> frozenset[str]:
    """The services a run starts with `[participant] batch = false` (settings.UNARY_FLAG): all
    four in PARTICIPANTS_UNARY_SHARE of the crash-matrix (`cell` a Cell) and random-kill
    (`cell` None) runs, one of them in PARTICIPANTS_MIXED_SHARE, none otherwise, and none in a
    late-retry or soak run. Drawn per (cell, seed), like `run_modes`, so a replay of the run
    starts its services as the run did."""
    if cell is not None and not isinstance(cell, Cell):
        return frozenset()
    draws = random.Random(f"chaos-participants:{cell if cell is not None else 'kill'}:{seed}")
    roll = draws.random()
    if roll < PARTICIPANTS_UNARY_SHARE:
        return frozenset(SERVICES)
    if roll < PARTICIPANTS_UNARY_SHARE + PARTICIPANTS_MIXED_SHARE:
        return frozenset({draws.choice(SERVICES)})
    return frozenset()


def participants_text(unary: Collection[str]) -> str:
    """How a run's services were reached: "batched", "unary" (all four), or "mixed (payment
    unary)"."""
    if not unary:
        return "batched"
    if set(unary) >= set(SERVICES):
        return "unary"
    return f"mixed ({', '.join(sorted(unary))} unary)"


def crash_count(point: str, ok_orders: int, aborting_orders: int, rng: random.Random) -> int:
    """The n of "<point>@<n>": a seeded count that a burst's orders are likely to reach, so
    that the crash hits the first, a middle or a late transaction of the burst."""
    votes = 4 * (ok_orders + aborting_orders)
    expected = {
        "coordinator.after_vote_received": votes // 2,
        "coordinator.after_client_reply": ok_orders + aborting_orders,
        "coordinator.mid_phase_two": 3 * ok_orders,
        "coordinator.after_abort_decided": aborting_orders,
        "participant.after_rollback_applied": aborting_orders // 2,
        "wal.before_fsync": ok_orders,
        "wal.after_fsync": ok_orders,
    }.get(point, ok_orders)
    if point.endswith(".during_recovery"):
        return 1  # hit once per start
    return rng.randint(1, max(1, (expected * 3) // 4))
