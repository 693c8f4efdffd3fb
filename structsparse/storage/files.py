"""Writing files atomically: a crash at any moment leaves either the old file or the new one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to an open binary file) to ``path``:
    a temporary file in the same directory, flushed and fsynced, then renamed over ``path``.
    An OSError that names no file (a full disk: ``[Errno 28]``) or the temporary file (a read-only folder) is
    raised again naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)) and e.errno is not None:
            raise OSError(e.errno, f"cannot write: {e.strerror}", str(path)) from e
        raise
    _fsync_dir(path.parent)
