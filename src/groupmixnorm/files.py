"""Result files: written atomically (a reader sees the old file or the whole new one, never half of it),
and :class:`JsonStore`, the one store of finished work that every bench resumes from."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
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


class JsonStore:
    """One JSON file per finished unit of work under ``root``, named by its key (``root/<key>.json``; a key
    may hold ``/`` for subfolders).

    A stored record is reused only while it is readable and ``valid`` accepts it (a record made for other
    settings, or before a metric existed, is made again); everything is written atomically, so a killed run
    leaves whole records and resumes from them.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def file(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def read(self, key: str, valid: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """The record stored under ``key``, or ``None`` if there is none, it is unreadable, or ``valid``
        rejects it."""
        path = self.file(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # never written half-way by us (writes are atomic), but a hand edit may break it
        if not isinstance(record, dict) or (valid is not None and not valid(record)):
            return None
        return record

    def write(self, key: str, record: dict[str, Any]) -> Path:
        return write_json_atomic(self.file(key), record)

    def reuse_or_make(self, key: str, make: Callable[[], dict[str, Any]],
                      valid: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The valid record under ``key``, else ``make()``'s, stored before it is returned."""
        record = self.read(key, valid)
        if record is None:
            record = make()
            self.write(key, record)
        return record


def json_digest(value: Any) -> str:
    """12 hex digits of the SHA-256 of ``value`` as sorted JSON: a short, stable name for a record's identity."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def same_as_json(stored: Any, value: Any) -> bool:
    """Whether ``stored`` (read back from JSON) is ``value`` written as JSON (tuples come back as lists)."""
    return stored == json.loads(json.dumps(value, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy/torch scalars and arrays alike (.item() fails on arrays)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
