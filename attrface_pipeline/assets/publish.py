"""Dagster assets that publish the dataset: WebDataset shards per split, then the dataset card."""

import json
import time
from collections import Counter

import dagster as dg

from attrface_pipeline.assets.common import counts_json, png_markdown, source_chunks
from attrface_pipeline.assets.identity import face_identities
from attrface_pipeline.assets.qc import qc
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.remote import pull_chunks, remote_root
from attrface_pipeline.plots import stacked_bar_png
from attrface_pipeline.stages.card import render_card
from attrface_pipeline.stages.checks import pass_rates
from attrface_pipeline.stages.identity import identity_split, same_person_rule
from attrface_pipeline.stages.review import ReviewStore, review_filter
from attrface_pipeline.stages.shards import (SPLITS, assemble_samples, check_unique_keys, read_back, split_of,
                                            verify_published_keys, write_split)
from attrface_pipeline.storage import PartitionStore, atomic_write_bytes, atomic_write_json

PUBLISH_DIR = "attrface_shards"


def _manifests(cfg: PipelineConfig, asset: str, partitions: list[str]) -> list[tuple[str, dict]]:
    """(partition, row) for every complete partition of an asset among the configured sources' chunks (a chunk
    directory left from sources no longer configured is not published)."""
    out = []
    for partition in partitions:
        store = PartitionStore(cfg.paths.data_root, asset, partition)
        if store.read_stats() is not None:
            out += [(partition, r) for r in store.read_manifest().to_pylist()]
    return out


@dg.asset(
    deps=[qc, face_identities],
    description="WebDataset shards attrface-{train,test}-NNNNNN.tar of the pairs that passed QC (and review), "
    "with a parquet index per shard, sizes.json per split and _stats.json written last.",
    group_name="publish",
    kinds={"webdataset"},
)
def attrface_shards(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    pub, root = cfg.publish, cfg.paths.data_root
    out = root / PUBLISH_DIR
    (out / "_stats.json").unlink(missing_ok=True)  # not complete until rewritten at the end
    chunks = list(source_chunks(cfg))
    remote = remote_root(cfg.paths)
    pull_chunks(cfg.paths, chunks)  # a URL data root: every chunk's committed work into the working copy
    qc_rows = [r for _, r in _manifests(cfg, "qc", chunks)]
    edit_rows = _manifests(cfg, "edits", chunks)
    part_of = {r["pair_key"]: p for p, r in edit_rows}
    decisions = ReviewStore(cfg.review_db).decisions() if pub.review != "off" else {}
    group_of, identity = None, None
    if pub.split_by == "identity":
        metric, threshold = same_person_rule(cfg.qc.identity_backend, dlib_max_distance=cfg.qc.dlib_max_distance,
                                             arcface_min_similarity=cfg.qc.arcface_min_similarity)
        position = {chunk: i for i, chunk in enumerate(chunks)}
        identities = _manifests(cfg, "face_identities", chunks)
        group_of, identity = identity_split(
            [r for _, r in identities], metric=metric, threshold=threshold,
            split_of_group=lambda g: split_of(g, pub.test_fraction, pub.split_salt),
            order=[position[p] for p, _ in identities])  # groups named after their first chunk: stable as data grows
        context.log.info(f"identity split: {identity}")
    samples = assemble_samples(
        qc_rows=qc_rows, edit_rows=[r for _, r in edit_rows],
        attribute_rows=[r for _, r in _manifests(cfg, "face_attributes", chunks)],
        prompt_rows=[r for _, r in _manifests(cfg, "edit_prompts", chunks)],
        edit_dir=lambda e: root / "edits" / part_of[e["pair_key"]], data_root=root,
        keep=review_filter(pub.review, decisions), test_fraction=pub.test_fraction, salt=pub.split_salt,
        dataset_name=cfg.source.dataset_name, decisions=decisions, split_group=group_of,
        provenance={"profile": cfg.profile, "detector": cfg.detect.backend,
                    "models": cfg.models.model_dump(mode="json")},
    )
    check_unique_keys(samples)  # over all splits, before any shard is replaced
    t0 = time.perf_counter()
    splits = {split: write_split([s for s in samples if s.split == split], out / split, split, pub.shard_size,
                                 pub.image_format, log=context.log.info, workers=pub.workers)
              for split in SPLITS}
    seconds = time.perf_counter() - t0
    verify_published_keys(out)  # what is on disk, all shards of all splits; _stats.json is not written on failure
    passed = sum(r["passed"] for r in qc_rows)
    stats = {"splits": splits, "qc_pairs": len(qc_rows), "qc_passed": passed,
             "excluded_by_review": passed - len(samples), "review": pub.review, "identity_split": identity,
             "bytes": sum(s["bytes"] for s in splits.values())}
    atomic_write_json(out / "_stats.json", {**stats, "fingerprint": cfg.fingerprint("publish")})
    if remote is not None:
        context.log.info(f"committed {remote.push(PUBLISH_DIR)} files to {remote.url}/{PUBLISH_DIR}")
    return dg.MaterializeResult(metadata={
        "samples": len(samples),
        **{f"{k}_samples": v["samples"] for k, v in splits.items()},
        "shards": sum(len(v["shards"]) for v in splits.values()),
        "qc_pairs": len(qc_rows), "qc_passed": passed, "excluded_by_review": stats["excluded_by_review"],
        "review_mode": pub.review,
        "identity_split": dg.MetadataValue.json(identity or {"split_by": "photo"}),
        "flips": counts_json(dict(Counter(s.meta["edit"]["attribute"] for s in samples))),
        "megabytes": round(stats["bytes"] / 2**20, 3),
        "mb_per_s": round(stats["bytes"] / 2**20 / seconds, 2) if seconds and stats["bytes"] else 0.0,
        "path": dg.MetadataValue.path(str(out)),
    })


@dg.asset(
    deps=[attrface_shards],
    description="README.md with Hugging Face dataset-card front matter: counts, attribute distribution, QC pass "
    "rates, average identity similarity, licences, and the config that built it.",
    group_name="publish",
    kinds={"markdown"},
)
def dataset_card(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:

    cfg = attrface.pipeline_config()
    out = cfg.paths.data_root / PUBLISH_DIR
    remote = remote_root(cfg.paths)
    if remote is not None:
        remote.pull(PUBLISH_DIR)
    chunks = list(source_chunks(cfg))
    pull_chunks(cfg.paths, chunks)
    stats = json.loads((out / "_stats.json").read_text())
    metas = []
    for split in SPLITS:
        for shard in sorted((out / split).glob("*.tar")):
            metas += [json.loads(s["json"]) for s in read_back(shard)]
    qc_rows = [r for _, r in _manifests(cfg, "qc", chunks)]
    rates = pass_rates(qc_rows)
    table = []
    for attribute in sorted({m["edit"]["attribute"] for m in metas}):
        directions = [m["edit"]["direction"] for m in metas if m["edit"]["attribute"] == attribute]
        table.append({"attribute": attribute, "add": directions.count("add"), "remove": directions.count("remove")})
    chart = None
    if table:
        png = stacked_bar_png(table, "attribute", ["add", "remove"], f"flips over {len(metas)} published pairs")
        atomic_write_bytes(out / "attribute_distribution.png", png)
        if remote is not None:
            remote.put_bytes(f"{PUBLISH_DIR}/attribute_distribution.png", png)
        chart = "attribute_distribution.png"
    text = render_card(name=cfg.source.dataset_name, splits=stats["splits"], samples_meta=metas, qc_rates=rates,
                       qc_pairs=len(qc_rows), config_dump=cfg.model_dump(mode="json"), profile=cfg.profile,
                       chart_file=chart, gate=cfg.qc.gate, review=cfg.publish.review,
                       identity=stats.get("identity_split"))
    atomic_write_bytes(out / "README.md", text.encode())
    if remote is not None:  # beside the committed shards; the card does not change their marker
        remote.put_bytes(f"{PUBLISH_DIR}/README.md", text.encode())
    metadata = {"samples": len(metas), "card": dg.MetadataValue.md(text.split("---", 2)[-1][:20000]),
                "path": dg.MetadataValue.path(str(out / "README.md"))}
    if chart:
        metadata["attribute_distribution"] = png_markdown((out / chart).read_bytes(), "attribute distribution")
    return dg.MaterializeResult(metadata=metadata)
