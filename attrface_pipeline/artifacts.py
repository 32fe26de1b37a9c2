"""Files the project writes and later trusts, verified when they are read back.

Every such file belongs to a registered *kind* (:class:`ArtifactKind`): what it is, its schema version and what to
do when it is damaged. A JSON artifact carries an integrity record beside its payload::

    {"_artifact": {"kind": "text_cache.index", "schema": 2, "sha256": "<of the canonical payload>"}, ...payload}

so readers that only look up keys keep working, and :func:`read_json` detects truncation, flipped bytes, garbage,
a folder in the file's place, another kind's file and an older schema, each named with the path and the remedy.
Binary files (safetensors parts, checkpoints) are verified by the sha256 that the JSON artifact referring to them
records (:func:`verify_file`). Appended logs (:func:`append_jsonl`, :func:`read_jsonl`) carry a checksum per line
and tolerate a torn last line: a killed writer loses at most the record it was writing, and the next append
starts on a fresh line.

The registry :data:`KINDS` is what the generative tests enumerate: each kind names a function that writes a small
real example through the project's own writer and one that reads it back through the project's own reader, so a
new kind of file is covered by the corruption tests the day it is registered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrface_pipeline.storage import atomic_write_bytes, finite_json, storage_error

INTEGRITY_KEY = "_artifact"


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of file the project writes and reads back.

    ``example(folder) -> [files]`` writes a small real instance with the project's writer and returns its files (the
    first is the one carrying the integrity record); ``read(files[0])`` reads it back with the project's reader,
    verifying everything it would trust. ``torn_tail_ok``: an appended log, whose cut last line is dropped rather
    than refused."""

    name: str
    schema: int
    what: str
    remedy: str
    example: Callable[[Path], list[Path]] | None = None
    read: Callable[[Path], Any] | None = None
    torn_tail_ok: bool = False


KINDS: dict[str, ArtifactKind] = {}
# Modules that register kinds: importing them fills KINDS (the registry is complete once all are imported).
KIND_MODULES = ("training.text_cache", "training.engine", "training.restore_faces")


def register(kind: ArtifactKind) -> ArtifactKind:
    if kind.name in KINDS and KINDS[kind.name] != kind:
        raise ValueError(f"artifact kind {kind.name!r} registered twice")
    KINDS[kind.name] = kind
    return kind


def all_kinds() -> dict[str, ArtifactKind]:
    """Every registered kind (imports the modules that register them)."""
    import importlib

    for module in KIND_MODULES:
        importlib.import_module(module)
    return dict(KINDS)


class ArtifactError(ValueError):
    """A file the project wrote cannot be trusted: one line naming the path, what is wrong and what to do."""

    def __init__(self, path: str | Path, problem: str, remedy: str = ""):
        self.path, self.problem, self.remedy = str(path), problem, remedy
        super().__init__(f"{path}: {problem}" + (f"; {remedy}" if remedy else ""))


class ArtifactMissingError(ArtifactError, FileNotFoundError):
    """The file is not there at all."""


def canonical(payload: Any) -> bytes:
    """The bytes a checksum is taken over: ``payload`` as it reads back from JSON, keys sorted, no whitespace."""
    normal = json.loads(json.dumps(finite_json(payload), default=str))
    return json.dumps(normal, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(payload: Any) -> str:
    return hashlib.sha256(canonical(payload)).hexdigest()


def _kind(kind: str | ArtifactKind) -> ArtifactKind:
    if isinstance(kind, ArtifactKind):
        return kind
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unregistered artifact kind {kind!r} (attrface_pipeline.artifacts.register)") from None


def sealed(kind: str | ArtifactKind, payload: dict) -> dict:
    """``payload`` with its integrity record (what :func:`write_json` writes)."""
    k = _kind(kind)
    body = {key: value for key, value in payload.items() if key != INTEGRITY_KEY}
    return {**finite_json(body), INTEGRITY_KEY: {"kind": k.name, "schema": k.schema, "sha256": digest(body)}}


def write_json(path: str | Path, kind: str | ArtifactKind, payload: dict) -> None:
    """Write ``payload`` (a mapping) atomically with its integrity record."""
    if not isinstance(payload, dict):
        raise TypeError(f"a JSON artifact holds a mapping, not {type(payload).__name__}")
    atomic_write_bytes(Path(path), json.dumps(sealed(kind, payload), indent=1, sort_keys=True, default=str,
                                              allow_nan=False).encode())


def _read_bytes(path: Path, k: ArtifactKind) -> bytes:
    if path.is_dir():
        raise ArtifactError(path, f"a folder where the {k.what} file belongs", f"remove it; {k.remedy}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArtifactMissingError(path, f"the {k.what} is missing", k.remedy) from None
    except OSError as err:
        raise ArtifactError(path, f"the {k.what} cannot be read ({err.strerror or err})", k.remedy) from None


def verify_payload(path: str | Path, kind: str | ArtifactKind, data: Any) -> dict:
    """The payload of parsed JSON ``data`` read from ``path``, its integrity record checked and removed."""
    k, path = _kind(kind), Path(path)
    if not isinstance(data, dict):
        raise ArtifactError(path, f"not a {k.what} (a JSON {type(data).__name__}, not a mapping)", k.remedy)
    record = data.get(INTEGRITY_KEY)
    if not isinstance(record, dict):
        raise ArtifactError(path, f"the {k.what} has no integrity record (written by an older AttrFace or by hand)",
                            k.remedy)
    if record.get("kind") != k.name:
        raise ArtifactError(path, f"a {record.get('kind')!r} file where the {k.what} ({k.name!r}) belongs",
                            k.remedy)
    if record.get("schema") != k.schema:
        raise ArtifactError(path, f"the {k.what} has schema {record.get('schema')!r}; this version reads schema "
                                  f"{k.schema}", k.remedy)
    body = {key: value for key, value in data.items() if key != INTEGRITY_KEY}
    if record.get("sha256") != digest(body):
        raise ArtifactError(path, f"the {k.what} fails its checksum (changed or damaged since it was written)",
                            k.remedy)
    return body


def read_json(path: str | Path, kind: str | ArtifactKind) -> dict:
    """The payload of a JSON artifact, verified; :class:`ArtifactError` (``ArtifactMissingError`` when absent)
    names the path, the problem and the remedy."""
    k, path = _kind(kind), Path(path)
    raw = _read_bytes(path, k)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(path, f"the {k.what} is not valid JSON (truncated or damaged)", k.remedy) from None
    return verify_payload(path, k, data)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """What :func:`verify_file` checks a file against later: {"bytes", "sha256"}."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def verify_file(path: str | Path, record: dict, kind: str | ArtifactKind) -> None:
    """Check that the file at ``path`` is the one ``record`` (:func:`file_record`) describes."""
    k, path = _kind(kind), Path(path)
    if path.is_dir():
        raise ArtifactError(path, f"a folder where a file of the {k.what} belongs", f"remove it; {k.remedy}")
    if not path.is_file():
        raise ArtifactMissingError(path, f"a file of the {k.what} is missing", k.remedy)
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise ArtifactError(path, f"a file of the {k.what} has {size} bytes, {record.get('bytes')} were written "
                                  f"(truncated or replaced)", k.remedy)
    if file_sha256(path) != record.get("sha256"):
        raise ArtifactError(path, f"a file of the {k.what} fails its checksum (changed or damaged since it was "
                                  f"written)", k.remedy)


# Appended logs: one JSON object per line, each with its own checksum under INTEGRITY_KEY ("sha256" only).


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record (with its line checksum). If the file ends in a torn line (its writer was killed), the
    record starts on a new line, so the torn one cannot swallow it."""
    path = Path(path)
    line = json.dumps({**finite_json(record), INTEGRITY_KEY: digest(record)}, default=str, allow_nan=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            lead = b""
            if f.tell():
                f.seek(-1, os.SEEK_END)
                lead = b"" if f.read(1) == b"\n" else b"\n"
            f.write(lead + line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise storage_error(path, err) from err


def read_jsonl(path: str | Path, kind: str | ArtifactKind) -> tuple[list[dict], list[str]]:
    """(records, problems) of an appended log: a torn last line is dropped silently (its record was never
    complete); any other damaged line is left out and named in ``problems`` ("line N: why"). A missing file is an
    empty log; a folder in its place raises :class:`ArtifactError`."""
    k, path = _kind(kind), Path(path)
    if not path.exists():
        return [], []
    raw = _read_bytes(path, k)
    lines = raw.split(b"\n")
    torn_tail = not raw.endswith(b"\n")
    records, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)
        try:
            data = json.loads(line.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            check = data.pop(INTEGRITY_KEY, None)
            if check != digest(data):
                raise ValueError("fails its checksum" if check else "has no checksum")
        except (UnicodeDecodeError, json.JSONDecodeError):
            why = "not valid JSON"
        except ValueError as err:
            why = str(err)
        else:
            records.append(data)
            continue
        if not (last and torn_tail):
            problems.append(f"line {number}: {why}")
    return records, problems


# Content fingerprints (weights files and folders): sha256 of every file, memoized per file by its stat.

_FILE_HASHES: dict[tuple, str] = {}
_RACY_NS = 2_000_000_000  # a file changed this recently may change again unseen within the clock's resolution


def _memo_file_sha256(path: Path) -> str:
    import time

    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    sha = file_sha256(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:  # only a settled file is remembered
        _FILE_HASHES[key] = sha
    return sha


def content_fingerprint(paths: str | Path | list[str | Path] | tuple[str | Path, ...]) -> str:
    """sha256 (hex) over the content of files and folders, streamed: a file's bytes; a folder's every file (links
    followed, names starting with "." skipped) with its path inside the folder, in sorted order. Names outside a
    folder do not count (the same weights moved elsewhere give the same fingerprint). Each file's hash is
    remembered for the process while its size, times and inode stay the same (a file modified in the last 2 s is
    hashed again each time). FileNotFoundError for a path that is not there."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    h = hashlib.sha256()
    for index, item in enumerate(items):
        item = Path(item)
        if item.is_dir():
            files = sorted((p.relative_to(item).as_posix(), p) for p in item.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts))
        elif item.is_file():
            files = [(".", item)]
        else:
            raise FileNotFoundError(f"{item}: no such file or folder to fingerprint")
        h.update(f"{index}\0{len(files)}\n".encode())
        for rel, path in files:
            h.update(json.dumps([rel, _memo_file_sha256(path)]).encode() + b"\n")  # names may hold any char
    return h.hexdigest()
