"""The file systems under the log: the real one (fsync, directory lock) and, for tests,
an in-memory one that can crash and lose what was not fsynced.

Part of the write-ahead log: see `dtm.wal` for the format and the recovery rules."""

from __future__ import annotations

import errno
import fcntl
import os
import random as random_module
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dtm.wal.errors import (
    LOCK_FILE_NAME,
    LogInUseError,
)


class AppendFile(Protocol):
    """An open segment: writes go to its end."""

    def write(self, data: bytes | bytearray) -> None: ...
    def fsync(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def close(self) -> None: ...


class FileSystem(Protocol):
    """Every file operation the log performs, so tests and the simulator can crash the disk."""

    def make_dirs(self, directory: Path) -> list[Path]:
        """Create the directory and its missing parents; returns those it created, outermost
        first."""
        ...

    def list_dir(self, directory: Path) -> list[str]: ...
    def read_file(self, path: Path) -> bytes: ...
    def file_size(self, path: Path) -> int: ...

    def open_append(self, path: Path) -> AppendFile:
        """Open for appending, creating the file if it does not exist."""
        ...

    def remove(self, path: Path) -> None: ...
    def fsync_dir(self, directory: Path) -> None: ...

    def lock_dir(self, directory: Path) -> DirectoryLock:
        """Take the directory for this log alone, or raise LogInUseError."""
        ...


class DirectoryLock(Protocol):
    def release(self) -> None: ...


class _OsDirectoryLock:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None


class _MemoryDirectoryLock:
    __slots__ = ("_directory", "_file_system")

    def __init__(self, file_system: CrashingFileSystem, directory: Path) -> None:
        self._file_system = file_system
        self._directory = directory

    def release(self) -> None:
        self._file_system.locked.discard(self._directory)


class _OsAppendFile:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            # os.write on a regular file may write less than asked (e.g. the disk filled up).
            written = os.write(self._fd, view)
            view = view[written:]

    def fsync(self) -> None:
        # fdatasync flushes the data and the metadata needed to read it back (the file size), which
        # is all an append-only file needs; it skips mtime. Where it is missing, fall back to fsync.
        if hasattr(os, "fdatasync"):
            os.fdatasync(self._fd)
        else:  # pragma: no cover - macOS
            os.fsync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def close(self) -> None:
        os.close(self._fd)


def file_in_the_way(directory: Path) -> str:
    """' (LEVEL is a file)' for the first level of `directory` that exists and is no
    directory, else ''."""
    for level in (*reversed(directory.parents), directory):
        if level.exists() and not level.is_dir():
            return f" ({level} is a file)"
    return ""


class OsFileSystem:
    """The real disk."""

    def make_dirs(self, directory: Path) -> list[Path]:
        missing = [level for level in (directory, *directory.parents) if not level.is_dir()]
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            # Python's "[Errno 20] Not a directory: 'd/coordinator/wal'" names neither the
            # setting to fix nor which level of the path is in the way.
            raise OSError(
                f"cannot create the log directory {directory}: {error.strerror}"
                f"{file_in_the_way(directory)}; give this process a --data-dir (data_dir) that "
                "is a directory it can write, or can create"
            ) from None
        return missing[::-1]

    def list_dir(self, directory: Path) -> list[str]:
        return sorted(os.listdir(directory))

    def read_file(self, path: Path) -> bytes:
        return path.read_bytes()

    def file_size(self, path: Path) -> int:
        return os.stat(path).st_size

    def open_append(self, path: Path) -> AppendFile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        return _OsAppendFile(os.open(path, flags, 0o644))

    def remove(self, path: Path) -> None:
        os.remove(path)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock_dir(self, directory: Path) -> DirectoryLock:
        path = directory / LOCK_FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LogInUseError(
                f"the log directory {directory} is in use by another process (pid {holder}); "
                "one process per data directory: stop that process, or give this one its "
                "own --data-dir",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return _OsDirectoryLock(fd)


@dataclass(eq=False, slots=True)
class _MemoryFile:
    """An inode: what a read sees now, and what survives a crash."""

    content: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class _MemoryAppendFile:
    __slots__ = ("_epoch", "_file", "_file_system")

    def __init__(self, file_system: CrashingFileSystem, file: _MemoryFile) -> None:
        self._file_system = file_system
        self._file = file
        self._epoch = file_system.crash_count

    def _check(self) -> None:
        if self._epoch != self._file_system.crash_count:
            raise OSError(errno.EBADF, "file handle opened before a crash")

    def write(self, data: bytes | bytearray) -> None:
        with self._file_system.lock:
            self._check()
            self._file.content += data

    def fsync(self) -> None:
        with self._file_system.lock:
            self._check()
            self._file_system.consume_fsync_failure()
            self._file.durable = bytes(self._file.content)

    def truncate(self, size: int) -> None:
        with self._file_system.lock:
            self._check()
            del self._file.content[size:]

    def close(self) -> None:
        self._epoch = -1


class CrashingFileSystem:
    """An in-memory disk that loses everything not fsynced when `crash()` is called.

    Model (simple, and strict where real file systems are lenient):

    - A file's content survives a crash as of its last fsync. Unsynced writes are lost; with
      `crash(random)` a random prefix of the unsynced appended bytes survives instead (a torn
      write), as long as the file was only appended to since its last fsync.
    - A directory entry (a created or a removed name) survives a crash only once its directory was
      fsynced afterwards: a created file whose directory was never fsynced disappears, a removed
      file whose directory was not fsynced after the removal reappears with its durable content.
      With `crash(random)` each such unsynced entry change survives or not at random.
    - Directories themselves are durable as soon as they are made (not modelled).
    - `fail_next_fsync = True` makes the next fsync (of a file or a directory) raise EIO.
    - Handles opened before a crash raise EBADF afterwards.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the group commit thread fsyncs while the loop appends
        self.fail_next_fsync = False
        self.crash_count = 0
        self.fsync_count = 0
        self._directories: set[Path] = set()
        self._names: dict[Path, _MemoryFile] = {}
        self._durable_names: dict[Path, _MemoryFile] = {}
        self.locked: set[Path] = set()  # log directories held by an open log

    def process_died(self) -> None:
        """The process that had logs open here died, the machine did not: the kernel dropped
        its locks, and everything it wrote is still in the page cache."""
        with self.lock:
            self.locked.clear()

    def consume_fsync_failure(self) -> None:
        self.fsync_count += 1
        if self.fail_next_fsync:
            self.fail_next_fsync = False
            raise OSError(errno.EIO, "injected fsync failure")

    def crash(self, random: random_module.Random | None = None) -> None:
        with self.lock:
            survivors: dict[Path, _MemoryFile] = {}
            for path in sorted(self._names.keys() | self._durable_names.keys()):
                durable_file = self._durable_names.get(path)
                current_file = self._names.get(path)
                chosen = durable_file
                if random is not None and durable_file is not current_file:
                    chosen = random.choice([durable_file, current_file])
                if chosen is not None:
                    survivors[path] = chosen
            for file in {id(file): file for file in survivors.values()}.values():
                kept = file.durable
                unsynced = bytes(file.content[len(kept) :])
                if random is not None and file.content.startswith(kept) and unsynced:
                    kept += unsynced[: random.randint(0, len(unsynced))]
                file.content = bytearray(kept)
                file.durable = kept
            self._names = survivors
            self._durable_names = dict(survivors)
            self.locked.clear()  # the crashed process held them
            self.crash_count += 1

    # ---- FileSystem ----

    def make_dirs(self, directory: Path) -> list[Path]:
        with self.lock:
            missing = [d for d in (directory, *directory.parents) if d not in self._directories]
            self._directories.update(missing)
            return missing[::-1]

    def list_dir(self, directory: Path) -> list[str]:
        with self.lock:
            if directory not in self._directories:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(directory))
            return sorted(path.name for path in self._names if path.parent == directory)

    def read_file(self, path: Path) -> bytes:
        with self.lock:
            return bytes(self._lookup(path).content)

    def file_size(self, path: Path) -> int:
        with self.lock:
            return len(self._lookup(path).content)

    def open_append(self, path: Path) -> AppendFile:
        with self.lock:
            if path.parent not in self._directories:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
            file = self._names.setdefault(path, _MemoryFile())
            return _MemoryAppendFile(self, file)

    def remove(self, path: Path) -> None:
        with self.lock:
            self._lookup(path)
            del self._names[path]

    def fsync_dir(self, directory: Path) -> None:
        with self.lock:
            self.consume_fsync_failure()
            for path in [path for path in self._durable_names if path.parent == directory]:
                del self._durable_names[path]
            for path, file in self._names.items():
                if path.parent == directory:
                    self._durable_names[path] = file

    def lock_dir(self, directory: Path) -> DirectoryLock:
        with self.lock:
            if directory in self.locked:
                raise LogInUseError(f"the log directory {directory} is in use")
            self.locked.add(directory)
            return _MemoryDirectoryLock(self, directory)

    def _lookup(self, path: Path) -> _MemoryFile:
        try:
            return self._names[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None
