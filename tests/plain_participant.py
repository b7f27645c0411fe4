"""A participant written as a developer in another language would write it: from the .proto
files and the docs alone, on the generated stubs, with no part of the SDK (`participants/`)
or of `dtm`. It does the least the contract asks (participant.proto, "The plain unary
contract"): it registers, answers the unary Prepare, Commit and Rollback, persists before it
answers, and asks QueryOutcome about branches it has held prepared too long.

The business is a ledger of points: a branch's operation is a dtm.v1.StockLine whose quantity
is the points it takes; it is refused when the balance cannot cover them. Its sku selects a
test behaviour (deterministic, so a replay of the same request does the same):

    "ok"          take the points
    "refuse"      vote REFUSED
    "slow:MS"     wait MS milliseconds before voting (past the coordinator's deadline)
    "hold"        answer Commit and Rollback UNAVAILABLE while the file DATA_DIR/hold exists
    "novote"      answer Prepare with no vote, as a developer who forgot to set it would

Its whole state is one JSON file, replaced atomically and fsynced before every answer that
depends on it. Run: python tests/plain_participant.py --listen HOST:PORT --coordinator
HOST:PORT --data-dir DIR [--name plain] [--balance 1000] [--in-doubt-after-ms 1000]
[--one-phase] (registers the one_phase capability and takes one-phase Prepares)
[--batch-without-exchange] (registers the batch capability, though it serves no Exchange: the
mistake Capabilities.batch's old comment led a developer to)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from dtmpb.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    shop_pb2,
)

PREPARED, COMMITTED, ROLLED_BACK, REFUSED = "prepared", "committed", "rolled_back", "refused"
EARLIER_ATTEMPT = "prepared by an earlier attempt of this transaction, whose outcome is unknown"
Code = grpc.StatusCode


class Store:
    """The durable state: the balance and every branch this participant has seen."""

    def __init__(self, directory: Path, balance: int) -> None:
        self.path = directory / "plain.json"
        self.directory = directory
        if self.path.exists():
            state = json.loads(self.path.read_text())
        else:
            state = {"balance": balance, "branches": {}}
        self.balance: int = state["balance"]
        # "TXN/BRANCH" -> {"state", "points", "sku", "prepared_at"}
        self.branches: dict[str, dict[str, Any]] = state["branches"]

    def save(self) -> None:
        """Durable before it returns: written aside, fsynced, renamed, directory fsynced."""
        scratch = self.path.with_suffix(".tmp")
        with scratch.open("w") as file:
            json.dump({"balance": self.balance, "branches": self.branches}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, self.path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def reserved(self) -> int:
        return sum(b["points"] for b in self.branches.values() if b["state"] == PREPARED)


def key_of(request: Any) -> str:
    return f"{request.transaction_id}/{request.branch}"


class PlainParticipant(participant_pb2_grpc.ParticipantServicer):
    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.hold_file = data_dir / "hold"
        # One request at a time changes the store: a Rollback that overtakes a slow Prepare
        # leaves its tombstone first, and the Prepare then finds it.
        self.lock = asyncio.Lock()

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:
        line = shop_pb2.StockLine()
        if not request.operation.Unpack(line):
            await context.abort(Code.INVALID_ARGUMENT, "the operation must be a dtm.v1.StockLine")
        if line.quantity <= 0:
            await context.abort(Code.INVALID_ARGUMENT, "quantity must be > 0")
        if line.sku.startswith("slow:"):
            await asyncio.sleep(int(line.sku.removeprefix("slow:")) / 1000)
        async with self.lock:
            return self._prepare(request, line)

    def _prepare(self, request: Any, line: shop_pb2.StockLine) -> participant_pb2.PrepareResponse:
        if line.sku == "novote":
            return participant_pb2.PrepareResponse()
        key, one_phase = key_of(request), request.one_phase
        known = self.store.branches.get(key)
        if known is not None and another_transaction(known, request):
            reused = f"{key} belongs to another transaction (its fingerprint differs)"
            return participant_pb2.PrepareResponse(
                vote=coordinator_pb2.VOTE_REFUSED, reason=reused, id_reused=reused
            )
        if known is not None:  # a later attempt of the transaction (the coordinator forgot it)
            if known["state"] == COMMITTED:
                earlier = not known.get("one_phase", False)
                return vote(coordinator_pb2.VOTE_COMMITTED, "", committed_earlier=earlier)
            if known["state"] == PREPARED:
                return vote(coordinator_pb2.VOTE_REFUSED, EARLIER_ATTEMPT)
            return vote(coordinator_pb2.VOTE_REFUSED, f"branch {key} is {known['state']}")
        branch = {
            "points": line.quantity,
            "sku": line.sku,
            "prepared_at": time.time(),
            "one_phase": one_phase,
            "fingerprint": request.transaction_fingerprint.hex(),
        }
        available = self.store.balance - self.store.reserved()
        if line.sku == "refuse" or line.quantity > available:
            self.store.branches[key] = {**branch, "state": REFUSED, "points": 0}
            self.store.save()
            return vote(coordinator_pb2.VOTE_REFUSED, f"{available} points available")
        self.store.branches[key] = {**branch, "state": PREPARED}
        if one_phase:  # prepared and committed in one step: the commit is the vote
            self.commit(self.store.branches[key])
            return vote(coordinator_pb2.VOTE_COMMITTED, "")
        self.store.save()  # persist before you speak: the vote binds us
        return vote(coordinator_pb2.VOTE_PREPARED, "")

    async def Commit(self, request: Any, context: Any) -> participant_pb2.CommitResponse:
        key = key_of(request)
        async with self.lock:
            known = self.store.branches.get(key)
            if known is None:
                await context.abort(Code.NOT_FOUND, f"branch {key} was never prepared here")
                raise AssertionError("abort raises")
            await self._hold(known, context)
            if another_transaction(known, request):
                await context.abort(Code.FAILED_PRECONDITION, f"{key} is another transaction's")
            if known["state"] in (ROLLED_BACK, REFUSED):
                await context.abort(Code.FAILED_PRECONDITION, f"branch {key} is rolled back")
            if known["state"] == PREPARED:
                self.commit(known)
        return participant_pb2.CommitResponse()

    async def Rollback(self, request: Any, context: Any) -> participant_pb2.RollbackResponse:
        key = key_of(request)
        async with self.lock:
            known = self.store.branches.get(key)
            if known is None:  # a tombstone: the Prepare, should it come later, is refused
                fingerprint = request.transaction_fingerprint.hex()
                tombstone = {
                    "state": ROLLED_BACK,
                    "points": 0,
                    "sku": "",
                    "fingerprint": fingerprint,
                }
                self.store.branches[key] = tombstone
                self.store.save()
                return participant_pb2.RollbackResponse()
            await self._hold(known, context)
            if another_transaction(known, request):  # nothing of this one is here: done
                return participant_pb2.RollbackResponse()
            if known["state"] == COMMITTED:
                await context.abort(Code.FAILED_PRECONDITION, f"branch {key} is committed")
            if known["state"] == PREPARED:
                self.roll_back(known)
        return participant_pb2.RollbackResponse()

    async def _hold(self, branch: dict[str, Any], context: Any) -> None:
        if branch["sku"] == "hold" and self.hold_file.exists():
            await context.abort(Code.UNAVAILABLE, "held by the test (DATA_DIR/hold exists)")

    def commit(self, branch: dict[str, Any]) -> None:
        branch["state"] = COMMITTED
        self.store.balance -= branch["points"]
        self.store.save()

    def roll_back(self, branch: dict[str, Any]) -> None:
        branch["state"] = ROLLED_BACK
        self.store.save()


def another_transaction(branch: dict[str, Any], request: Any) -> bool:
    """Whether `branch` was kept for another transaction under the request's id: a client
    reused the id (both fingerprints known, and different)."""
    fingerprint = request.transaction_fingerprint.hex()
    return bool(branch["fingerprint"] and fingerprint and branch["fingerprint"] != fingerprint)


def vote(
    code: int, reason: str, committed_earlier: bool = False
) -> participant_pb2.PrepareResponse:
    return participant_pb2.PrepareResponse(
        vote=code,  # type: ignore[arg-type]
        reason=reason,
        committed_earlier=committed_earlier,
    )


async def register(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    name: str,
    address: str,
    one_phase: bool,
    batch: bool = False,
) -> None:
    capabilities = coordinator_pb2.Capabilities(
        one_phase=one_phase, batch=batch, operation_types=["dtm.v1.StockLine"]
    )
    request = coordinator_pb2.RegisterParticipantRequest(
        name=name, address=address, capabilities=capabilities
    )
    while True:
        try:
            await stub.RegisterParticipant(request, timeout=5)
            print(f"registered {name} at {address}", flush=True)
            return
        except grpc.aio.AioRpcError as error:
            if error.code() in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION):
                sys.exit(f"registration refused: {error.code().name}: {error.details()}")
            await asyncio.sleep(0.2)


async def ask_about_prepared(
    stub: coordinator_pb2_grpc.CoordinatorStub, servicer: PlainParticipant, after_s: float
) -> None:
    """A prepared branch never decides alone: past `after_s` it asks the coordinator, and
    asks again while the answer is unknown (the call fails, or OUTCOME_UNSPECIFIED)."""
    while True:
        await asyncio.sleep(0.2)
        now = time.time()
        for key, branch in list(servicer.store.branches.items()):
            if branch["state"] != PREPARED or now - branch["prepared_at"] < after_s:
                continue
            ask = coordinator_pb2.QueryOutcomeRequest(
                transaction_id=key.rsplit("/", 1)[0],
                transaction_fingerprint=bytes.fromhex(branch["fingerprint"]),
            )
            try:
                answer = await stub.QueryOutcome(ask, timeout=5)
            except grpc.aio.AioRpcError:
                continue
            async with servicer.lock:
                if branch["state"] != PREPARED:
                    continue
                if answer.outcome == coordinator_pb2.OUTCOME_COMMITTED:
                    servicer.commit(branch)
                elif answer.outcome == coordinator_pb2.OUTCOME_ABORTED:
                    servicer.roll_back(branch)


async def serve(options: argparse.Namespace) -> None:
    data_dir = Path(options.data_dir)
    servicer = PlainParticipant(Store(data_dir, options.balance), data_dir)
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServicer_to_server(servicer, server)
    server.add_insecure_port(options.listen)
    await server.start()
    async with grpc.aio.insecure_channel(options.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        await register(
            stub, options.name, options.listen, options.one_phase, options.batch_without_exchange
        )
        if options.in_doubt_after_ms > 0:
            after_s = options.in_doubt_after_ms / 1000
            inquiries = asyncio.create_task(ask_about_prepared(stub, servicer, after_s))
        await server.wait_for_termination()
        if options.in_doubt_after_ms > 0:
            inquiries.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--name", default="plain")
    parser.add_argument("--balance", type=int, default=1_000)
    parser.add_argument("--in-doubt-after-ms", type=int, default=1_000, help="0: never ask")
    parser.add_argument("--one-phase", action="store_true", help="take one-phase Prepares")
    parser.add_argument(
        "--batch-without-exchange",
        action="store_true",
        help="register the batch capability, though no Exchange is served",
    )
    options = parser.parse_args()
    Path(options.data_dir).mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(options))


if __name__ == "__main__":
    main()
