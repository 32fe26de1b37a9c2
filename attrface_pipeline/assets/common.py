"""Shared Dagster-layer helpers: partitions, chunk lookup, metadata rendering."""

from __future__ import annotations

import base64
from typing import Any

import dagster as dg
import numpy as np

from attrface_pipeline.config import PipelineConfig, load_config
from attrface_pipeline.images import encode_image, preview_grid
from attrface_pipeline.remote import remote_root
from attrface_pipeline.stages.chunks import ChunkPlan, ChunkRegistry
from attrface_pipeline.stages.ingest import source_listing


def chunk_plan(cfg: PipelineConfig) -> ChunkPlan:
    """The registered chunks of the data root plus new chunks of the source files none of them holds (read only);
    members are source ids, ``plan.path(id)`` is where each is on this machine."""
    listing = source_listing(cfg.source.paths, cfg.source.extensions)
    return chunk_registry(cfg).plan(list(listing.values()), cfg.source.chunk_size,
                                    paths={source_id: path for path, source_id in listing.items()})


def chunk_registry(cfg: PipelineConfig) -> ChunkRegistry:
    """The data root's chunk registry (at the URL when the data root is one)."""
    return ChunkRegistry(cfg.paths.data_root, remote_root(cfg.paths))


def source_chunks(cfg: PipelineConfig) -> dict[str, list[str]]:
    return chunk_plan(cfg).chunks


def build_partitions(cfg: PipelineConfig | None = None) -> dg.StaticPartitionsDefinition:
    """One partition per chunk (registered, then new), computed when the code location loads: a directory scan and
    the registry's small files, nothing written."""
    cfg = cfg or load_config()
    try:
        keys = list(source_chunks(cfg))
    except FileNotFoundError:
        keys = []  # a missing source must not break the UI; the assets raise the clear error at run time
    return dg.StaticPartitionsDefinition(keys)


# Resources of one GPU step's pod under the k8s_job_executor (deploy/); other executors ignore the tag. Per GPU:
# the card, and CPU/memory for its data loading and image coding (deploy/README.md says how to change them).
GPU_POD_CPU, GPU_POD_MEMORY_GI = 8, 64


def gpu_op_tags(gpus: int = 1) -> dict[str, Any]:
    """``op_tags`` of a GPU asset: its pod requests ``gpus`` GPUs and is allowed onto GPU nodes' taint."""
    amounts = {"nvidia.com/gpu": str(gpus), "cpu": str(GPU_POD_CPU * gpus), "memory": f"{GPU_POD_MEMORY_GI * gpus}Gi"}
    return {"dagster-k8s/config": {
        "container_config": {"resources": {"requests": amounts, "limits": {"nvidia.com/gpu": str(gpus)}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }}


def training_gpus(model: str) -> int:
    """GPUs a training asset's ``accelerate launch`` uses (``<model>.num_processes`` of the loaded config)."""
    try:
        return getattr(load_config(), model).num_processes
    except Exception:  # noqa: BLE001 - a bad config is reported by the partitions loader; tags fall back to one GPU
        return 1


def chunk_paths(chunks: dict[str, list[str]], partition: str) -> list[str]:
    """The source paths of ``partition`` from a :func:`source_chunks` listing, or a clear failure."""
    if partition not in chunks:
        raise dg.Failure(
            f"partition {partition!r} is not a chunk of the configured sources ({len(chunks)} chunks: "
            f"{', '.join(list(chunks)[:5])}...). The partitions come from the config the code location loaded "
            f"($ATTRFACE_CONFIG); set the same source there as in this run's config."
        )
    return chunks[partition]


def materialize_cache(cfg: PipelineConfig, folder, build, *, pull=()) -> dg.MaterializeResult:
    """A cache asset's body (text embeddings, GT latents): ``build()`` fills ``folder`` (under the data root) with
    what it lacks, the published shards and ``pull`` fetched first and the folder pushed after when the data root
    is a URL; its summary, path and size become the metadata."""
    from attrface_pipeline.remote import synced

    relative = folder.relative_to(cfg.paths.data_root)
    with synced(cfg.paths, pull=["attrface_shards", *pull, relative], push=[relative]):  # publish.PUBLISH_DIR
        summary = build()
    return dg.MaterializeResult(metadata={**summary, "path": dg.MetadataValue.path(str(folder)),
                                          "gib": round(summary["bytes"] / 1024**3, 3)})


def png_markdown(png: bytes, alt: str = "preview") -> dg.MetadataValue:
    """PNG bytes as an inline markdown image (rendered by the Dagster UI)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def preview_markdown(images: list[np.ndarray], tile: int = 96, columns: int = 6) -> dg.MetadataValue:
    """A small grid of images as an inline markdown image."""
    return png_markdown(encode_image(preview_grid(images, tile=tile, columns=columns), "png"))


def table_markdown(rows: list[dict[str, Any]], columns: list[str], limit: int = 20) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("_none_")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:limit]:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "/") for c in columns) + " |")
    if len(rows) > limit:
        lines.append(f"\n_{len(rows) - limit} more not shown_")
    return dg.MetadataValue.md("\n".join(lines))


def counts_json(counts: dict[str, int]) -> dg.MetadataValue:
    return dg.MetadataValue.json(dict(sorted(counts.items())))
