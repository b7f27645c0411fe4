"""The data dir's lock (DIR/cluster.lock): one `up`, `down` or demo at a time.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from dtm.cluster.errors import (
    ClusterBusyError,
    ClusterLockError,
)

LOCK_NAME = "cluster.lock"


@contextlib.contextmanager
def locked(data_dir: Path | str) -> Iterator[None]:
    """Hold DIR/cluster.lock (an exclusive flock) for the block; ClusterBusyError at once when
    another process holds it. The data dir must exist.

    Two `up`s at once on one data dir left the cluster broken and out of reach of `down`
    (found by a bug hunt): one adopted the coordinator the other had just started, the other
    failed and stopped everything it had started, pidfiles included. The lock goes with its
    open file, so a process killed while holding it (even by SIGKILL) releases it, and the
    servers never inherit it (Python opens files non-inheritable)."""
    path = Path(data_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise _lock_error(path, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterBusyError(
                f"another dtm.cluster command is running on {Path(data_dir).resolve()} "
                "(`up`, `down` or a demo); try again once it is done"
            ) from None
        except OSError as error:
            raise _lock_error(path, error) from None
        yield
    finally:
        os.close(fd)


def _lock_error(path: Path, error: OSError) -> ClusterLockError:
    """One line naming the lock file, what is wrong with it and what to do: the raw OSError
    ("[Errno 21] Is a directory") said neither (found by a bug hunt)."""
    if error.errno == errno.EROFS or (error.errno == errno.EACCES and not path.exists()):
        # The data dir, not the lock file: "remove it" sent an operator after a file that
        # was not there, or could not be removed (an operator's hunt).
        why = "is on a read-only file system" if error.errno == errno.EROFS else "is not writable"
        return ClusterLockError(
            f"cannot create the lock file {path.absolute()}: the data dir {path.parent.absolute()} "
            f"{why}; `up`, `down` and the demo write there (the lock, pidfiles, logs): make it "
            "writable, or start the cluster on another --data-dir"
        )
    if path.is_symlink() and not path.exists():
        what = f"a dangling symlink to {os.readlink(path)} ({error.strerror or error})"
    elif path.is_dir():
        what = "a directory"
    else:
        what = error.strerror or str(error)
    return ClusterLockError(
        f"cannot use the lock file {path.absolute()}: {what}; it holds nothing but the lock: "
        "remove it (or fix it) and try again. Until then `up`, `down` and the demo cannot act "
        "on this data dir (`down` cannot stop the processes running there)"
    )
