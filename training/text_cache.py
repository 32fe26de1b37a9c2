"""Text embeddings computed once: every prompt of the published shards through the base model's text encoders,
stored beside the shards, so training never loads a text encoder.

Layout of one cache (``<data_root>/text_embeddings/<encoder fingerprint>/``)::

    meta.json                 encoder fingerprint, max_sequence_length, dtype, tensor shapes
    index.json                sha256(prompt) -> [part file, prompt]
    part-00000.safetensors    "<sha>.embeds" (L, D) and "<sha>.pooled" (P,) per prompt, in the encoders' dtype

A prompt is keyed by its exact text; the empty prompt (text dropout, the unconditional branch) is always there.
Parts are written whole and atomically, then the index; a re-run encodes only the prompts the index lacks.

What the embeddings are is what :meth:`FluxPipeline.encode_prompt` returns for the prompt alone (CLIP's pooled
output and T5's states over ``max_sequence_length`` tokens, padding included: FLUX's T5 runs without an attention
mask, so the padded positions carry the prompt's content too). At 512 tokens of 4096 bf16 values that is 4 MiB a
prompt; AttrFace-90K's ~180K prompts take ~0.7 TiB of disk, and 256 tokens halve it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from attrface_pipeline.storage import atomic_write_json

META, INDEX = "meta.json", "index.json"
PART_SIZE = 256  # prompts per part file


class TextCacheMissError(KeyError):
    """A prompt the cache does not hold (the message names it and how to fill the cache)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "prompt missing from the text-embedding cache"


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def cache_fingerprint(model_fingerprint: str, max_sequence_length: int, dtype: str) -> str:
    """The cache folder's name: which encoders (the base model's spec), how many tokens, which dtype."""
    return hashlib.sha256(json.dumps([model_fingerprint, max_sequence_length, dtype]).encode()).hexdigest()[:12]


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


class TextEmbeddingCache:
    """Read side: ``encode_prompt``-shaped lookups for a pipeline whose text encoders are not loaded."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise FileNotFoundError(f"no text-embedding cache at {self.folder} ({META} missing): materialize "
                                    f"text_embeddings (job train_a2bfr does) or set a2bfr.text_cache: false")
        self.meta = json.loads((self.folder / META).read_text())
        index = self.folder / INDEX
        self.index: dict[str, list[str]] = json.loads(index.read_text()) if index.is_file() else {}
        self._handles: dict[str, object] = {}

    @property
    def max_sequence_length(self) -> int:
        return int(self.meta["max_sequence_length"])

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self.index

    def _tensor(self, part: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        handle = self._handles.get(part)
        if handle is None:
            handle = self._handles[part] = safe_open(str(self.folder / part), framework="pt")
        return handle.get_tensor(name)

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


def write_entries(folder: str | Path, items: Sequence[tuple[str, str, object]],
                  encode: Callable[[list], dict[str, torch.Tensor]], *, meta: dict, batch_size: int = 16,
                  log: Callable[[str], None] = print, what: str = "entries") -> dict:
    """The cache machinery both caches share: ``items`` are (id, label, payload); those whose id the index lacks
    are encoded in batches (``encode(payloads) -> {tensor name: (B, ...) tensor}``) and written as new part files,
    each tensor under ``"<id>.<name>"``. Parts are written whole and renamed into place, then the index.
    Returns {items, encoded, cached, parts, bytes}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / INDEX
    index: dict[str, list[str]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    items = list({item[0]: item for item in items}.values())
    todo = [item for item in items if item[0] not in index]
    next_part = len(sorted(folder.glob("part-*.safetensors")))
    shapes: dict = {}
    for start in range(0, len(todo), PART_SIZE):
        chunk = todo[start:start + PART_SIZE]
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
        tmp.rename(folder / name)
        next_part += 1
        index.update({key: [name, label] for key, label, _ in chunk})
        atomic_write_json(index_path, index)
        log(f"{what}: {min(start + PART_SIZE, len(todo))}/{len(todo)} new ones encoded")
    old = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    atomic_write_json(folder / META, {**old, **meta, **({"shapes": shapes} if shapes else {})})
    size = sum(p.stat().st_size for p in folder.glob("part-*.safetensors"))
    return {"items": len(items), "encoded": len(todo), "cached": len(items) - len(todo), "parts": next_part,
            "bytes": size}


def build_cache(encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], prompts: Iterable[str],
                folder: str | Path, *, meta: dict, batch_size: int = 16,
                log: Callable[[str], None] = print) -> dict:
    """Encode the prompts the cache lacks (``encode(batch) -> (embeds, pooled)``) and write them as new parts.
    Returns {prompts, encoded, cached, parts, bytes}."""

    def tensors(batch: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = encode(batch)
        return {"embeds": embeds, "pooled": pooled}

    items = [(prompt_key(p), p, p) for p in dict.fromkeys(prompts)]
    summary = write_entries(folder, items, tensors, meta=meta, batch_size=batch_size, log=log,
                            what="text embeddings")
    return {"prompts": summary.pop("items"), **summary}
