"""A participant's CPU per branch on the Exchange path, in one process, without gRPC.

`make bench` runs every process on a shared box, where a few percent of one participant's CPU
is lost in the drift between runs. This drives `ParticipantServicer.Exchange` directly, as the
coordinator's calls reach it under load: each call carries `--batch` new prepares (the bench's
own operations, `bench.workload`) and the commits of the previous call's branches, the request
parsed from bytes and the answer serialized, as gRPC would. The figure is `time.process_time`
per branch (one prepare and one commit), everything the process spends on it: the engine,
locks, the service, the log's records and their fsync (on /dev/shm by default: the disk's
fsync is a cost per call, not per branch, and the noisiest one). Not included: gRPC itself
(about 1 ms of CPU per call, docs/architecture.md section 12).

`--against DIR` measures another checkout of the project the same way, this script run on its
code, in interleaved legs (one process each, alternately), and prints each leg and the ratio
of every pair. On a machine shared with other work, compare ratios of pairs, not absolute
figures: CPU time per unit of work rises with the machine's load.

    python -m bench.participant_micro                      # every service
    python -m bench.participant_micro --service orders --against /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import Workload, initial_state, participants_for
from dtm.orderflow import ORDER_PARTICIPANTS
from dtmpb.v1 import coordinator_pb2, participant_pb2
from participants.server import ParticipantConfig, ParticipantServer
from participants.server.servicer import ParticipantServicer
from participants.service import Service
from participants.services.catalog import parse_catalog


class _Context:
    """The servicer's gRPC context: the measured calls all succeed, so nothing uses it."""

    def set_trailing_metadata(self, metadata: Any) -> None:
        raise AssertionError(f"unexpected trailing metadata {metadata}")

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"unexpected abort {code}: {details}")


def _service(kind: str) -> Service[Any]:
    catalog = parse_catalog(initial_state())
    if kind == "inventory":
        from participants.services.inventory import InventoryService

        return InventoryService(catalog.stock)
    if kind == "payment":
        from participants.services.payment import PaymentService

        return PaymentService(catalog.accounts)
    if kind == "orders":
        from participants.services.orders import OrdersService

        return OrdersService()
    from participants.services.notification import NotificationService

    return NotificationService()


def _calls(kind: str, first: int, calls: int, batch: int, incarnation: str) -> list[bytes]:
    """`calls` serialized ExchangeRequests from order number `first` on: each with `batch`
    prepares and the commits of the previous call's (none before order 0)."""
    workload = Workload(participants_for(len(ORDER_PARTICIPANTS)), run_id="micro")
    position = ORDER_PARTICIPANTS.index(kind)
    requests = []
    for call in range(calls):
        start = first + call * batch
        request = participant_pb2.ExchangeRequest(participant=kind, incarnation=incarnation)
        for number in range(max(0, start - batch), start):
            order = workload.order(number % 64, number)
            request.decisions.add(
                transaction_id=order.request.transaction_id, branch=position, commit=True
            )
        for number in range(start, start + batch):
            order = workload.order(number % 64, number)
            added = request.prepares.add(
                transaction_id=order.request.transaction_id, branch=position
            )
            added.operation.CopyFrom(order.request.branches[position].operation)
        requests.append(request.SerializeToString())
    return requests


async def _measure(kind: str, args: argparse.Namespace, data_dir: Path) -> list[float]:
    """Microseconds of CPU per branch, one figure per round after the warmup."""
    server = ParticipantServer(_service(kind), ParticipantConfig(data_dir=data_dir))
    servicer = ParticipantServicer(server)
    context: Any = _Context()
    parse = participant_pb2.ExchangeRequest.FromString
    figures: list[float] = []
    number = 0
    try:
        for round_number in range(args.warmup + args.rounds):
            calls = _calls(kind, number, args.calls, args.batch, server.engine.incarnation)
            number += args.calls * args.batch
            gc.collect()  # the previous round's garbage is not this one's cost
            started = time.process_time()
            for payload in calls:
                response = await servicer.Exchange(parse(payload), context)
                response.SerializeToString()
            spent = time.process_time() - started
            refused = [v for v in response.votes if v.vote != coordinator_pb2.VOTE_PREPARED]
            assert not refused, refused[0]
            if round_number >= args.warmup:
                figures.append(spent / (args.calls * args.batch) * 1e6)
    finally:
        await server.wal.close()
    return figures


def _leg(kind: str, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory(dir=args.data_dir) as data_dir:
        return asyncio.run(_measure(kind, args, Path(data_dir)))


def _leg_in(tree: Path, kind: str, args: argparse.Namespace) -> float:
    """The median of one leg run by a new process on the code of checkout `tree`."""
    command = [sys.executable, __file__, "--json", "--service", kind]
    for option in ("batch", "calls", "rounds", "warmup"):
        command += [f"--{option}", str(getattr(args, option))]
    if args.data_dir is not None:
        command += ["--data-dir", args.data_dir]
    # The checkout's own code first, generated modules included (an installed editable
    # package may point at another one).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "generated")]))
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    figures: list[float] = json.loads(output)
    return statistics.median(figures)


def _compare(kind: str, args: argparse.Namespace) -> None:
    here, there = Path(__file__).resolve().parents[1], Path(args.against).resolve()
    mine: list[float] = []
    theirs: list[float] = []
    for leg in range(args.legs):
        # Alternate which goes first, so that a drift of the machine favours neither.
        for tree, sink in [(here, mine), (there, theirs)][:: 1 if leg % 2 == 0 else -1]:
            sink.append(_leg_in(tree, kind, args))
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    print(f"{kind}: this checkout, us/branch per leg: " + " ".join(f"{v:.1f}" for v in mine))
    print(f"{kind}: {there}: " + " ".join(f"{v:.1f}" for v in theirs))
    print(
        f"{kind}: this / that per pair: "
        + " ".join(f"{r:.3f}" for r in ratios)
        + f"; median {statistics.median(ratios):.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", choices=[*ORDER_PARTICIPANTS, "all"], default="all")
    parser.add_argument("--batch", type=int, default=32, help="prepares (and commits) per call")
    parser.add_argument("--calls", type=int, default=20, help="Exchange calls per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="rounds not counted")
    parser.add_argument("--data-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--against", metavar="DIR", help="another checkout to compare with")
    parser.add_argument("--legs", type=int, default=6, help="legs of each side with --against")
    parser.add_argument("--json", action="store_true", help="one leg's figures, as JSON")
    args = parser.parse_args(argv)
    kinds = ORDER_PARTICIPANTS if args.service == "all" else (args.service,)
    for kind in kinds:
        if args.json:
            print(json.dumps(_leg(kind, args)))
        elif args.against:
            _compare(kind, args)
        else:
            figures = _leg(kind, args)
            print(
                f"{kind}: {statistics.median(figures):.1f} us of CPU per branch (median of "
                f"{len(figures)} rounds, min {min(figures):.1f}, max {max(figures):.1f})"
            )


if __name__ == "__main__":
    main()
