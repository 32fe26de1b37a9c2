"""A data root at an fsspec URL (object storage on a cluster), worked on through a local working copy.

Steps compute exactly as on a local data root, in ``paths.work_dir``; this module moves finished work between that
copy and the URL, keeping the local root's guarantees:

- **A file is whole or absent.** Where the filesystem can rename (``file://``), a file is uploaded under a temporary
  name and renamed into place; on object stores (``s3://``, ``gs://``, ``memory://``) one PUT is all-or-nothing.
- **A partition is complete only with its ``_stats.json``** (the commit marker): a push first removes the remote
  marker, uploads every other file, removes remote files the working copy no longer has, and writes the marker
  last. A push interrupted at any point leaves a partition that reads as incomplete, and the next run redoes it.
- **Exclusive create** (the chunk registry) uses the filesystem's ``"xb"`` mode: ``O_EXCL`` locally, a conditional
  PUT (``If-None-Match``) on S3.

A pull copies a complete remote partition into the working copy when the copy's marker differs from the remote
one. Partial (uncommitted) remote work is never pulled: resuming inside a partition is per machine; across
machines the unit of resumption is the partition (one chunk).

Nothing here needs Dagster.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attrface_pipeline.storage import STATS_FILE, StorageError, atomic_write_bytes, storage_error

LOCAL_PROTOCOLS = {"file", "local"}


def is_url(value: str | Path) -> bool:
    return isinstance(value, str) and "://" in value


class RemoteRoot:
    """The data root at ``url``; ``local`` is this machine's working copy of it (``paths.work_dir``)."""

    def __init__(self, url: str, local: str | Path, storage_options: dict[str, Any] | None = None):
        import fsspec  # imported on use: a local data root never needs it

        self.url, self.local = url.rstrip("/"), Path(local)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.renames = bool(LOCAL_PROTOCOLS & set(protocols))  # POSIX rename is atomic; object stores have none

    def __repr__(self) -> str:
        return f"RemoteRoot({self.url!r}, working copy {str(self.local)!r})"

    # -- paths ------------------------------------------------------------------------------------------------
    def _remote(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def _rel(self, remote_path: str) -> str:
        return posixpath.relpath(remote_path.rstrip("/"), self.root)

    def _where(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    @contextmanager
    def _errors(self, rel: str) -> Iterator[None]:
        """An OSError of the remote filesystem (full, quota, read-only, denied) names the URL, like a local one."""
        try:
            yield
        except (StorageError, FileNotFoundError, FileExistsError):
            raise
        except OSError as err:
            raise storage_error(self._where(rel), err) from err

    def _files(self, rel: str) -> list[str]:
        """Relative paths of the remote files under ``rel`` (none if it does not exist)."""
        base = self._remote(rel)
        if not self.fs.exists(base):
            return []
        return sorted(self._rel(p) for p in self.fs.find(base) if not posixpath.basename(p).startswith("."))

    def _read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._remote(rel))
        except FileNotFoundError:
            return None

    # -- writing ----------------------------------------------------------------------------------------------
    def put_bytes(self, rel: str, data: bytes) -> None:
        """One remote file, whole or absent."""
        target = self._remote(rel)
        with self._errors(rel):
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            if self.renames:
                tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.upload.tmp")
                try:
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, target)
                finally:
                    if self.fs.exists(tmp):
                        self.fs.rm_file(tmp)
            else:
                self.fs.pipe_file(target, data)

    def create_once(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if nothing is there; of concurrent writers exactly one wins. True if this call did."""
        target = self._remote(rel)
        with self._errors(rel):
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            try:
                with self.fs.open(target, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
        return True

    def _remove(self, rels: Iterable[str]) -> None:
        for rel in rels:
            with self._errors(rel):
                try:
                    self.fs.rm_file(self._remote(rel))
                except FileNotFoundError:
                    pass

    # -- whole directories ------------------------------------------------------------------------------------
    def push(self, rel: str) -> int:
        """Make the remote ``rel`` equal the working copy's, ``_stats.json`` last; returns the files uploaded."""
        local = self.local / rel
        marker = local / STATS_FILE
        files = sorted(str(p.relative_to(self.local).as_posix()) for p in local.rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        if not marker.exists():  # no commit marker to keep last (a run folder): each file whole, nothing removed
            for f in files:
                self.put_bytes(f, (self.local / f).read_bytes())
            return len(files)
        body = [f for f in files if posixpath.basename(f) != STATS_FILE or posixpath.dirname(f) != rel]
        self._remove([posixpath.join(rel, STATS_FILE)])  # from here on the remote copy reads as incomplete
        for f in body:
            self.put_bytes(f, (self.local / f).read_bytes())
        self._remove(sorted(set(self._files(rel)) - set(files)))  # leftovers of an older version
        self.put_bytes(posixpath.join(rel, STATS_FILE), marker.read_bytes())
        return len(files)

    def pull(self, rel: str) -> bool:
        """Copy the complete remote ``rel`` into the working copy if the copy's marker differs; True if copied.
        The local marker is written last, so an interrupted pull reads as incomplete locally too."""
        remote_marker = self._read(posixpath.join(rel, STATS_FILE))
        local = self.local / rel
        if remote_marker is None:
            return False
        marker = local / STATS_FILE
        if marker.exists() and marker.read_bytes() == remote_marker:
            return False
        marker.unlink(missing_ok=True)
        files = self._files(rel)
        for f in files:
            if posixpath.basename(f) == STATS_FILE and posixpath.dirname(f) == rel:
                continue
            atomic_write_bytes(self.local / f, self.fs.cat_file(self._remote(f)))
        kept = {self.local / f for f in files}
        for p in sorted(local.rglob("*"), reverse=True):  # files of an older local version
            if p.is_file() and p not in kept and not p.name.startswith("."):
                p.unlink()
        atomic_write_bytes(marker, remote_marker)
        return True

    def is_committed(self, rel: str) -> bool:
        """The remote ``rel`` carries the same marker as the working copy."""
        marker = self.local / rel / STATS_FILE
        return marker.exists() and self._read(posixpath.join(rel, STATS_FILE)) == marker.read_bytes()

    def pull_partition(self, partition: str) -> list[str]:
        """Every asset's complete remote ``<asset>/<partition>/`` (a step reads its upstreams'); the assets copied."""
        if not self.fs.exists(self.root):
            return []
        assets = sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        return [a for a in assets if not a.startswith(("_", ".")) and self.pull(posixpath.join(a, partition))]

    def pull_files(self, rel: str) -> int:
        """Remote files under ``rel`` that the working copy lacks (immutable entries: the chunk registry)."""
        missing = [f for f in self._files(rel) if not (self.local / f).exists()]
        for f in missing:
            atomic_write_bytes(self.local / f, self.fs.cat_file(self._remote(f)))
        return len(missing)

    def relative_or_same(self, path: str | Path) -> str | None:
        """A relative entry as is; a :class:`Path` relative to the working copy, or None when it lies outside."""
        if isinstance(path, str):
            return path
        try:
            return Path(path).resolve().relative_to(self.local.resolve()).as_posix()
        except ValueError:
            return None


def remote_root(paths: Any) -> RemoteRoot | None:
    """The :class:`RemoteRoot` of a ``PathsConfig`` whose data root is a URL, else None (a local data root)."""
    if not getattr(paths, "data_url", None):
        return None
    return RemoteRoot(paths.data_url, paths.data_root, paths.storage_options)


def pull_chunks(paths: Any, partitions: Sequence[str]) -> None:
    """Bring every asset's committed work for ``partitions`` into the working copy (no-op on a local root)."""
    if (remote := remote_root(paths)) is not None:
        for partition in partitions:
            remote.pull_partition(partition)


def pull_dirs(paths: Any, *entries: str | Path) -> None:
    """Bring directories of the data root into the working copy (no-op on a local root). Entries are relative to
    the data root, or paths (skipped when outside the working copy). A directory with a ``_stats.json`` comes as a
    committed unit; one without (a training run folder), the files this copy lacks."""
    if (remote := remote_root(paths)) is None:
        return
    for rel in filter(None, map(remote.relative_or_same, entries)):
        if not remote.pull(rel) and remote._read(posixpath.join(rel, STATS_FILE)) is None:
            remote.pull_files(rel)


def push_dirs(paths: Any, *entries: str | Path) -> None:
    """Commit directories of the working copy to the URL data root (no-op on a local root); see :meth:`push`."""
    if (remote := remote_root(paths)) is None:
        return
    for rel in filter(None, map(remote.relative_or_same, entries)):
        remote.push(rel)


@contextmanager
def synced(paths: Any, pull: Sequence[str | Path] = (), push: Sequence[str | Path] = ()) -> Iterator[None]:
    """Around a step that is not partitioned by chunk: :func:`pull_dirs` its inputs, then :func:`push_dirs` its
    outputs when the block succeeds."""
    pull_dirs(paths, *pull)
    yield
    push_dirs(paths, *push)
