"""Publishing: WebDataset shards with one fixed member set per sample, a parquet index per shard, sizes.json.

Deterministic: samples sorted by key, tar headers with a fixed mtime/owner, JSON with sorted keys -- identical
inputs give byte-identical shards. Each shard is written to a temp name and renamed, so a crash never leaves a
half-written shard visible; ``_stats.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from attrface_pipeline.images import EXTENSIONS
from attrface_pipeline.storage import atomic_file, atomic_write_json, atomic_write_parquet

SPLITS = ("train", "test")
SHARD_PATTERN = "attrface-{split}-{index:06d}.tar"
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index_in_shard", pa.int32()),
        ("attribute", pa.string()),
        ("direction", pa.string()),
        ("face_key", pa.string()),
        ("image_key", pa.string()),
        ("identity_similarity", pa.float32()),
        ("bytes", pa.int64()),
    ]
)


def split_of(group_key: str, test_fraction: float, salt: str = "attrface-v1") -> str:
    """Stable hash split: every sample of a group (a source photo) lands in the same split, on every run."""
    h = int(hashlib.sha256(f"{salt}:{group_key}".encode()).hexdigest()[:16], 16) / 2**64
    return "test" if h < test_fraction else "train"


@dataclass(frozen=True)
class Sample:
    key: str  # no dots: WebDataset splits member names at the first dot
    split: str
    source_path: Path  # the source at the edit's resolution, encoded in the published format (edits' sources/)
    edit_path: Path  # the edit, encoded in the published format
    meta: dict  # the sample's .json member
    source_prompt: str
    target_prompt: str

    def __post_init__(self):
        if "." in self.key:
            raise ValueError(f"sample key {self.key!r} contains a dot; WebDataset would split it")


class DuplicateSampleKeyError(ValueError):
    """Two published samples share a key: the dataset would carry the same pair twice, or two pairs under one key."""


def _raise_on_duplicates(located: Iterable[tuple[str, str]], what: str) -> None:
    """Fail with every key that occurs more than once in ``located`` ((key, where) pairs), naming where."""
    where_by_key: dict[str, list[str]] = defaultdict(list)
    for key, where in located:
        where_by_key[key].append(where)
    duplicates = {k: v for k, v in where_by_key.items() if len(v) > 1}
    if not duplicates:
        return
    listed = "; ".join(f"{k} in {', '.join(v)}" for k, v in sorted(duplicates.items())[:10])
    more = f" (and {len(duplicates) - 10} more)" if len(duplicates) > 10 else ""
    raise DuplicateSampleKeyError(
        f"{len(duplicates)} sample key(s) occur more than once in {what}: {listed}{more}. Keys must be unique over "
        f"all shards of all splits; the usual cause is one source photo ingested twice. Rebuild raw_images (ingest "
        f"quarantines later copies as duplicates) and the chunks downstream of it, then publish again."
    )


def check_unique_keys(samples: Iterable[Sample]) -> None:
    """Before writing: every sample key once over all splits, else :class:`DuplicateSampleKeyError`."""
    _raise_on_duplicates(((s.key, f"{s.split} ({s.source_path})") for s in samples), "the samples to publish")


def verify_published_keys(out_dir: Path, splits: Sequence[str] = SPLITS) -> int:
    """After writing: read the parquet index of every shard of every split under ``out_dir`` and fail with
    :class:`DuplicateSampleKeyError` if a key occurs twice. Returns the number of keys checked."""
    import pyarrow.parquet as pq

    located = []
    for split in splits:
        for index in sorted((out_dir / split).glob(f"attrface-{split}-*.parquet")):
            located += [(key, f"{split}/{index.with_suffix('.tar').name}")
                        for key in pq.read_table(index, columns=["key"]).column("key").to_pylist()]
    _raise_on_duplicates(located, f"the shards under {out_dir}")
    return len(located)


def _encoded(path: Path, image_format: str) -> bytes:
    """The bytes of an image that ``edits`` encoded in the published format; any other format is a clear error."""
    if path.suffix != EXTENSIONS[image_format]:
        raise ValueError(f"{path} is not encoded as publish.image_format={image_format!r}: the edits were made "
                         f"under another publish format. Re-materialize edits (and qc) with this config.")
    return path.read_bytes()


def sample_members(sample: Sample, image_format: str = "jpg") -> dict[str, bytes]:
    """The five members: src/tar images as ``edits`` encoded them (no decoding here), json, src/tar captions."""
    ext = EXTENSIONS[image_format].lstrip(".")
    return {
        f"src.{ext}": _encoded(sample.source_path, image_format),
        f"tar.{ext}": _encoded(sample.edit_path, image_format),
        "json": json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode(),
        "src.txt": sample.source_prompt.encode(),
        "tar.txt": sample.target_prompt.encode(),
    }


_BLOCK, _RECORD = 512, 20 * 512  # tar block and record sizes
_OWNER = "attrface"


def _tar_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` (PAX format, as webdataset's TarWriter uses it) writes for a regular file owned by
    attrface:attrface, mode 0644, mtime 0 -- built directly: tarfile's generic path costs ~90 us a member, more than
    copying a 30 KB JPEG. Names tarfile would give a PAX extended header (long or non-ASCII) go through tarfile."""
    raw = name.encode("utf-8")
    if len(raw) >= 100 or not raw.isascii() or size >= 8**11:
        import tarfile

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, _OWNER, _OWNER
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    owner = _OWNER.encode().ljust(32, b"\0")  # then no device numbers and no prefix: zeros
    head = b"".join([raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
                     b"00000000000\0", b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", owner, owner]).ljust(_BLOCK, b"\0")
    return head[:148] + b"%06o\0" % sum(head) + head[155:]  # checksum over the header with its field as spaces


def _write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """A tar of samples, byte-deterministic (fixed mtime and owner), visible at ``path`` only once complete.

    The same bytes as webdataset's ``TarWriter(user="attrface", group="attrface", mode=0o644, mtime=0)`` (tested):
    members of a sample in sorted order, 512-byte blocks, two zero blocks and padding to a 10 KiB record."""
    offset = 0
    with atomic_file(path) as f:
        for key, members in samples:
            parts = []
            for suffix in sorted(members):
                data = members[suffix]
                parts += [_tar_header(f"{key}.{suffix}", len(data)), data, b"\0" * (-len(data) % _BLOCK)]
            record = b"".join(parts)  # one write per sample
            f.write(record)
            offset += len(record)
        end = offset + 2 * _BLOCK
        f.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))


def _write_shard(job: tuple[Sequence[Sample], Path, str]) -> tuple[str, int, int]:
    """One shard and its parquet index; returns (name, samples, bytes)."""
    chunk, path, image_format = job
    members = [(s.key, sample_members(s, image_format)) for s in chunk]
    _write_tar(path, members)
    rows = [{"key": s.key, "shard": path.name, "index_in_shard": i, "attribute": s.meta["edit"]["attribute"],
             "direction": s.meta["edit"]["direction"], "face_key": s.meta["face_key"],
             "image_key": s.meta["image_key"], "identity_similarity": s.meta["qc"]["identity_similarity"],
             "bytes": sum(len(v) for v in m.values())} for i, (s, (_, m)) in enumerate(zip(chunk, members))]
    atomic_write_parquet(path.with_suffix(".parquet"), pa.Table.from_pylist(rows, INDEX_SCHEMA))
    return path.name, len(chunk), path.stat().st_size


def write_split(samples: Sequence[Sample], out_dir: Path, split: str, shard_size: int, image_format: str = "jpg",
                log: Callable[[str], None] = print, workers: int = 1) -> dict:
    """Write one split's shards (+ parquet index per shard); remove shards left over from an earlier publish."""
    check_unique_keys(samples)  # before anything is written: a duplicate would otherwise be published silently
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(samples, key=lambda s: s.key)
    jobs = [(ordered[start:start + shard_size], out_dir / SHARD_PATTERN.format(split=split, index=index),
             image_format) for index, start in enumerate(range(0, len(ordered), shard_size))]
    written, sizes, total_bytes = [], {}, 0
    # Shards are independent (and each is deterministic): threads write several at once (copying bytes and fsync
    # release the GIL; nothing is decoded or encoded here any more, so processes would only add start-up time).
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            results = pool.map(_write_shard, jobs)
            for name, count, size in results:
                sizes[name], total_bytes = count, total_bytes + size
                written.append(name)
                log(f"publish {split}: {name} ({count} samples)")
    else:
        for job in jobs:
            name, count, size = _write_shard(job)
            sizes[name], total_bytes = count, total_bytes + size
            written.append(name)
            log(f"publish {split}: {name} ({count} samples)")
    for stale in out_dir.glob(f"attrface-{split}-*"):  # shards of a bigger earlier publish
        if stale.name.replace(".parquet", ".tar") not in sizes:
            stale.unlink()
    atomic_write_json(out_dir / "sizes.json", sizes)
    return {"split": split, "samples": len(ordered), "shards": written, "bytes": total_bytes}


def read_back(shard: Path) -> list[dict[str, bytes]]:
    """All samples of one shard as {member: bytes} (plus ``__key__``), with the tarfile module only."""
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tf:
        for member in tf.getmembers():
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[suffix] = tf.extractfile(member).read()
    return list(samples.values())


def _group(split_group: Mapping[str, str] | None, edit_row: dict) -> str:
    if split_group is None:
        return edit_row["image_key"]
    if edit_row["face_key"] not in split_group:
        raise KeyError(f"face {edit_row['face_key']} has no identity group; materialize face_identities for its "
                       f"chunk (or set publish.split_by: photo)")
    return split_group[edit_row["face_key"]]


def assemble_samples(*, qc_rows: Sequence[dict], edit_rows: Sequence[dict], attribute_rows: Sequence[dict],
                     prompt_rows: Sequence[dict], edit_dir: Callable[[dict], Path], data_root: Path,
                     keep: Callable[[str], bool], test_fraction: float, salt: str, dataset_name: str,
                     provenance: dict, decisions: dict[str, dict] | None = None,
                     split_group: Mapping[str, str] | None = None) -> list[Sample]:
    """Samples for the pairs that passed QC and the review rule, with everything the .json member carries.

    ``split_group`` maps face keys to the group whose hash picks the split (identity groups); without it a
    sample's source photo does. A face missing from a given mapping is an error, never a silent fallback.
    """
    from attrface_pipeline.attributes import CELEBA_ATTRIBUTES

    edits = {r["pair_key"]: r for r in edit_rows}
    attrs = {r["face_key"]: r for r in attribute_rows}
    prompts = {r["face_key"]: r for r in prompt_rows}
    decisions = decisions or {}
    out = []
    for q in qc_rows:
        if not q["passed"] or not keep(q["pair_key"]):
            continue
        e, a, p = edits[q["pair_key"]], attrs[q["face_key"]], prompts[q["face_key"]]
        qc_scores = {k: q[k] for k in ("p_before", "p_after", "max_drift", "max_drift_attribute", "identity_backend",
                                       "identity_similarity", "identity_distance", "ssim", "landmark_displacement",
                                       "pass_attribute", "pass_identity", "pass_similarity")}
        meta = {
            "key": q["pair_key"], "source_dataset": dataset_name, "image_key": e["image_key"],
            "face_key": e["face_key"],
            "attributes": {"probabilities": dict(zip(CELEBA_ATTRIBUTES, (round(v, 5) for v in a["probabilities"]))),
                           "states": json.loads(a["states"])},
            "edit": {"attribute": e["attribute"], "direction": e["direction"], "seed": e["seed"],
                     "resolution": e["resolution"], "flowedit": json.loads(e["params"])},
            "source_prompt": e["source_prompt"], "target_prompt": e["target_prompt"],
            "qc": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in qc_scores.items()},
            "review": decisions.get(q["pair_key"]),
            "provenance": {**provenance, "editor": e["model_id"], "attribute_model": a["model_id"],
                           "prompt_backend": p["backend"], "prompt_model": p["model_id"]},
        }
        out.append(Sample(
            key=q["pair_key"], split=split_of(_group(split_group, e), test_fraction, salt),
            source_path=edit_dir(e) / e["source_image"], edit_path=edit_dir(e) / e["edit_path"], meta=meta,
            source_prompt=e["source_prompt"], target_prompt=e["target_prompt"],
        ))
    return out
