"""Writing folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["chmod_default", "crash_point", "staged_dir", "write_file"]

#: Test hook for fault injection: ``"<point>:<n>"`` kills the process with
#: SIGKILL the n-th time it reaches :func:`crash_point` ``(<point>)``.
CRASH_ENV = "QPEFT_TEST_CRASH_AT"
_crash_counts: dict[str, int] = {}

# Errors that mean "the disk (or the file size limit) is full", which the user
# fixes by making room rather than by changing anything in qpeft.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def crash_point(name: str) -> None:
    """Die here, as a power cut or ``kill -9`` would, when the fault-injection tests ask for it.

    Does nothing unless the environment variable ``QPEFT_TEST_CRASH_AT`` names
    this point (``"<name>:<n>"``, the n-th time it is reached); only
    tests/test_faults.py sets it.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    if target != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if str(_crash_counts[name]) == nth:
        os.kill(os.getpid(), signal.SIGKILL)


def write_file(path: Path, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` and flush it to the disk, so that a write error
    (a full disk) surfaces here as an OSError rather than later or never."""
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def _explain(e: OSError, dest: Path) -> OSError:
    """The error of a failed folder write, saying what, where, and what to do."""
    try:
        free = f"{shutil.disk_usage(dest.parent).free / 2**20:.1f} MiB free on that file system"
    except OSError:
        free = "free space unknown"
    hint = ("make room (or raise the file size limit, `ulimit -f`) and run again"
            if e.errno in _NO_SPACE else "fix the cause and run again")
    kept = f"the previous {dest.name!r} is unchanged" if dest.exists() else f"no {dest.name!r} was written"
    return OSError(e.errno, f"could not write {str(dest)!r}: {e.strerror or e} ({free}); {kept}; {hint}")


def chmod_default(path: Path, mode: int = 0o777) -> None:
    """Give ``path`` the permissions a plain mkdir/open would (``mode`` less the umask).

    mkdtemp makes folders private (0700) and safetensors writes files 0600;
    results the user keeps should not be.
    """
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; when the block succeeds it becomes ``dest``.

    An existing ``dest`` is replaced by two renames (the old one is kept if the
    second fails). If another process creates ``dest`` first, theirs is kept.
    On any error the temporary folder is removed and ``dest`` is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    chmod_default(tmp)
    try:
        try:
            yield tmp
            crash_point(f"{dest.name}:written")
            _replace_dir(tmp, dest)
        except OSError as e:
            raise _explain(e, dest) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        crash_point(f"{dest.name}:swapping")
        try:
            os.replace(new, dest)
        except OSError:
            os.replace(old, dest)
            raise
        _sync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(new, dest)
    except OSError:
        if not dest.exists():
            raise
    _sync_dir(dest.parent)


def _sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
