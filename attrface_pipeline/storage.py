"""Atomic, resumable partition storage: ``<data_root>/<asset>/<partition>/`` with a manifest and a marker.

Every file is written to a temporary name in its destination directory and renamed into place, so a crash
never leaves a half-written file under its final name. ``_stats.json`` is written last: its presence (with a
matching config fingerprint) is what makes a partition complete.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

STATS_FILE = "_stats.json"
MANIFEST_FILE = "manifest.parquet"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publishable(tmp: str | Path) -> None:
    """mkstemp files are 0600; give the final file the mode a plain open() would (0666 minus the umask)."""
    os.chmod(tmp, 0o666 & ~_umask())


# Errors of the filesystem under the data root, not of the data: a full disk, a quota, a read-only mount, no
# permission, a file-size limit. They stop the step with one message naming the path instead of a bare errno.
_STORAGE_ERRNOS = {errno.ENOSPC: "the filesystem is full", errno.EDQUOT: "the disk quota is exhausted",
                   errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied", errno.EFBIG: "the file exceeds the size limit"}


class StorageError(OSError):
    """Writing under the data root failed for a reason of the filesystem; nothing was left under the final name."""


def storage_error(path: Path | str, err: OSError) -> StorageError:
    """``path``: a local path, or a URL string (a remote data root)."""
    why = _STORAGE_ERRNOS.get(err.errno, err.strerror or type(err).__name__)
    parent = path.rsplit("/", 1)[0] if isinstance(path, str) else path.parent
    return StorageError(err.errno, f"cannot write {path}: {why} ({err.strerror}). Nothing was left under that "
                                   f"name; free space or fix the mount/permissions of {parent} (or point "
                                   f"paths.data_root elsewhere), then re-run: complete work is reused.")


@contextmanager
def _storage_errors(path: Path, errnos: Iterable[int] = _STORAGE_ERRNOS) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        if err.errno in errnos:
            raise storage_error(path, err) from err
        raise


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # what a write to an open file can hit


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only when the block completes (temp file, fsync, rename).

    A filesystem failure (full, read-only, quota, permissions, size limit) raises :class:`StorageError` naming
    ``path``; other errors of the block pass through unchanged. Either way the temp file is removed."""
    path = Path(path)
    tmp = None
    try:
        with _storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with _storage_errors(path, _WRITE_ERRNOS), os.fdopen(fd, "wb") as f:  # the body's writes, and the close
            yield f
            with _storage_errors(path):
                f.flush()
                os.fsync(f.fileno())
        with _storage_errors(path):
            publishable(tmp)
            os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (inf, -inf, nan) replaced by None, so that the JSON written is standard
    JSON: Python's ``Infinity``/``NaN`` tokens are not, and other readers refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def check_output_file(path: str | Path, what: str = "--json") -> Path:
    """``path`` usable as an output file, checked before any work: ValueError when it is a folder or one of its
    parents is a file (``what`` names it in the message)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: name a file in it (e.g. {path / 'results.json'})")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    return path


def json_bytes(obj: Any) -> bytes:
    """``obj`` as standard JSON (non-finite numbers become null: :func:`finite_json`), keys sorted."""
    return json.dumps(finite_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False).encode()


def create_json_once(path: Path, obj: Any) -> bool:
    """Write ``obj`` to ``path`` only if nothing is there: complete or absent, and of two concurrent writers exactly
    one wins (the file is linked into place, which fails if the name exists). True if this call created it."""
    path, tmp = Path(path), None
    try:
        with _storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(json_bytes(obj))
                f.flush()
                os.fsync(f.fileno())
            publishable(tmp)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class PartitionStore:
    """Files of one asset partition. ``fingerprint`` identifies the config that produced them."""

    def __init__(self, data_root: Path, asset: str, partition: str):
        self.dir = Path(data_root) / asset / partition
        self.asset = asset
        self.partition = partition

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_FILE

    @property
    def stats_path(self) -> Path:
        return self.dir / STATS_FILE

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def read_stats(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def fingerprint(self) -> str:
        """The fingerprint of the completed partition ("" when incomplete): downstream fingerprints include it."""
        return (self.read_stats() or {}).get("fingerprint", "")

    def guard_resume(self, fingerprint: str, *work_dirs: str) -> None:
        """Keep per-item work (records, images) only if it was made under ``fingerprint``; else start afresh."""
        guard = self.path("records", "_fingerprint")
        if not guard.exists() or guard.read_text() != fingerprint:
            for d in ("records", *work_dirs):
                shutil.rmtree(self.path(d), ignore_errors=True)
            atomic_write_bytes(guard, fingerprint.encode())

    def is_complete(self, fingerprint: str) -> bool:
        stats = self.read_stats()
        return stats is not None and stats.get("fingerprint") == fingerprint and self.manifest_path.exists()

    def invalidate(self) -> None:
        """Drop the completion marker first, so a crash mid-rewrite can never look complete."""
        self.stats_path.unlink(missing_ok=True)

    def write_manifest(self, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        atomic_write_parquet(self.manifest_path, pa.Table.from_pylist(rows, schema=schema))

    def read_manifest(self) -> pa.Table:
        if not self.manifest_path.exists():
            raise FileNotFoundError(
                f"{self.asset} partition {self.partition!r} has no manifest at {self.manifest_path}; "
                f"materialize the upstream asset for this partition first"
            )
        return pq.read_table(self.manifest_path)

    def complete(self, stats: dict[str, Any], fingerprint: str) -> None:
        atomic_write_json(self.stats_path, {**stats, "fingerprint": fingerprint})
