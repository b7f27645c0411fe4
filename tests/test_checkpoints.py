"""Checkpoints keep the logs bounded, and a restart from a checkpointed log loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from dtm import invariants, limits
from dtm.wal import LogCorruptedError, WriteAheadLog, async_log, dump, payload_size
from dtmpb.v1 import coordinator_pb2, log_pb2, participant_pb2, shop_pb2
from participants.branches import BranchEngine
from participants.locks import LockManager
from participants.service import state_bytes
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService
from participants.services.orders import OrdersService
from participants.services.payment import PaymentService
from tests.harness import ACCOUNTS, InProcessCluster, eventually, order_branches

ORDERS = 240


def records_in_logs(data_dir: Path) -> dict[str, int]:
    """Records each process would replay now (read-only: dump never repairs)."""
    return {
        wal_dir.parent.name: sum(1 for line in dump(wal_dir) if "lsn=" in line)
        for wal_dir in sorted(data_dir.glob("*/wal"))
    }


def test_logs_stay_bounded_and_restart_recovers_everything(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            stock={"sku-apple": 10_000},
            coordinator_overrides={"checkpoint_every_records": 40},
            participant_overrides={"checkpoint_every_records": 40, "tick_ms": 20},
        ) as cluster:
            replayed = []
            for wave in range(4):
                responses = await asyncio.gather(
                    *(
                        cluster.submit(
                            order_branches(f"o-{wave}-{i}", [("sku-apple", 1)], amount_cents=5),
                            f"t-{wave}-{i}",
                        )
                        for i in range(ORDERS // 4)
                    )
                )
                assert all(r.outcome == coordinator_pb2.OUTCOME_COMMITTED for r in responses)

                async def checkpointed() -> bool:
                    # Each housekeeping loop has taken the checkpoint this wave made due, and
                    # it is durable: the old segments are deleted by the sync that covers it.
                    engines = [cluster.coordinator.engine] + [
                        server.engine for server in cluster.participants.values()
                    ]
                    for engine in engines:
                        # Lazy records (a transaction's end) wait for the next forced write,
                        # which the last transactions of a wave may not be followed by.
                        await engine.log.wait_durable(engine.log.appended_lsn)
                    return all(
                        engine.records_since_checkpoint < 40
                        and engine.log.durable_lsn == engine.log.appended_lsn
                        for engine in engines
                    )

                await eventually(checkpointed)
                replayed.append(records_in_logs(tmp_path))
            # Bounded: each log holds its last checkpoint plus the records since, not every
            # record ever written (each wave writes ~60-120 records per process).
            for counts in replayed[1:]:
                assert all(count <= 40 + 60 for count in counts.values()), replayed

            targets = {name: cluster.address(name) for name in invariants.SERVICES}
            before = await invariants.wait_until_settled(targets)

            # Restart every participant from its (checkpointed) log, and the coordinator.
            fresh = {
                "inventory": InventoryService({"sku-apple": 10_000}),
                "orders": OrdersService(),
                "payment": PaymentService(dict(ACCOUNTS)),
                "notification": NotificationService(),
            }
            for name, service in fresh.items():
                await cluster.restart_participant(name, service)
            await cluster.restart_coordinator()
            targets = {name: cluster.address(name) for name in invariants.SERVICES}
            after = await invariants.wait_until_settled(targets)
            assert before == after
            assert [] == invariants.report(after).violations
            assert ORDERS == invariants.report(after).confirmed_orders

            # A late duplicate of the very last transaction is answered, not applied again.
            again = await cluster.submit(
                order_branches(f"o-3-{ORDERS // 4 - 1}", [("sku-apple", 1)], amount_cents=5),
                f"t-3-{ORDERS // 4 - 1}",
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == again.outcome
            final = await invariants.wait_until_settled(targets)
            assert ORDERS == invariants.report(final).confirmed_orders

    asyncio.run(scenario())


def test_a_decided_entry_encodes_as_the_checkpoint_field_would_and_reads_back() -> None:
    from dtm.core.branch import Branch, BranchState, BranchVote
    from dtmpb.v1 import log_pb2
    from participants.branches import BranchInfo, _decided_entry, _decided_info

    for reason in ("", "out of stock", "out of stock: " + "x" * 300):  # 1- and 2-byte lengths
        branch = Branch("t-1", 2, BranchState.REFUSED, BranchVote.REFUSED)
        branch.reason = reason
        heuristic = Branch("t-2", 1, BranchState.COMMITTED, BranchVote.PREPARED)
        heuristic.heuristic = "heuristic commit"
        for info in (
            BranchInfo(branch, 1_764_000_000_123, fingerprint=b"F" * 16),
            BranchInfo(heuristic, 7),
        ):
            entry = _decided_entry(info)
            decoded = log_pb2.ParticipantCheckpoint.FromString(entry * 2)
            assert 2 == len(decoded.decided)
            assert (
                info.branch.transaction_id,
                info.branch.index,
                info.branch.reason,
                info.fingerprint,
                info.updated_at_ms,
            ) == (
                decoded.decided[0].transaction_id,
                decoded.decided[0].branch,
                decoded.decided[0].reason,
                decoded.decided[0].transaction_fingerprint,
                decoded.decided[0].decided_at_unix_ms,
            )
            assert entry == (
                log_pb2.ParticipantCheckpoint(decided=[decoded.decided[0]]).SerializeToString()
            )
            # All the engine keeps of a decided branch: read back whole.
            assert _decided_info(entry) == info


# ---- checkpoints larger than one log record ----

PAD = b"#" * (9 * 1024 * 1024)  # more than LOG_RECORD_BYTES_MAX on its own


class PaddedOrders(OrdersService):
    """The orders service with a state too large for one log record, as the real one's
    becomes at about 70,000 orders (it then stopped checkpointing, silently)."""

    def snapshot(self) -> list[bytes]:
        return [PAD, *super().snapshot()]  # a piece larger than a record: the SDK cuts it

    def restore(self, state: bytes) -> None:
        assert state.startswith(PAD)
        super().restore(state[len(PAD) :])


def order_operation(order_id: str) -> any_pb2.Any:
    operation = any_pb2.Any()
    line = shop_pb2.StockLine(sku="sku-apple", quantity=1)
    operation.Pack(
        shop_pb2.CreateOrder(order_id=order_id, customer_id="c", lines=[line], amount_cents=5)
    )
    return operation


async def engine_on(directory: Path, service: OrdersService, part_bytes: int) -> BranchEngine:
    wal, records = WriteAheadLog.open(directory)
    engine = BranchEngine(
        service,
        async_log(wal, "loop"),
        LockManager(wait_timeout_s=0.5),
        clock_ms=lambda: 0,
        checkpoint_part_bytes=part_bytes,
    )
    engine.replay(records)
    return engine


def test_a_checkpoint_larger_than_a_log_record_is_written_in_parts_and_replayed(
    tmp_path: Path,
) -> None:
    async def scenario(service: OrdersService, part_bytes: int) -> None:
        directory = tmp_path / type(service).__name__ / str(part_bytes)
        engine = await engine_on(directory, service, part_bytes)
        for number in range(120):
            transaction = f"t-{number}"
            engine.begin_prepare(transaction, 1, order_operation(f"o-{number}"), False, 0.1)
            if number % 10:  # every tenth stays prepared, in doubt
                engine.decide_now(transaction, 1, commit=number % 3 != 0)
        await engine.wait_durable([(f"t-{n}", 1) for n in range(120)])
        before = (state_bytes(service.snapshot()), sorted(i.branch.key for i in engine.in_doubt()))
        await engine.checkpoint()
        await engine.log.close()
        wal, records = WriteAheadLog.open(directory)  # the checkpoint, and nothing else
        wal.close()
        assert len(records) > 3  # the state, prepared and decided branches, each in parts
        assert all(len(record.payload) <= part_bytes for record in records)

        again = PaddedOrders() if isinstance(service, PaddedOrders) else OrdersService()
        restored = await engine_on(directory, again, part_bytes)
        assert before == (
            state_bytes(again.snapshot()),
            sorted(i.branch.key for i in restored.in_doubt()),
        )
        decided = len(restored.listed(set(), 1000)) - len(restored.in_doubt())
        assert 108 == decided
        # The decided branches came back too: a duplicate Commit is answered, not refused.
        restored.decide_now("t-1", 1, commit=True)
        await restored.log.close()

    # Small parts: many records. The real sizes: a state past LOG_RECORD_BYTES_MAX.
    asyncio.run(scenario(OrdersService(), 300))
    asyncio.run(scenario(PaddedOrders(), limits.CHECKPOINT_PART_BYTES))


def test_a_coordinator_checkpoint_in_parts_resumes_every_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits owed phase 2 pile up in the checkpoint while a participant is down; cut into
    records (tiny ones here), a restart still finds every one of them."""
    monkeypatch.setattr(limits, "CHECKPOINT_PART_BYTES", 200)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            for number in range(10):
                branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=5)
                response = await cluster.submit(branches, f"t-{number}")
                assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            engine = cluster.coordinator.engine
            engine.records_since_checkpoint = engine.config.checkpoint_every_records
            assert await engine.checkpoint_if_due()
            lines = list(dump(tmp_path / "coordinator" / "wal"))
            assert sum("COORDINATOR_CHECKPOINT" in line for line in lines) > 3

            await cluster.restart_coordinator()
            assert 10 == len(cluster.coordinator.engine.active)  # all resumed
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_NONE)

            async def finished() -> bool:
                return not cluster.coordinator.engine.active

            await eventually(finished)
            orders = await cluster.orders()
            assert 10 == sum(o.state == shop_pb2.ORDER_STATE_CONFIRMED for o in orders.values())

    asyncio.run(scenario())


def test_checkpoints_are_counted_timed_and_exported(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from dtm.metrics import ParticipantMetrics

    async def scenario() -> None:
        engine = await engine_on(tmp_path, OrdersService(), part_bytes=1 << 20)
        assert 0 == engine.checkpoints.count
        await engine.checkpoint()
        await engine.checkpoint()
        stats = engine.checkpoints
        assert 2 == stats.count
        assert 0 < stats.longest_s <= stats.seconds
        assert 0 < stats.last_s <= stats.longest_s
        assert round(stats.last_s * 1000, 1) == stats.last_ms
        assert sum(map(payload_size, engine.checkpoint_records())) == stats.last_bytes
        metrics = ParticipantMetrics(engine, engine.locks, engine.log)
        text = generate_latest(metrics.registry).decode()
        assert "dtm_checkpoint_seconds_count 2.0" in text
        assert f"dtm_checkpoint_bytes {float(stats.last_bytes)}" in text
        await engine.log.close()

    asyncio.run(scenario())


def test_a_failed_checkpoint_is_logged_and_housekeeping_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, an exception in a checkpoint ended a participant's housekeeping for good, with
    no word in the log: no more checkpoints, leases or inquiries."""
    attempts: list[str] = []

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, participant_overrides={"checkpoint_every_records": 10, "tick_ms": 20}
        ) as cluster:
            engine = cluster.participants["orders"].engine
            real = engine.checkpoint

            async def first_fails() -> None:
                attempts.append("failed" if not attempts else "written")
                if len(attempts) == 1:
                    raise RuntimeError("injected")
                await real()

            monkeypatch.setattr(engine, "checkpoint", first_fails)
            for number in range(30):
                branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=5)
                await cluster.submit(branches, f"t-{number}")

            async def written() -> bool:
                return "written" in attempts

            await eventually(written)

    asyncio.run(scenario())
    assert ["failed", "written"] == attempts[:2]


def test_checkpoint_parts_are_cut_in_order_and_coalesced_back() -> None:
    from dtm.records import coalesced, in_parts
    from dtm.wal import LogRecord

    pieces = [b"a" * 3, b"b" * 4, b"c" * 9, b"d", b"e" * 2]
    parts = in_parts(pieces, 5)
    payloads = [b"".join(part) for part in parts]
    assert b"".join(payloads) == b"".join(pieces)  # nothing lost, nothing reordered
    # As few as the order allows: greedy, and a piece too large stands alone.
    assert [[b"aaa"], [b"bbbb"], [b"c" * 9], [b"d", b"ee"]] == parts
    assert [[b"a", b"b", b"c"]] == in_parts([b"a", b"b", b"c"], 3)  # exactly full
    assert [] == in_parts([], 5)
    records = [LogRecord(n, 7, p) for n, p in enumerate(payloads, 1)]
    records.append(LogRecord(len(records) + 1, 8, b"after"))
    merged = list(coalesced(records, 7))
    assert [(7, b"".join(pieces)), (8, b"after")] == [(r.record_type, r.payload) for r in merged]


def test_a_services_snapshot_pieces_reach_the_log_uncopied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's records hold the service's cached chunks themselves: nothing of a large
    state is joined or sliced on the event loop. A snapshot that is neither bytes nor a list of
    bytes is refused before anything is written."""
    monkeypatch.setattr("participants.services.CHUNK_ROWS", 4)

    async def scenario() -> None:
        service = NotificationService()
        engine = await engine_on(tmp_path / "log", service, limits.CHECKPOINT_PART_BYTES)
        for number in range(30):
            note = shop_pb2.SendNotification(order_id=f"o-{number}", recipient="a@x", body="hi")
            operation = any_pb2.Any()
            operation.Pack(note)
            engine.begin_prepare(f"t-{number}", 1, operation, False, 0.1)
            engine.decide_now(f"t-{number}", 1, commit=True)
        pieces = service.snapshot()
        records = engine.checkpoint_records()
        chunks = service._outbox_text._chunks
        assert 7 == len(chunks)  # 28 of the 30 rows, 4 to a chunk
        handed = [piece for record in records if isinstance(record, list) for piece in record]
        assert all(any(chunk is piece for piece in handed) for chunk in chunks)
        # What the log will write is the state's bytes in one field.
        state = log_pb2.ParticipantCheckpoint.FromString(
            b"".join(
                record if isinstance(record, bytes) else b"".join(record) for record in records
            )
        ).service_state
        assert state_bytes(pieces) == b"".join(state)

        monkeypatch.setattr(service, "snapshot", lambda: [b"{", "not bytes"])
        with pytest.raises(TypeError, match="snapshot\\(\\) must return bytes or a list of bytes"):
            engine.checkpoint_records()
        await engine.log.close()

    asyncio.run(scenario())


def test_a_checkpoint_taken_while_a_commit_is_deciding_keeps_its_decision_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the commit record's append and its fsync the transaction is DECIDING; a
    checkpoint then must carry a real decision time (a restart shows it, and ages it)."""
    from dtm import crashpoints

    taken: list[log_pb2.CommitDecided] = []

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            engine = cluster.coordinator.engine
            real_hit = crashpoints.hit

            def hit(name: str) -> None:
                if name == "coordinator.after_decision_write" and not taken:
                    for part in engine.checkpoint_records()[1:]:
                        payload = part if isinstance(part, bytes) else b"".join(part)
                        taken.extend(log_pb2.CoordinatorCheckpoint.FromString(payload).committing)
                real_hit(name)

            monkeypatch.setattr(crashpoints, "hit", hit)
            started_ms = engine.clock_ms()
            response = await cluster.submit(order_branches("o-d", [("sku-apple", 1)]), "t-d")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            assert ["t-d"] == [decided.transaction_id for decided in taken]
            assert started_ms <= taken[0].decided_at_unix_ms <= engine.clock_ms()

    asyncio.run(scenario())


def test_a_restart_counts_the_records_since_the_last_checkpoint_toward_the_next(
    tmp_path: Path,
) -> None:
    """Or a process restarted before it appends `checkpoint_every_records` never checkpoints,
    and its log (and its replay) grows with every restart."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            for n in range(3):
                response = await cluster.submit(order_branches(f"o-{n}", [("sku-apple", 1)]))
                assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            engines = {"coordinator": cluster.coordinator.engine} | {
                name: server.engine for name, server in cluster.participants.items()
            }

            async def phase_two_logged() -> bool:
                return not cluster.coordinator.engine.active

            await eventually(phase_two_logged)
            before = {name: engine.records_since_checkpoint for name, engine in engines.items()}
            # Registrations (4), commit decisions and end records (3 + 3).
            assert before["coordinator"] == 10
            assert all(count > 0 for count in before.values()), before
            addresses = {name: cluster.address(name) for name in cluster.participants}
            await cluster.restart_coordinator()
            after = {"coordinator": cluster.coordinator.engine.records_since_checkpoint}
            fresh = {
                "inventory": InventoryService(),
                "orders": OrdersService(),
                "payment": PaymentService(dict(ACCOUNTS)),
                "notification": NotificationService(),
            }
            for name, service in fresh.items():
                after[name] = (
                    await cluster.restart_participant(name, service)
                ).engine.records_since_checkpoint
            assert before == after
            # A participant back at a new address is a change: its registration is counted.
            moved = sum(addresses[name] != cluster.address(name) for name in addresses)
            assert 10 + moved == cluster.coordinator.engine.records_since_checkpoint

    asyncio.run(scenario())


def test_a_checkpoint_marks_the_branches_no_longer_owed_a_commit(tmp_path: Path) -> None:
    """A commit waiting on one branch: the others acknowledged. After a restart from the
    checkpoint they get no Commit again (a participant that has since dropped its branch
    would report a hazard), and the status still shows them."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            response = await cluster.submit(order_branches("o-w", [("sku-apple", 1)]), "t-w")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            engine = cluster.coordinator.engine

            async def only_payment_left() -> bool:
                txn = engine.active["t-w"].txn
                return [b.participant for b in txn.branches if not b.acknowledged] == ["payment"]

            await eventually(only_payment_left)
            committing = []
            for part in engine.checkpoint_records()[1:]:
                payload = part if isinstance(part, bytes) else b"".join(part)
                committing += log_pb2.CoordinatorCheckpoint.FromString(payload).committing
            [decided] = committing
            owed = [b.participant for b in decided.branches if not b.acknowledged]
            assert ["payment"] == owed and 4 == len(decided.branches)
            engine.records_since_checkpoint = engine.config.checkpoint_every_records
            assert await engine.checkpoint_if_due()
            await cluster.restart_coordinator()
            resumed = cluster.coordinator.engine.active["t-w"].txn
            assert ["payment"] == [b.participant for b in resumed.branches if not b.acknowledged]
            status = await cluster.client.GetTransaction(
                coordinator_pb2.GetTransactionRequest(transaction_id="t-w")
            )
            assert 4 == len(status.branches)

    asyncio.run(scenario())


def test_a_corrupted_checkpoint_that_is_the_whole_log_is_refused_not_cut(tmp_path: Path) -> None:
    """An idle process's log holds only its last checkpoint. One flipped bit in its end marker
    made recovery take it for the interrupted first checkpoint of a new log, a torn tail: the
    segment was cut to nothing and the participant started empty, its in-doubt and decided
    branches gone, with a WARNING only (a bug hunt). Only segment 1 can be that."""

    def engine_on(directory: Path) -> BranchEngine:
        wal, records = WriteAheadLog.open(directory)
        engine = BranchEngine(
            OrdersService(),
            async_log(wal, "loop"),
            LockManager(wait_timeout_s=0.5),
            clock_ms=lambda: 0,
        )
        engine.replay(records)
        return engine

    async def before() -> None:
        engine = engine_on(tmp_path)
        for number in range(10):
            await engine.prepare(f"t{number}", 0, order_operation(f"o-{number}"), False)
            if number % 2:
                await engine.commit(f"t{number}", 0)
        await engine.checkpoint()  # durable: the older segment is deleted
        await engine.log.close()

    asyncio.run(before())
    [segment] = sorted(tmp_path.glob("*.wal"))
    assert "00000000000000000001.wal" != segment.name
    data = bytearray(segment.read_bytes())
    data[-40 + 24] ^= 0x01  # a bit of the last frame: the checkpoint's end marker
    segment.write_bytes(bytes(data))
    assert "opening the log refuses it" in list(dump(tmp_path))[-1]
    with pytest.raises(LogCorruptedError) as raised:
        engine_on(tmp_path)
    assert segment.name in str(raised.value)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["log replay", "checkpoint"])
def test_a_restart_shows_when_a_commit_began_and_its_timeout(
    tmp_path: Path, checkpoint: bool
) -> None:
    """The decision record kept only its own time: after a restart a commit, over or still
    owed phase 2, read as begun when it was decided, with timeout 0 (a bug hunt,
    s7_restart_views). CommitDecided carries both now (fields 5 and 6)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            ended = order_branches("o-e", [("sku-apple", 1)])
            assert (
                coordinator_pb2.OUTCOME_COMMITTED
                == (await cluster.submit(ended, "t-ended", timeout_ms=7_000)).outcome
            )
            engine = cluster.coordinator.engine

            async def ended() -> bool:  # its end record is made durable by the next decision's
                return "t-ended" not in engine.active

            await eventually(ended)
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            owed = order_branches("o-o", [("sku-apple", 1)])
            assert (
                coordinator_pb2.OUTCOME_COMMITTED
                == (await cluster.submit(owed, "t-owed", timeout_ms=8_000)).outcome
            )

            async def shown() -> dict[str, tuple[int, int]]:
                # (The decision's time may move by a millisecond: a live transaction shows
                # when its record became durable, the record holds when it was written.)
                views = {}
                for txn in ("t-ended", "t-owed"):
                    view = await cluster.client.GetTransaction(
                        coordinator_pb2.GetTransactionRequest(transaction_id=txn)
                    )
                    views[txn] = (view.created_at_unix_ms, view.timeout_ms)
                return views

            before = await shown()
            assert (7_000, 8_000) == (before["t-ended"][1], before["t-owed"][1])
            if checkpoint:
                engine.records_since_checkpoint = engine.config.checkpoint_every_records
                assert await engine.checkpoint_if_due()
            await cluster.restart_coordinator()
            assert ["t-owed"] == list(cluster.coordinator.engine.active)  # resumed
            assert before == await shown()

            # A decision written before the fields: begun when decided, timeout 0, as before.
            restarted = cluster.coordinator.engine
            restarted._remember_committed(
                log_pb2.CommitDecided(transaction_id="t-old", decided_at_unix_ms=5)
            )
            old = restarted.lookup("t-old")
            assert old is not None and (5, 5, 0) == (
                old.created_at_ms,
                old.decided_at_ms,
                old.timeout_ms,
            )
            # An abort is not logged: not found after a restart, and the answer says so.
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await cluster.client.GetTransaction(
                    coordinator_pb2.GetTransactionRequest(transaction_id="t-aborted")
                )
            assert grpc.StatusCode.NOT_FOUND == missing.value.code()
            assert "aborted before the coordinator's last restart" in (
                missing.value.details() or ""
            )

    asyncio.run(scenario())
