"""Writing folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["chmod_default", "staged_dir"]


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
        yield tmp
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except OSError:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(new, dest)
    except OSError:
        if not dest.exists():
            raise
