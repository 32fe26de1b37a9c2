"""Ingest: list source photos, split them into chunks, and decode each one safely.

Bad inputs never raise out of :func:`ingest_file`, whatever the bytes or the kind of file: each becomes a record
with ``status="quarantined"`` and a reason from :class:`Reason`. :func:`load_rgb` is the single place a source file
becomes an RGB array (EXIF orientation applied, modes converted), so every later stage sees the same pixels, and the
same verdicts, that ingest gave.

Content keys are unique over the whole build: of several copies of one photo (in two chunks, or under two names)
the copy earliest in the global source order (chunk order, then position in the chunk) is kept and the others are
quarantined as ``duplicate`` (:func:`ingest_chunk` with ``earlier`` from a :class:`ContentIndex`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import stat
import threading
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from attrface_pipeline.storage import atomic_write_json

KEY_LENGTH = 16  # hex chars of sha256: 64 bits, collision-free far beyond 100M images
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}
# Modes PIL converts to RGB without losing meaning; alpha is composited on white.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIMPLE_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "P", "LAB", "HSV", "RGBX"}
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# EXIF orientation -> the transpose that makes the photo upright (the table of ImageOps.exif_transpose). Applied
# here rather than through exif_transpose, which also re-serialises the EXIF block and can fail on a malformed one.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Decoder messages that mean "the data ends too early" (Pillow has no exception type for it).
_TRUNCATION_HINTS = ("truncated", "broken data stream", "premature end", "end of file", "not enough data",
                     "unexpected end", "buffer is not large enough", "incomplete")


class Reason(str, Enum):
    not_an_image = "not_an_image"
    unsupported_format = "unsupported_format"
    unsupported_mode = "unsupported_mode"
    truncated = "truncated"
    too_small = "too_small"
    decompression_bomb = "decompression_bomb"
    unreadable = "unreadable"
    duplicate = "duplicate"
    broken_link = "broken_link"  # a dangling symlink or a symlink loop
    not_a_file = "not_a_file"  # a directory, FIFO, socket or device named like an image


class QuarantineError(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class SourceRecord:
    key: str
    source_path: str  # where it was read (this machine's path, for people)
    sha256: str
    width: int
    height: int
    format: str
    mode: str
    orientation: int
    status: str  # "ok" | "quarantined"
    reason: str  # "" when ok
    detail: str
    source_id: str = ""  # the relocatable name (see source_listing): what fingerprints and the registry use


SOURCE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("orientation", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("source_id", pa.string()),
    ]
)


def list_sources(specs: Iterable[str], extensions: Iterable[str]) -> list[str]:
    """Absolute paths of source images, in a stable order: per spec, sorted; specs in the given order.

    A spec is a folder (scanned recursively), a glob pattern, a ``.txt`` file listing one path per line
    (relative paths resolve against the list file's folder; ``#`` starts a comment), or a single file.
    New data appended as a new spec leaves earlier chunks unchanged.

    Every entry that looks like a source is listed, whatever it turns out to be: a dangling symlink, a symlink loop,
    a FIFO or a directory named like an image, or a folder the scan cannot open, so that ingest accounts for it
    with a quarantine reason instead of it vanishing from the counts.
    """
    return list(source_listing(specs, extensions))


def source_listing(specs: Iterable[str], extensions: Iterable[str]) -> dict[str, str]:
    """{absolute path: source id} of :func:`list_sources`, in its order.

    A **source id** names a photo wherever the photos are mounted: ``<root label>/<path relative to the root>``,
    where the root is the spec's folder (a glob: its folder before the first wildcard; a list file or a single
    file: the folder holding it) and the label is the root's last path component, extended with its parents when
    two specs share it. The chunk registry, the raw_images manifests and every fingerprint record ids, so a build
    moved to another path, or read on a machine that mounts the photos elsewhere (``source.paths`` pointing
    there), plans and computes nothing again. A list-file entry outside its folder keeps its absolute path as id.
    """
    exts = {e.lower() for e in extensions}
    specs = list(specs)
    out: dict[str, str] = {}

    def named_like_image(p: str) -> bool:
        return os.path.splitext(p)[1].lower() in exts

    resolved = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            resolved.append((os.path.abspath(path), sorted(_scan_folder(str(path), named_like_image))))
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
            resolved.append((os.path.abspath(path.parent), sorted(
                str((path.parent / ln) if not os.path.isabs(ln) else Path(ln)) for ln in lines if ln)))
        elif any(ch in spec for ch in "*?["):
            # A glob selects files by its own pattern; folders it matches are sources only when named like one.
            parts = Path(os.path.expanduser(spec)).parts
            stem = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
            resolved.append((os.path.abspath(Path(*parts[:stem]) if stem else "."), sorted(
                p for p in glob.glob(os.path.expanduser(spec), recursive=True)
                if not os.path.isdir(p) or named_like_image(p))))
        elif os.path.lexists(path):  # a file, or a link/FIFO that ingest will quarantine with the reason
            resolved.append((os.path.abspath(path.parent), [str(path)]))
        else:
            raise FileNotFoundError(f"source {spec!r} is not a folder, list file, glob or file")
    labels = _root_labels([root for root, _ in resolved])
    for (root, paths), label in zip(resolved, labels):
        for p in paths:
            p = os.path.abspath(p)
            if p in out:
                continue
            rel = os.path.relpath(p, root)
            out[p] = p if rel.startswith("..") else "/".join(filter(None, (label, Path(rel).as_posix())))
    return out


def _root_labels(roots: list[str]) -> list[str]:
    """The shortest trailing path of each root that no other (different) root shares."""
    parts = [Path(r).parts[1:] or ("",) for r in roots]
    labels = []
    for i, own in enumerate(parts):
        others = {tuple(p) for j, p in enumerate(parts) if roots[j] != roots[i]}
        for n in range(1, len(own) + 1):
            tail = own[-n:]
            if not any(o[-n:] == tail for o in others):
                break
        labels.append("/".join(tail))
    return labels


def migrate_member(member: str, ids: Mapping[str, object] | set[str]) -> str:
    """A chunk-registry member as a source id: ids pass through; an absolute path (registries written before
    source ids) becomes the id it ends with -- the longest one listed now -- or stays as it is (a missing file)."""
    if not os.path.isabs(member) or member in ids:
        return member
    parts = Path(member).parts
    for k in range(1, len(parts)):
        candidate = "/".join(parts[k:])
        if candidate in ids:
            return candidate
    return member


def _scan_folder(root: str, wanted: Callable[[str], bool]) -> list[str]:
    """Entries under ``root`` named like images (any kind: file, link, FIFO, directory), plus unlistable folders.

    Symlinked folders are listed, not entered (as ``Path.rglob`` did): following them could loop or leave the tree.
    """
    found: list[str] = []

    def unlistable(error: OSError) -> None:  # os.walk would skip it silently; its photos would vanish uncounted
        if error.filename:
            found.append(error.filename)

    for folder, dirs, files in os.walk(root, onerror=unlistable, followlinks=False):
        found += [os.path.join(folder, name) for name in (*dirs, *files) if wanted(name)]
    return found


def chunk_key(index: int) -> str:
    return f"chunk-{index:05d}"


def chunk_sources(paths: list[str], chunk_size: int) -> dict[str, list[str]]:
    """Split the ordered source list into partitions ``chunk-00000``, ``chunk-00001``, ..."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return {chunk_key(i // chunk_size): paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)}


def sample_key(sha256_hex: str) -> str:
    """Short content hash: the same photo always gets the same key (hex only, so never a dot)."""
    return sha256_hex[:KEY_LENGTH]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _not_a_file(path: str, mode: int) -> QuarantineError:
    if stat.S_ISDIR(mode):
        try:
            with os.scandir(path):
                pass
        except OSError as e:
            return QuarantineError(Reason.unreadable, f"{path} is a folder the source scan could not list: {e}")
    return QuarantineError(Reason.not_a_file, f"{path} is {_kind(mode)}, not an image file")


def _open_failure(path: str, error: OSError) -> QuarantineError:
    """Why ``path`` could not be opened, in the terms of :class:`Reason`."""
    if error.errno == errno.ELOOP:
        return QuarantineError(Reason.broken_link, f"{path} is a symlink loop ({error.strerror})")
    if error.errno == errno.ENOENT and os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return QuarantineError(Reason.broken_link, f"{path} is a dangling symlink: target {target!r} does not exist")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode and not stat.S_ISREG(mode):  # e.g. a socket, which open() refuses with ENXIO
        return _not_a_file(path, mode)
    return QuarantineError(Reason.unreadable, f"cannot open {path}: {type(error).__name__}: {error.strerror or error}")


def read_source(path: str | Path) -> bytes:
    """The bytes of one source file, or :class:`QuarantineError` saying why it cannot be one.

    Opened non-blocking and checked with fstat on the open descriptor before any read, so a FIFO or a device is
    refused without blocking, and a file swapped for one between listing and reading is caught too.
    """
    path = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _open_failure(path, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_a_file(path, mode)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise QuarantineError(Reason.unreadable, f"cannot read {path}: {type(e).__name__}: {e}") from None
    finally:
        os.close(fd)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in _WIDE_MODES:
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:  # 32-bit int or float: stretch the actual range
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIMPLE_MODES:
        return im.convert("RGB")
    raise QuarantineError(Reason.unsupported_mode, f"image mode {mode!r} has no sensible RGB conversion")


def _classify(error: BaseException) -> Reason:
    if isinstance(error, Image.DecompressionBombError):
        return Reason.decompression_bomb
    text = str(error).lower()
    if isinstance(error, EOFError) or any(hint in text for hint in _TRUNCATION_HINTS):
        return Reason.truncated
    return Reason.unreadable


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Any failure of a PIL call on untrusted bytes becomes a verdict naming the step, never a crash."""
    try:
        yield
    except QuarantineError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise QuarantineError(_classify(e), f"{what}: {type(e).__name__}: {e}") from None


_pil_limit_lock = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: int | None = None


@contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Pillow's own bomb check off while we decode: ``max_pixels`` is ours and may exceed Pillow's 89.5 MP.

    Pillow's check (a module global) would otherwise warn or raise before ours, with its own number. Ours runs on
    the header before any pixel is decoded, and every size Pillow checks later while loading (GIF disposal, TIFF
    tiles, crops) lies within that header size. Counted under a lock, so threads decoding at the same time do not
    restore the global under each other; the last one out puts back what was there.
    """
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def _orientation(exif: Mapping) -> int:
    value = exif.get(0x0112, 1)
    # Cameras write 0 or junk here; like exif_transpose, anything but 1..8 means "as stored".
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(data: bytes, *, min_side: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    """Decode bytes to HWC uint8 RGB with EXIF orientation applied; raise :class:`QuarantineError` on bad input.

    Raises nothing else, whatever the bytes: every PIL call on them is guarded.
    """
    if not data:
        raise QuarantineError(Reason.not_an_image, "file is empty (0 bytes)")
    with _our_pixel_limit():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise QuarantineError(Reason.not_an_image, "no image decoder recognises this file") from None
        except Exception as e:  # noqa: BLE001 - a header that breaks a parser is a per-file quarantine
            raise QuarantineError(_classify(e), f"reading the header: {type(e).__name__}: {e}") from None
        try:
            return _decode_opened(im, min_side=min_side, max_pixels=max_pixels)
        finally:
            try:
                im.close()
            except Exception:  # noqa: BLE001 - closing an in-memory file cannot lose data
                pass


def _decode_opened(im: Image.Image, *, min_side: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    with _step("reading the header"):
        fmt = im.format or "?"
        width, height = im.size
        mode = im.mode
    if fmt not in SUPPORTED_FORMATS:
        raise QuarantineError(Reason.unsupported_format, f"format {fmt} is not one of {sorted(SUPPORTED_FORMATS)}")
    if width < 1 or height < 1:
        raise QuarantineError(Reason.not_an_image, f"header claims {width}x{height} pixels")
    if width * height > max_pixels:  # checked on the header, before any pixel is decoded
        raise QuarantineError(Reason.decompression_bomb, f"{width}x{height} exceeds max_pixels={max_pixels}")
    with _step("decoding pixels"):
        im.load()
    # A malformed EXIF block quarantines the photo rather than publishing it possibly turned on its side.
    with _step("reading EXIF"):
        orientation = _orientation(im.getexif())
    with _step(f"converting {mode} to RGB"):
        upright = im.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else im
        rgb = _to_rgb(upright)
        array = np.asarray(rgb, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"conversion gave an array of shape {array.shape}")
    if min(rgb.size) < min_side:
        raise QuarantineError(Reason.too_small, f"{rgb.size[0]}x{rgb.size[1]} has a side below min_side={min_side}")
    info = {"format": fmt, "mode": mode, "orientation": orientation, "width": rgb.size[0], "height": rgb.size[1]}
    return array, info


def load_rgb(path: str | Path, *, min_side: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """Read a source file, returning (RGB array, sha256 hex of its bytes); raises only :class:`QuarantineError`,
    with the verdict :func:`ingest_file` gives the same file."""
    data = read_source(path)
    rgb, _ = decode_image(data, min_side=min_side, max_pixels=max_pixels)
    return rgb, hashlib.sha256(data).hexdigest()


def _quarantined(path: str, key: str, digest: str, q: QuarantineError) -> SourceRecord:
    return SourceRecord(key, path, digest, 0, 0, "", "", 1, "quarantined", q.reason.value, q.detail)


def ingest_file(path: str, *, min_side: int, max_pixels: int) -> SourceRecord:
    """Validate one source file; never raises for bad content or odd files (it is quarantined with the reason)."""
    try:
        data = read_source(path)
    except QuarantineError as q:
        return _quarantined(path, "", "", q)
    digest = hashlib.sha256(data).hexdigest()
    key = sample_key(digest)
    try:
        _, info = decode_image(data, min_side=min_side, max_pixels=max_pixels)
    except QuarantineError as q:
        return _quarantined(path, key, digest, q)
    return SourceRecord(
        key, path, digest, info["width"], info["height"], info["format"], info["mode"], info["orientation"],
        "ok", "", "",
    )


def ingest_chunk(paths: Sequence[str], *, min_side: int, max_pixels: int,
                 earlier: Mapping[str, str] | None = None, ids: Sequence[str] | None = None) -> list[SourceRecord]:
    """Ingest every path of a chunk. A photo whose content key was seen before -- earlier in this chunk, or in
    ``earlier`` (key -> first source id over all chunks before this one, see :class:`ContentIndex`) -- is
    quarantined as a duplicate naming the first copy, so every key is published once, whichever chunk runs first.
    ``ids``: the paths' source ids (default: the paths themselves)."""
    ids = list(paths) if ids is None else list(ids)
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} source ids for {len(paths)} paths")
    records: list[SourceRecord] = []
    first_by_key: ChainMap[str, str] = ChainMap({}, earlier or {})  # new keys go to the first map
    for path, source_id in zip(paths, ids):
        rec = ingest_file(path, min_side=min_side, max_pixels=max_pixels)
        rec.source_id = source_id
        if rec.key and rec.key in first_by_key:
            if rec.status == "ok":  # a quarantined copy keeps its own reason (identical bytes, identical verdict)
                rec.status, rec.reason = "quarantined", Reason.duplicate.value
                rec.detail = f"same content as {first_by_key[rec.key]} (the first copy in source order)"
        elif rec.key:
            first_by_key[rec.key] = source_id
        records.append(rec)
    return records


def records_to_rows(records: list[SourceRecord]) -> list[dict]:
    return [asdict(r) for r in records]


class HashCache:
    """sha256 of source files, reused while their (size, mtime_ns) are unchanged, so looking at earlier chunks
    costs one stat per file once they have been hashed.

    One JSON file per chunk under ``folder`` (``{abs path: [size, mtime_ns, sha256]}``), written atomically;
    a lost or corrupt cache file only costs a re-hash. ``folder=None`` hashes without caching.
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    def _file(self, name: str) -> Path | None:
        return self.folder / f"{name}.json" if self.folder is not None else None

    def _load(self, name: str) -> dict[str, list]:
        file = self._file(name)
        if file is None:
            return {}
        try:
            cached = json.loads(file.read_text())
        except (OSError, ValueError):
            return {}
        return cached if isinstance(cached, dict) else {}

    def digests(self, name: str, paths: Sequence[str]) -> dict[str, str]:
        """{path: sha256} for the paths of chunk ``name`` that are readable regular files (the others have no
        content key, exactly as in ingest)."""
        cached, entries, out, hashed = self._load(name), {}, {}, False
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            hit = cached.get(path)
            if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [st.st_size, st.st_mtime_ns]:
                digest = hit[2]
            else:
                try:
                    digest = hashlib.sha256(read_source(path)).hexdigest()
                except QuarantineError:
                    continue
                hashed = True
            out[path] = digest
            entries[path] = [st.st_size, st.st_mtime_ns, digest]
        file = self._file(name)
        if file is not None and (hashed or entries.keys() != cached.keys()):
            atomic_write_json(file, entries)
        return out


class ContentIndex:
    """The first path of every content key over the chunks in source order, to find duplicates across chunks.

    A chunk's keys come from its complete raw_images manifest when ``manifest(chunk)`` has one that lists exactly
    the chunk's current paths, else from hashing its files (through ``cache``). Either way they depend on the
    earlier chunks' contents only, never on which partitions ran first. Asking for partitions in source order (as a
    run over a partition range does) reads or hashes each chunk once; with the hash cache, a later run over files
    already hashed costs one stat per file.
    """

    def __init__(self, chunks: Mapping[str, Sequence[str]], *,
                 manifest: Callable[[str], Sequence[Mapping] | None], cache: HashCache,
                 resolve: Callable[[str], str] | None = None):
        """``chunks``: {chunk: source ids}; ``resolve``: source id -> this machine's path (default: the id)."""
        self.chunks = chunks
        self.order = list(chunks)
        self.manifest = manifest
        self.cache = cache
        self.resolve = resolve or (lambda source_id: source_id)
        self._prefix: dict[str, str] = {}
        self._prefix_chunks = 0

    def chunk_keys(self, chunk: str) -> dict[str, str]:
        """{content key: first source id} of one chunk (files that cannot be read have no key)."""
        ids = list(self.chunks[chunk])
        rows = self.manifest(chunk)
        if rows is not None and [r.get("source_id") for r in rows] == ids:
            pairs = [(r["key"], r["source_id"]) for r in rows if r["key"]]
        else:
            paths = {source_id: self.resolve(source_id) for source_id in ids}
            digests = self.cache.digests(chunk, list(paths.values()))
            pairs = [(sample_key(digests[p]), i) for i, p in paths.items() if p in digests]
        first: dict[str, str] = {}
        for key, path in pairs:
            first.setdefault(key, path)
        return first

    def earlier(self, partition: str) -> dict[str, str]:
        """{content key: first source id} over every chunk before ``partition`` in source order."""
        position = self.order.index(partition)
        if position < self._prefix_chunks:  # asked out of order: start the prefix again
            self._prefix, self._prefix_chunks = {}, 0
        while self._prefix_chunks < position:
            for key, path in self.chunk_keys(self.order[self._prefix_chunks]).items():
                self._prefix.setdefault(key, path)
            self._prefix_chunks += 1
        return dict(self._prefix)


def keys_digest(first_by_key: Mapping[str, str]) -> str:
    """A short digest of a key -> path map: part of a partition's fingerprint, so an upstream change re-runs it."""
    text = "\n".join(f"{k}\t{v}" for k, v in sorted(first_by_key.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
