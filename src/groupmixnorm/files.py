"""Writing result files atomically: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` via a temporary file and an atomic rename."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees either the old file or the whole new one."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally it replaces ``path`` in one
    rename, and when it fails it is removed. Whoever writes inside the block never leaves half a file.

    The file gets the mode that ``open(path, "w")`` would give it: an existing file's mode, else
    ``0o666`` less the umask.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_file_beside(target)
    try:
        yield temporary
        if target.exists():
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _new_file_beside(target: Path) -> Path:
    """Create an empty, uniquely named file next to ``target`` with mode ``0o666`` less the umask (not
    ``tempfile.mkstemp``'s ``0o600``, which would make every result private)."""
    while True:
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy/torch scalars and arrays alike (.item() fails on arrays)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
