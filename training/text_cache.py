"""Text embeddings computed once: every prompt of the published shards through the base model's text encoders,
stored beside the shards, so training never loads a text encoder.

Layout of one cache (``<data_root>/text_embeddings/<encoder fingerprint>/``)::

    meta.json                 encoder fingerprint, max_sequence_length, dtype, tensor shapes
    index.json                sha256(prompt) -> [part file, prompt]; "_parts": part file -> {bytes, sha256}
    part-00000.safetensors    "<sha>.embeds" (L, D) and "<sha>.pooled" (P,) per prompt, in the encoders' dtype

A prompt is keyed by its exact text; the empty prompt (text dropout, the unconditional branch) is always there.
Parts are written whole and atomically, then the index; a re-run encodes only the prompts the index lacks.

Integrity (``attrface_pipeline.artifacts``): meta.json and index.json are JSON artifacts (kinds
``embedding_cache.meta`` and ``embedding_cache.index``) and the index records every part's size and sha256. The
reader (:class:`CacheFolder`, shared with the GT-latent cache) refuses a damaged or old-format meta.json / index.json
and verifies each part the first time it opens it (one read of the part per process), so a flipped byte, a cut
part or a folder in its place raises :class:`ArtifactError` naming the file and the asset to re-materialize.

What the embeddings are is what :meth:`FluxPipeline.encode_prompt` returns for the prompt alone (CLIP's pooled
output and T5's states over ``max_sequence_length`` tokens, padding included: FLUX's T5 runs without an attention
mask, so the padded positions carry the prompt's content too). At 512 tokens of 4096 bf16 values that is 4 MiB a
prompt; AttrFace-90K's ~180K prompts take ~0.7 TiB of disk, and 256 tokens halve it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from attrface_pipeline.artifacts import (INTEGRITY_KEY, ArtifactError, ArtifactKind, ArtifactMissingError, file_record,
                                         read_json, register, verify_file, write_json)

META, INDEX = "meta.json", "index.json"
PART_SIZE = 256  # prompts per part file
PARTS_KEY = "_parts"  # index.json's record of every part file: {name: {"bytes", "sha256"}}
_PART_RE = re.compile(r"^part-\d{5,}\.safetensors$")
CACHE_REMEDY = ("delete the cache folder and re-materialize the asset that builds it (text_embeddings, gt_latents "
                "or roboface_text_embeddings)")
# A part file is verified against the index's record; not a registered kind (the index's kind covers it).
PART_KIND = ArtifactKind("embedding_cache.part", 2, "embedding cache", CACHE_REMEDY)


class TextCacheMissError(KeyError):
    """A prompt the cache does not hold (the message names it and how to fill the cache)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "prompt missing from the text-embedding cache"


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def cache_fingerprint(model_fingerprint: str, max_sequence_length: int, dtype: str,
                      weights: str | None = None) -> str:
    """The cache folder's name: which encoders (the base model's spec), how many tokens, which dtype, and
    ``weights``: a content fingerprint of the weight files the entries are computed with
    (``artifacts.content_fingerprint``), so replaced weights under the same spec get a new folder. None: the
    spec alone names them (a hub snapshot, a tiny-zoo version): the names of earlier versions stay."""
    key = [model_fingerprint, max_sequence_length, dtype] + ([weights] if weights is not None else [])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def cache_remedy(folder: str | Path) -> str:
    """What to do about a damaged cache folder: delete it and re-materialize the asset that writes it (known from
    the folder's place: ``gt_latents/``, ``text_embeddings/sd2-*`` or ``text_embeddings/``)."""
    folder = Path(folder)
    asset = ("gt_latents" if folder.parent.name == "gt_latents" else
             "roboface_text_embeddings" if folder.name.startswith("sd2-") else
             "text_embeddings" if folder.parent.name == "text_embeddings" else None)
    if asset is None:
        return f"delete {folder} and re-materialize the asset that builds it ({CACHE_REMEDY.split('(', 1)[1]}"
    return f"delete {folder} and re-materialize {asset}"


def _kinds(folder: Path) -> tuple[ArtifactKind, ArtifactKind, ArtifactKind]:
    """The index, meta and part kinds with this folder's remedy in their messages."""
    remedy = cache_remedy(folder)
    return tuple(dataclasses.replace(k, remedy=remedy) for k in (INDEX_KIND, META_KIND, PART_KIND))


def _split_index(path: Path, payload: dict, kind: ArtifactKind) -> tuple[dict[str, list], dict[str, dict]]:
    """(entries, part records) of a verified index payload, their structure checked."""
    parts = payload.pop(PARTS_KEY, None)
    if not isinstance(parts, dict) or not all(_PART_RE.match(str(name)) and isinstance(record, dict)
                                              for name, record in parts.items()):
        raise ArtifactError(path, f"the {kind.what} has no valid {PARTS_KEY!r} record of its part files", kind.remedy)
    for key, entry in payload.items():
        if not (isinstance(entry, list) and entry and entry[0] in parts):
            raise ArtifactError(path, f"entry {key!r} of the {kind.what} names no recorded part file", kind.remedy)
    return payload, parts


def shard_prompts(shards_root: str | Path) -> list[str]:
    """Every source and target prompt of the published splits (the ``src.txt`` / ``tar.txt`` members of every
    shard, read without decoding an image), sorted, with the empty prompt."""
    import tarfile

    prompts = {""}
    for shard in sorted(Path(shards_root).glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".src.txt", ".tar.txt")):
                    prompts.add(tar.extractfile(member).read().decode())
    return sorted(prompts)


class CacheFolder:
    """Read side of a cache :func:`write_entries` wrote: meta.json and index.json verified on opening, each part
    file verified against the index's record the first time it is opened (:class:`ArtifactError` naming the file
    and the asset to re-materialize). ``missing``: the message's remedy when the cache is not there at all."""

    def __init__(self, folder: str | Path, *, missing: str = "materialize the asset that builds it"):
        self.folder = Path(folder)
        index_kind, meta_kind, self._part_kind = _kinds(self.folder)
        if not (self.folder / META).exists():
            raise ArtifactMissingError(self.folder / META, f"no cache at {self.folder} ({META} missing)", missing)
        self.meta = read_json(self.folder / META, meta_kind)
        self.index, self.parts = _split_index(self.folder / INDEX, read_json(self.folder / INDEX, index_kind),
                                              index_kind)
        self._handles: dict[str, object] = {}

    def _open(self, part: str):
        from safetensors import safe_open

        handle = self._handles.get(part)
        if handle is None:
            path = self.folder / part
            verify_file(path, self.parts[part], self._part_kind)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # noqa: BLE001 - a verified part that does not open was written damaged
                raise ArtifactError(path, f"a file of the embedding cache is not readable safetensors "
                                          f"({type(err).__name__})", self._part_kind.remedy) from None
            self._handles[part] = handle
        return handle

    def _tensor(self, part: str, name: str) -> torch.Tensor:
        handle = self._open(part)
        try:
            return handle.get_tensor(name)
        except Exception as err:  # noqa: BLE001 - the index names a tensor its part lacks
            raise ArtifactError(self.folder / part, f"a file of the embedding cache lacks {name!r}, which the index "
                                                    f"names ({type(err).__name__})", self._part_kind.remedy) from None

    def tensor(self, entry: str, name: str) -> torch.Tensor:
        """Tensor ``name`` of entry ``entry`` (an id the index holds)."""
        return self._tensor(self.index[entry][0], f"{entry}.{name}")


class TextEmbeddingCache(CacheFolder):
    """Read side: ``encode_prompt``-shaped lookups for a pipeline whose text encoders are not loaded."""

    def __init__(self, folder: str | Path):
        super().__init__(folder, missing="materialize text_embeddings (job train_a2bfr does) or set "
                                         "a2bfr.text_cache: false")

    @property
    def max_sequence_length(self) -> int:
        return int(self.meta["max_sequence_length"])

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self.index

    def lookup(self, prompts: Sequence[str], pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeds (B, L, D), pooled (B, P)) of ``prompts``; :class:`TextCacheMissError` names missing ones
        (``pooled=False``: only the check)."""
        missing = [p for p in prompts if prompt_key(p) not in self.index]
        if missing:
            shown = "; ".join(repr(p[:80]) for p in missing[:3])
            raise TextCacheMissError(
                f"{len(missing)} prompt(s) missing from the text-embedding cache {self.folder}: {shown}. The cache "
                f"holds the prompts of the published shards: re-materialize text_embeddings after publishing")
        if not pooled:
            return None
        embeds, pooled = [], []
        for p in prompts:
            key = prompt_key(p)
            part = self.index[key][0]
            embeds.append(self._tensor(part, f"{key}.embeds"))
            pooled.append(self._tensor(part, f"{key}.pooled"))
        return torch.stack(embeds), torch.stack(pooled)

    def states(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's states (B, L, D) of ``prompts`` (caches of encoders without a pooled output)."""
        self.lookup(list(prompts), pooled=False)
        return torch.stack([self._tensor(self.index[prompt_key(p)][0], f"{prompt_key(p)}.embeds") for p in prompts])

    def encode_prompt(self, prompts: Sequence[str], device, max_sequence_length: int):
        """What ``FluxPipeline.encode_prompt`` returns: (prompt_embeds, pooled_prompt_embeds, text_ids)."""
        if max_sequence_length != self.max_sequence_length:
            raise ValueError(f"the cache {self.folder} holds {self.max_sequence_length}-token embeddings, "
                             f"{max_sequence_length} were asked for: materialize text_embeddings for this length")
        embeds, pooled = self.lookup(list(prompts))
        embeds, pooled = embeds.to(device), pooled.to(device)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
        return embeds, pooled, text_ids


def _clear(folder: Path) -> None:
    """Remove the cache's own files (meta, index, parts, temp parts) from ``folder``; nothing else in it."""
    for p in [folder / META, folder / INDEX, *folder.glob("part-*.safetensors"), *folder.glob(".tmp-part-*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _writable_state(folder: Path, log: Callable[[str], None], what: str) -> tuple[dict, dict, dict]:
    """(entries, part records, meta) of the cache in ``folder`` to extend. A cache is derived data, so one that
    cannot be trusted (a damaged or old-format index.json / meta.json) is rebuilt from scratch: its own files
    are removed (logged) and nothing else in the folder is touched. Parts are checked by size only here (a full
    check would read the whole cache): the entries of a missing, cut or replaced part are encoded again; a part
    with flipped bytes is found by the reader, whose message says to delete the folder."""
    index_kind, meta_kind, _ = _kinds(folder)
    try:
        index: dict = {}
        parts: dict = {}
        if (folder / INDEX).exists():
            index, parts = _split_index(folder / INDEX, read_json(folder / INDEX, index_kind), index_kind)
        meta = read_json(folder / META, meta_kind) if (folder / META).exists() else {}
    except ArtifactError as err:
        log(f"{what}: rebuilding the cache from scratch, its files cannot be trusted: {err.path}: {err.problem}")
        _clear(folder)
        return {}, {}, {}
    for name, record in list(parts.items()):
        path = folder / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size == record.get("bytes"):
            continue
        log(f"{what}: {path} is missing or not the part that was written; its entries are encoded again")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        del parts[name]
        index = {key: entry for key, entry in index.items() if entry[0] != name}
    for path in folder.glob("part-*.safetensors"):  # written, but a crash came before the index named them
        if path.name not in parts and path.is_file():
            path.unlink()
    return index, parts, meta


def write_entries(folder: str | Path, items: Sequence[tuple[str, str, object]],
                  encode: Callable[[list], dict[str, torch.Tensor]], *, meta: dict, batch_size: int = 16,
                  log: Callable[[str], None] = print, what: str = "entries", part_size: int = PART_SIZE) -> dict:
    """The cache machinery the caches share (text embeddings, GT latents, RoboFace's text states): ``items`` are
    (id, label, payload); those whose id the index lacks are encoded in batches (``encode(payloads) -> {tensor name:
    (B, ...) tensor}``) and written as new part files, each tensor under ``"<id>.<name>"``. Parts are written whole
    and renamed into place, then the index (a JSON artifact recording every part's size and sha256), then meta.json.

    An existing cache that cannot be trusted (damaged or old-format index/meta) is rebuilt from scratch, and the
    entries of a part that is missing or of the wrong size are encoded again: the cache is derived data, and only
    its own files are removed (see :func:`_writable_state`). Returns {items, encoded, cached, parts, bytes}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_kind, meta_kind, _ = _kinds(folder)
    index, parts, old = _writable_state(folder, log, what)
    items = list({item[0]: item for item in items}.values())
    reserved = [item[0] for item in items if item[0] in (PARTS_KEY, INTEGRITY_KEY)]
    if reserved:
        raise ValueError(f"cache entry ids {reserved} are reserved for the index's own records")
    todo = [item for item in items if item[0] not in index]
    numbers = [int(name[5:].split(".")[0]) for name in parts]
    next_part = max(numbers) + 1 if numbers else 0
    shapes: dict = {}
    for start in range(0, len(todo), part_size):
        chunk = todo[start:start + part_size]
        tensors = {}
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]
            with torch.no_grad():
                encoded = encode([payload for _, _, payload in batch])
            for name, values in encoded.items():
                for (key, _, _), value in zip(batch, values):
                    tensors[f"{key}.{name}"] = value.detach().to("cpu").clone().contiguous()  # batch rows share storage
                shapes[name] = [list(values.shape[1:]), str(values.dtype)]
        name = f"part-{next_part:05d}.safetensors"
        tmp = folder / f".tmp-{name}"
        save_file(tensors, str(tmp))
        parts[name] = file_record(tmp)
        tmp.rename(folder / name)
        next_part += 1
        index.update({key: [name, label] for key, label, _ in chunk})
        write_json(folder / INDEX, index_kind, {**index, PARTS_KEY: parts})
        log(f"{what}: {min(start + part_size, len(todo))}/{len(todo)} new ones encoded")
    if not todo and not (folder / INDEX).is_file():  # an empty cache still has its (empty) index
        write_json(folder / INDEX, index_kind, {**index, PARTS_KEY: parts})
    write_json(folder / META, meta_kind, {**old, **meta, **({"shapes": shapes} if shapes else {})})
    size = sum(record["bytes"] for record in parts.values())
    return {"items": len(items), "encoded": len(todo), "cached": len(items) - len(todo), "parts": len(parts),
            "bytes": size}


def build_cache(encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], prompts: Iterable[str],
                folder: str | Path, *, meta: dict, batch_size: int = 16,
                log: Callable[[str], None] = print, part_size: int = PART_SIZE) -> dict:
    """Encode the prompts the cache lacks (``encode(batch) -> (embeds, pooled)``) and write them as new parts.
    Returns {prompts, encoded, cached, parts, bytes}."""

    def tensors(batch: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = encode(batch)
        return {"embeds": embeds, "pooled": pooled}

    items = [(prompt_key(p), p, p) for p in dict.fromkeys(prompts)]
    summary = write_entries(folder, items, tensors, meta=meta, batch_size=batch_size, log=log,
                            what="text embeddings", part_size=part_size)
    return {"prompts": summary.pop("items"), **summary}


# The registered kinds: a tiny real cache through build_cache, read back through TextEmbeddingCache.

EXAMPLE_PROMPTS = ("", "a portrait", "a portrait, smiling", "a portrait, with glasses", "a portrait, older")


def _example_cache(folder: Path) -> Path:
    cache = Path(folder) / "text_embeddings" / "example"

    def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 97)] for p in batch])
        return codes[:, None, :].repeat(1, 3, 1), codes[:, 0] * 0.5  # (B, 3, 2) states, (B,) pooled

    build_cache(encode, EXAMPLE_PROMPTS, cache, meta={"model": "example", "max_sequence_length": 3,
                                                      "dtype": "float32"}, batch_size=2, log=lambda m: None,
                part_size=2)
    return cache


def _example_index(folder: Path) -> list[Path]:
    cache = _example_cache(folder)
    return [cache / INDEX, cache / META, *sorted(cache.glob("part-*.safetensors"))]


def _example_meta(folder: Path) -> list[Path]:
    cache = _example_cache(folder)
    return [cache / META, cache / INDEX, *sorted(cache.glob("part-*.safetensors"))]


def read_every_entry(file: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Open the cache holding ``file`` (its index.json or meta.json) and read every entry: all it would trust."""
    cache = TextEmbeddingCache(Path(file).parent)
    return cache.lookup([entry[1] for entry in cache.index.values()])


INDEX_KIND = register(ArtifactKind(
    "embedding_cache.index", 2, "embedding cache index", CACHE_REMEDY, example=_example_index,
    read=read_every_entry))
META_KIND = register(ArtifactKind(
    "embedding_cache.meta", 2, "embedding cache metadata", CACHE_REMEDY, example=_example_meta,
    read=read_every_entry))
