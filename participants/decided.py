"""The window of recently decided branches a participant keeps for duplicate answers, with the
bytes every checkpoint writes for them.

Every checkpoint (each `checkpoint_every_records` records) writes the whole window
(`BRANCHES_DECIDED_KEPT`, 100,000 entries, about 7-10 MB), and what it takes from the window it
takes on the event loop, which serves nothing meanwhile. When the window was one OrderedDict,
copying it took 21-26 ms on an idle machine (listing the values alone 14 ms) and held the loop
136-258 ms under `make bench-soak` load. Here the entries live in chunks of `CHUNK` branches; a
chunk's entries are joined once and the bytes reused until the chunk changes, so a checkpoint
takes about a hundred cached pieces, which the log joins where it writes them (off the loop
with wal_sync = "loop").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

BranchKey = tuple[str, int]

# Large enough that a checkpoint handles ~100 pieces, small enough that re-joining the one open
# chunk and the one being evicted at each checkpoint costs microseconds.
CHUNK = 1024


class _Chunk:
    __slots__ = ("entries", "joined")

    def __init__(self) -> None:
        self.entries: dict[BranchKey, bytes] = {}  # insertion order is decision order
        self.joined: bytes | None = None  # b"".join(entries.values()) while it is unchanged

    def bytes(self) -> bytes:
        if self.joined is None:
            self.joined = b"".join(self.entries.values())
        return self.joined


class DecidedWindow:
    """The most recent `kept` decided branches, oldest first, each as its encoded checkpoint
    entry, and nothing else: the entry is all a duplicate answer needs (the engine decodes it
    then), and bytes are the one kind of object the garbage collector never traverses. As
    objects (a `Branch` and a `BranchInfo` each), 100,000 decided branches kept every
    collection of the middle generation busy in long runs. Memory: each entry twice (alone and
    in its chunk's joined bytes), about 14 MB at 100,000 entries."""

    def __init__(self, kept: int) -> None:
        assert kept >= 0
        self._kept = kept
        self._chunks: deque[_Chunk] = deque()
        self._where: dict[BranchKey, _Chunk] = {}

    def __len__(self) -> int:
        return len(self._where)

    def newest_first(self) -> Iterator[tuple[BranchKey, bytes]]:
        for chunk in reversed(self._chunks):
            for key in reversed(chunk.entries):
                yield key, chunk.entries[key]

    def get(self, key: BranchKey) -> bytes | None:
        chunk = self._where.get(key)
        return None if chunk is None else chunk.entries[key]

    def put(self, key: BranchKey, entry: bytes) -> list[tuple[BranchKey, bytes]]:
        """Remember (or re-encode, in place) a decided branch; returns the entries it pushed
        out of the window, oldest first."""
        chunk = self._where.get(key)
        if chunk is not None:
            chunk.entries[key] = entry
            chunk.joined = None
            return []
        if not self._chunks or len(self._chunks[-1].entries) >= CHUNK:
            self._chunks.append(_Chunk())
        chunk = self._chunks[-1]
        chunk.entries[key] = entry
        chunk.joined = None
        self._where[key] = chunk
        evicted: list[tuple[BranchKey, bytes]] = []
        # Bounded: each step removes one of the entries, and one was added.
        while len(self._where) > self._kept:
            oldest = self._chunks[0]
            old = next(iter(oldest.entries))
            evicted.append((old, oldest.entries.pop(old)))
            oldest.joined = None
            del self._where[old]
            if not oldest.entries:
                self._chunks.popleft()
        return evicted

    def clear(self) -> None:
        self._chunks.clear()
        self._where.clear()

    def pieces(self, size_max: int) -> list[bytes]:
        """Every entry, oldest first, as the joined bytes of each chunk (their concatenation is
        the entries'), for `dtm.records.in_parts` to cut into records of `size_max` bytes. A
        chunk larger than that gives its entries one by one, so that no piece outgrows a
        record unless one entry does."""
        pieces: list[bytes] = []
        for chunk in self._chunks:
            joined = chunk.bytes()
            if len(joined) <= size_max:
                pieces.append(joined)
            else:
                pieces.extend(chunk.entries.values())
        return pieces
