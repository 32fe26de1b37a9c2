"""Dagster asset for automatic QC of edit pairs, with pass-rate asset checks (the overall one blocking)."""

import dagster as dg

from attrface_pipeline.assets.common import gpu_op_tags, png_markdown, table_markdown
from attrface_pipeline.assets.edits import edits
from attrface_pipeline.remote import remote_root
from attrface_pipeline.assets.partition_loop import CachedBuilder, run_partitions
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.builders import build_qc_scorers, qc_thresholds
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import encode_image, preview_grid, read_rgb
from attrface_pipeline.models.store import model_fingerprint
from attrface_pipeline.plots import histograms_png
from attrface_pipeline.stages.checks import CHECKS, QC_SCHEMA, QCThresholds, pass_rates, score_pairs
from attrface_pipeline.storage import PartitionStore

RATE_CHECKS = [f"{c}_pass_rate" for c in CHECKS]
OVERALL_CHECK = "overall_pass_rate"


# A multi-asset that can be subset: a check it does not yield in a run is recorded as not executed (skipped) --
# the truth for a check whose gate is off (qc.gate), where a "passed" result would claim what was not checked.
@dg.multi_asset(
    specs=[dg.AssetSpec("qc", deps=[edits], description="Automatic QC per edit pair: attribute flipped (others "
                        "kept), identity kept, structure kept. Every score is stored; thresholds in config.",
                        group_name="dataset", kinds={"python", "parquet"})],
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    pool="gpu",
    op_tags=gpu_op_tags(),
    check_specs=[dg.AssetCheckSpec(name, asset="qc", description=f"share of pairs passing the {name.split('_')[0]} "
                                   "check (reported, not blocking; skipped when qc.gate leaves the check out)")
                 for name in RATE_CHECKS]
    + [dg.AssetCheckSpec(OVERALL_CHECK, asset="qc", blocking=True,
                         description="share of pairs passing every gating check (qc.gate); below qc.min_pass_rate "
                         "the run stops before anything is published")],
    can_subset=True,
)
def qc(context: dg.AssetExecutionContext, attrface: AttrFaceConfig):
    cfg = attrface.pipeline_config()
    root, th = cfg.paths.data_root, qc_thresholds(cfg)
    scorers = CachedBuilder(lambda: build_qc_scorers(cfg))

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        edit_store = PartitionStore(root, "edits", partition)
        s = scorers()
        rows = score_pairs(
            edit_store.read_manifest().to_pylist(), read_source=lambda p: read_rgb(root / p["source_path"]),
            read_edit=lambda p: read_rgb(edit_store.path(p["edit_path"])), classifier=s.classifier,
            identity=s.identity, locator=s.locator, th=th, batch_size=cfg.qc.batch_size,
        )
        return rows, {"pairs": len(rows), "rates": pass_rates(rows)}

    results = run_partitions("qc", context.partition_keys, data_root=root, remote=remote_root(cfg.paths),
                             fingerprint=cfg.fingerprint("qc", "attributes") + model_fingerprint(cfg.models.farl),
                             upstream="edits", schema=QC_SCHEMA, compute=compute, model=scorers, log=context.log.info)
    rows = [row for r in results for row in r.rows()]
    seconds = sum(r.seconds for r in results)
    rates = pass_rates(rows)
    context.log.info(f"qc: {len(rows)} pairs, pass rates {rates}")
    yield dg.MaterializeResult(asset_key="qc", metadata=qc_metadata(rows, rates, cfg, th, seconds))
    for check in CHECKS:
        if check not in cfg.qc.gate:  # not gating: left unexecuted (skipped); its rate is in the metadata
            context.log.info(f"qc: {check}_pass_rate skipped (qc.gate {cfg.qc.gate} leaves it out)")
            continue
        yield dg.AssetCheckResult(
            asset_key="qc", check_name=f"{check}_pass_rate", passed=True, severity=dg.AssetCheckSeverity.WARN,
            metadata={"pass_rate": round(rates[check], 4), "pairs": len(rows)},
        )
    yield dg.AssetCheckResult(
        asset_key="qc", check_name=OVERALL_CHECK, passed=rates["overall"] >= cfg.qc.min_pass_rate,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"pass_rate": round(rates["overall"], 4), "floor": cfg.qc.min_pass_rate, "pairs": len(rows)},
        description=None if rates["overall"] >= cfg.qc.min_pass_rate else
        f"overall pass rate {rates['overall']:.3f} is below qc.min_pass_rate {cfg.qc.min_pass_rate}",
    )


def qc_metadata(rows: list[dict], rates: dict, cfg: PipelineConfig, th: QCThresholds, seconds: float) -> dict:
    identity_key = "identity_distance" if th.max_identity_distance is not None else "identity_similarity"
    chart = histograms_png(
        {identity_key: [r[identity_key] for r in rows], "ssim": [r["ssim"] for r in rows],
         "landmark_displacement": [r["landmark_displacement"] for r in rows],
         "max_drift": [r["max_drift"] for r in rows]},
        {identity_key: th.max_identity_distance if th.max_identity_distance is not None else th.min_identity_similarity,
         "ssim": th.min_ssim, "landmark_displacement": th.max_landmark_displacement,
         "max_drift": th.attribute_tolerance},
        f"QC scores over {len(rows)} pairs",
    )
    worst = {  # the worst failure per check, by its own score
        "identity": sorted(rows, key=lambda r: -r["identity_distance"] if th.max_identity_distance is not None
                           else r["identity_similarity"]),
        "similarity": sorted(rows, key=lambda r: r["ssim"]),
        "attribute": sorted(rows, key=lambda r: abs(r["p_after"] - r["p_before"])),
    }
    examples = [
        {"check": check, "pair_key": r["pair_key"], identity_key: round(r[identity_key], 3),
         "ssim": round(r["ssim"], 3), "displacement": round(r["landmark_displacement"], 1),
         "p_before": round(r["p_before"], 3), "p_after": round(r["p_after"], 3)}
        for check, ranked in worst.items() for r in [x for x in ranked if not x[f"pass_{check}"]][:3]
    ]
    tiles = []
    for ex in examples[:6]:
        found = sorted((cfg.paths.data_root / "edits").glob(f"*/images/{ex['pair_key']}.*"))
        if found:
            tiles.append(read_rgb(found[0]))
    metadata = {
        "pairs": len(rows),
        "passed": sum(r["passed"] for r in rows),
        **{f"{c}_pass_rate": round(rates[c], 4) for c in (*CHECKS, "overall")},
        "identity_backend": cfg.qc.identity_backend,
        "mean_identity_similarity": round(sum(r["identity_similarity"] for r in rows) / len(rows), 4) if rows else 0.0,
        "score_histograms": png_markdown(chart, "QC score histograms"),
        "worst_failures": table_markdown(examples, list(examples[0]) if examples else ["check"], 12),
        "seconds": round(seconds, 3),
    }
    if tiles:
        metadata["worst_failures_preview"] = png_markdown(encode_image(preview_grid(tiles, tile=96, columns=6), "png"),
                                                          "worst failures (edits)")
    return metadata
