"""Dagster asset for FlowEdit: face x target prompt -> edited image."""

import hashlib
import resource

import dagster as dg
import torch

from attrface_pipeline.assets.attributes import edit_prompts
from attrface_pipeline.assets.common import gpu_op_tags, png_markdown, table_markdown
from attrface_pipeline.remote import remote_root
from attrface_pipeline.assets.partition_loop import CachedBuilder, run_partitions
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.builders import build_editor, edit_spec
from attrface_pipeline.images import encode_image, preview_grid, read_rgb
from attrface_pipeline.models.store import model_fingerprint
from attrface_pipeline.stages.edits import EDIT_SCHEMA, build_pairs, run_edits
from attrface_pipeline.storage import PartitionStore


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
    op_tags=gpu_op_tags(),
    description="FlowEdit on SD3/SD3.5 with noise blending: one edited image per face x target prompt, with seed "
    "and parameters recorded per pair.",
    group_name="dataset",
    kinds={"pytorch", "parquet"},
)
def edits(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    spec, root = edit_spec(cfg), cfg.paths.data_root
    editor = CachedBuilder(lambda: build_editor(cfg), lambda e: f"editor {cfg.models.sd3} on {e.device} ({e.dtype})")

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        pairs = build_pairs(PartitionStore(root, "edit_prompts", partition).read_manifest().to_pylist(),
                            PartitionStore(root, "faces", partition).read_manifest().to_pylist(), f"faces/{partition}")
        return run_edits(pairs, editor(), spec, store, lambda rel: read_rgb(root / rel), log=context.log.info,
                         log_every=cfg.edit.log_every)

    # One hash over the edit settings, the model and the published image encoding (images are encoded once, here):
    # downstream fingerprints keep a prefix of it, so each must change the whole string.
    fingerprint = hashlib.sha256(f"{cfg.fingerprint('edit')}|{model_fingerprint(cfg.models.sd3)}|"
                                 f"{cfg.publish.image_format}|{cfg.publish.jpeg_quality}".encode()).hexdigest()[:16]
    # resume: an interrupted partition keeps the pairs it finished (records/<pair_key>.json and their images)
    results = run_partitions("edits", context.partition_keys, data_root=root, remote=remote_root(cfg.paths),
                             fingerprint=fingerprint, upstream="edit_prompts", schema=EDIT_SCHEMA, compute=compute,
                             resume=["images", "sources", "masters"], model=editor, log=context.log.info)
    all_stats = [r.stats for r in results]
    all_rows = [(r.store, row) for r in results for row in r.rows()]
    edited = sum(s["pairs_edited"] for s in all_stats)
    edit_seconds = sum(s["edit_seconds"] for s in all_stats)
    tiles, captions = [], []
    for store, r in all_rows[:8]:
        source = read_rgb(root / r["source_path"])
        tiles += [source, read_rgb(store.path(r["edit_path"]))]
        captions.append({"pair": r["pair_key"], "source_prompt": r["source_prompt"],
                         "target_prompt": r["target_prompt"]})
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
    if editor.built:
        metadata["device"] = str(editor().device)
        metadata["peak_memory_mb"] = round(peak_memory_mb(editor().device), 1)
    if tiles:
        metadata["preview"] = png_markdown(encode_image(preview_grid(tiles, tile=128, columns=4), "png"),
                                           "source | edit")
        metadata["preview_prompts"] = table_markdown(captions, ["pair", "source_prompt", "target_prompt"], 8)
    return dg.MaterializeResult(metadata=metadata)
