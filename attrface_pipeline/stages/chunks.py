"""Append-only chunk membership: which source files make up which chunk, fixed once a chunk is registered.

Chunks used to be positions in the sorted listing, so one photo added to a folder shifted every later chunk. Here a
chunk's members are written down the first time the chunk is built, one small JSON file per chunk under
``<data_root>/_chunks/`` (``chunk-00007.json``): registered chunks keep their members forever; source files that no
registered chunk holds form new chunks, numbered after the last one, in listing order; a registered member that is
no longer listed is reported as missing, never moved to another chunk.

Members are source ids (``stages.ingest.source_listing``: ``<root label>/<relative path>``), so a build moved to
another path, or photos mounted elsewhere, keep their chunks. Registries written before source ids hold absolute
paths: they are read and migrated (each path becomes the listed id it ends with), never rebuilt.

One file per chunk needs no lock: two runs registering different chunks write different files, and two runs
registering the same chunk create it exclusively (the first wins; the second reads it back and agrees). Runs
that planned one chunk from different listings (photos added between two code-location loads) conflict, and the
later one is told to reload instead of silently building a chunk whose members differ from what another run built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attrface_pipeline.stages.ingest import chunk_key, migrate_member
from attrface_pipeline.storage import json_bytes, create_json_once

REGISTRY_DIR = "_chunks"
_CHUNK_FILE = re.compile(r"^chunk-(\d{5,})\.json$")


class ChunkConflict(RuntimeError):
    """A chunk was registered with other members than this run planned."""


@dataclass(frozen=True)
class ChunkPlan:
    """Every chunk of the configured sources, in order: the registered ones, then the new ones."""

    chunks: dict[str, list[str]]  # chunk -> source ids
    new: list[str] = field(default_factory=list)  # keys not registered yet
    missing: dict[str, list[str]] = field(default_factory=dict)  # registered members no longer listed, per chunk
    paths: dict[str, str] = field(default_factory=dict)  # source id -> this machine's path, for the listed ones

    def members(self, chunk: str) -> list[str]:
        return self.chunks[chunk]

    def path(self, source_id: str) -> str:
        """Where ``source_id`` is on this machine (a member no longer listed: its id, which ingest reports)."""
        return self.paths.get(source_id, source_id)


class ChunkRegistry:
    """The registered chunks of one data root (``<data_root>/_chunks/chunk-NNNNN.json``)."""

    def __init__(self, data_root: str | Path, remote: Any = None):
        """``remote``: a :class:`~attrface_pipeline.remote.RemoteRoot` whose working copy is ``data_root``; the
        registry then lives at the URL (entries created there exclusively) and is read through the copy."""
        self.dir = Path(data_root) / REGISTRY_DIR
        self.remote = remote

    def _file(self, chunk: str) -> Path:
        return self.dir / f"{chunk}.json"

    def _read(self, path: Path, listed: Any = ()) -> list[str]:
        try:
            return [migrate_member(str(p), listed) for p in json.loads(path.read_text())["members"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ChunkConflict(f"chunk registry entry {path} is unreadable ({err}); restore it from a backup, or "
                                f"delete it to let its photos form a new chunk") from err

    def registered(self, listed: Any = ()) -> dict[str, list[str]]:
        """{chunk: members} of every registered chunk, in chunk order, absolute paths of old entries migrated to
        the ``listed`` source ids. An unreadable entry is a clear error."""
        if self.remote is not None:
            self.remote.pull_files(REGISTRY_DIR)  # entries never change: new ones are all there is to fetch
        if not self.dir.is_dir():
            return {}
        found = sorted((int(m.group(1)), path) for path in self.dir.iterdir() if (m := _CHUNK_FILE.match(path.name)))
        return {path.name[: -len(".json")]: self._read(path, listed) for _, path in found}

    def plan(self, listing: Sequence[str], chunk_size: int, paths: dict[str, str] | None = None) -> ChunkPlan:
        """The chunks for ``listing`` (source ids, as :func:`source_listing` orders them): nothing is written.
        ``paths``: source id -> this machine's path, carried in the plan."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        listed = set(listing)
        chunks = self.registered(listed)
        held = {p for members in chunks.values() for p in members}
        missing = {c: [p for p in members if p not in listed] for c, members in chunks.items()}
        fresh = [p for p in listing if p not in held]
        start = max((int(c.split("-")[1]) for c in chunks), default=-1) + 1
        new = []
        for i in range(0, len(fresh), chunk_size):
            key = chunk_key(start + i // chunk_size)
            chunks[key] = fresh[i: i + chunk_size]
            new.append(key)
        return ChunkPlan(chunks, new, {c: m for c, m in missing.items() if m}, dict(paths or {}))

    def commit(self, chunk: str, members: Sequence[str], listed: Any = ()) -> bool:
        """Register ``chunk`` with ``members``; True if this call wrote it. Already registered with the same members:
        nothing to do. With other members: :class:`ChunkConflict`."""
        members = [str(p) for p in members]
        path = self._file(chunk)
        entry = {"chunk": chunk, "members": members,
                 "registered_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if self.remote is not None:
            wrote = not path.exists() and self.remote.create_once(f"{REGISTRY_DIR}/{path.name}", json_bytes(entry))
            self.remote.pull_files(REGISTRY_DIR)
        else:
            wrote = not path.exists() and create_json_once(path, entry)
        existing = self._read(path, listed or set(members))  # whoever created it first decides its members
        if existing != members:
            raise ChunkConflict(
                f"{chunk} is registered with {len(existing)} other members ({self._file(chunk)}) than this run "
                f"planned ({len(members)}): photos were added while another run registered it. Reload the code "
                f"location (or re-run the command) to plan from the registry again.")
        return wrote
