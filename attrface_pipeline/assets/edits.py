"""Dagster asset for FlowEdit: face x target prompt -> edited image."""

import resource
import time

import dagster as dg
import torch

from attrface_pipeline.assets.attributes import edit_prompts
from attrface_pipeline.assets.common import png_markdown, table_markdown
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import encode_image, preview_grid, read_rgb
from attrface_pipeline.models.device import resolve_device, resolve_dtype
from attrface_pipeline.models.store import ModelStore, model_fingerprint
from attrface_pipeline.stages.edits import EDIT_SCHEMA, EditSpec, build_pairs, run_edits
from attrface_pipeline.stages.flowedit import FlowEditor, FlowEditParams
from attrface_pipeline.storage import PartitionStore


def edit_spec(cfg: PipelineConfig) -> EditSpec:
    e = cfg.edit
    params = FlowEditParams(
        steps=e.steps, n_max=e.n_max, n_min=e.n_min, n_avg=e.n_avg, src_guidance=e.src_guidance,
        tar_guidance=e.tar_guidance, negative_prompt=e.negative_prompt, beta=e.beta,
        beta_schedule=tuple(e.beta_schedule) if e.beta_schedule is not None else None,
        max_sequence_length=e.max_sequence_length,
    )
    return EditSpec(resolution=e.resolution, params=params, seed=e.seed, region_masks=e.region_masks,
                    beta_map=e.beta_map, mask_softness=e.mask_softness, batch_size=e.batch_size,
                    model_id=cfg.models.sd3)


def load_editor(cfg: PipelineConfig) -> FlowEditor:
    e = cfg.edit
    device = resolve_device(e.device)
    return FlowEditor.from_pretrained(
        ModelStore.from_config(cfg).resolve(cfg.models.sd3), device=device, dtype=resolve_dtype(e.dtype, device),
        cpu_offload=e.cpu_offload, vae_slicing=e.vae_slicing, vae_tiling=e.vae_tiling, compile=e.compile,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    deps=[edit_prompts],
    pool="gpu",
    description="FlowEdit on SD3/SD3.5 with noise blending: one edited image per face x target prompt, with seed "
    "and parameters recorded per pair.",
    group_name="dataset",
    kinds={"pytorch", "parquet"},
)
def edits(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    spec = edit_spec(cfg)
    root = cfg.paths.data_root
    editor: list[FlowEditor] = []
    all_rows, all_stats = [], []
    for partition in context.partition_keys:
        prompt_store = PartitionStore(root, "edit_prompts", partition)
        face_store = PartitionStore(root, "faces", partition)
        store = PartitionStore(root, "edits", partition)
        upstream = prompt_store.fingerprint()[:8]
        fingerprint = cfg.fingerprint("edit") + model_fingerprint(cfg.models.sd3) + upstream
        if not store.is_complete(fingerprint):
            store.invalidate()
            store.guard_resume(fingerprint, "images")  # pairs made under other settings must not be resumed
            pairs = build_pairs(prompt_store.read_manifest().to_pylist(), face_store.read_manifest().to_pylist(),
                                f"faces/{partition}")
            if not editor:
                editor.append(load_editor(cfg))
                context.log.info(f"editor {cfg.models.sd3} on {editor[0].device} ({editor[0].dtype})")
            t0 = time.perf_counter()
            rows, stats = run_edits(pairs, editor[0], spec, store, lambda rel: read_rgb(root / rel),
                                    log=context.log.info, log_every=cfg.edit.log_every)
            store.write_manifest(rows, EDIT_SCHEMA)
            stats.update(partition=partition, seconds=round(time.perf_counter() - t0, 3))
            store.complete(stats, fingerprint)
        all_stats.append(store.read_stats())
        all_rows += [(store, r) for r in store.read_manifest().to_pylist()]
    edited = sum(s["pairs_edited"] for s in all_stats)
    edit_seconds = sum(s["edit_seconds"] for s in all_stats)
    tiles, captions = [], []
    for store, r in all_rows[:8]:
        source = read_rgb(root / r["source_path"])
        tiles += [source, read_rgb(store.path(r["edit_path"]))]
        captions.append({"pair": r["pair_key"], "source_prompt": r["source_prompt"], "target_prompt": r["target_prompt"]})
    metadata = {
        "pairs": len(all_rows),
        "pairs_edited": edited,
        "pairs_resumed": sum(s["pairs_resumed"] for s in all_stats),
        "pairs_per_s": round(edited / edit_seconds, 3) if edit_seconds else 0.0,
        "seconds_per_pair": round(edit_seconds / edited, 3) if edited else 0.0,
        "transformer_calls_per_batch": spec.params.transformer_calls(),
        "sample_evaluations_per_pair": spec.params.sample_evaluations(),
        "params": dg.MetadataValue.json(spec.params.record()),
        "model": cfg.models.sd3,
        "seconds": round(sum(s["seconds"] for s in all_stats), 3),
    }
    if editor:
        metadata["device"] = str(editor[0].device)
        metadata["peak_memory_mb"] = round(peak_memory_mb(editor[0].device), 1)
    if tiles:
        metadata["preview"] = png_markdown(encode_image(preview_grid(tiles, tile=128, columns=4), "png"),
                                           "source | edit")
        metadata["preview_prompts"] = table_markdown(captions, ["pair", "source_prompt", "target_prompt"], 8)
    return dg.MaterializeResult(metadata=metadata)
