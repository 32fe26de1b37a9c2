"""The RoboFace assets materialized with Dagster on the sample shards (offline profile: tiny SD2 + ControlNet + CLIP,
a few steps): captions, stage I and stage II through Pipes + accelerate subprocesses, curves and grids as metadata;
a second materialization resumes the finished run folders.

No ``from __future__ import annotations`` here: Dagster checks the asset's context annotation at definition time.
"""

import base64
import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.roboface import (roboface_captions, roboface_model, roboface_stage1,
                                               roboface_text_embeddings)
from attrface_pipeline.builders import captions_folder, roboface_train_config
from attrface_pipeline.config import load_config
from training.engine import read_losses

pytestmark = pytest.mark.slow  # two accelerate subprocesses: ~1 min on 2 CPU cores


def _png(value) -> bytes:
    assert isinstance(value, dg.MarkdownMetadataValue) and "data:image/png;base64," in value.value
    return base64.b64decode(value.value.split("base64,", 1)[1].rstrip(")"))


def test_roboface_assets_materialize_offline_and_resume(tmp_path, shard_dir, sd2_base, monkeypatch):
    # one thread per trainer: two threads on a shared 2-core box made a tiny step take seconds instead of 0.1 s
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "attrface_shards").symlink_to(shard_dir)
    settings = {"paths": {"data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
                "models": {"sd2_controlnet": str(sd2_base)}}
    resources = {"attrface": AttrFaceConfig(settings=settings)}
    instance = dg.DagsterInstance.ephemeral()
    assets = [roboface_captions, roboface_text_embeddings, roboface_stage1, roboface_model]
    result = dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False, partition_key="full")
    assert result.success, [e.event_specific_data for e in result.all_events if e.is_failure]

    captions = result.asset_materializations_for_node("roboface_captions")[0].metadata
    assert captions["samples"].value == 18 and captions["backend"].value == "none" and captions["failed"].value == 0
    cfg = load_config(overrides=settings)
    table = pq.read_table(tmp_path / "data" / "roboface_captions" / captions_folder(cfg) / "captions.parquet"
                          ).to_pylist()
    assert len(table) == 18 and all(r["caption"] == "" and r["source_prompt"] for r in table)

    stage1 = result.asset_materializations_for_node("roboface_stage1")[0].metadata
    run1 = Path(roboface_train_config(cfg, shards=str(tmp_path / "data" / "attrface_shards"),
                                      stage="stage1").run.output_dir)
    assert stage1["checkpoint"].path == str(run1 / "stage1b" / "final")
    assert (stage1["stage1a_steps"].value, stage1["stage1b_steps"].value) == (4, 4)
    assert _png(stage1["stage1a_loss_curve"]) == (run1 / "stage1a" / "loss_curve.png").read_bytes()
    _png(stage1["stage1b_loss_curve"])
    assert _png(stage1["samples"]) == (run1 / "stage1b" / "samples.png").read_bytes()

    model = result.asset_materializations_for_node("roboface_model")[0].metadata
    final = Path(model["checkpoint"].path)
    assert model["stage2_steps"].value == 6 and model["stage2_resumed_from"].value is None
    _png(model["stage2_loss_curve"])
    _png(model["samples"])
    record = json.loads((final / "config.json").read_text())
    assert record["stage1"] == stage1["checkpoint"].path and record["captions_sha256"]
    assert [r["step"] for r in read_losses(final.parent / "losses.jsonl")] == list(range(1, 7))
    assert final.parents[1].name.startswith("stage2-")
    assert final.parents[2] == run1.parent == tmp_path / "data" / "models" / "roboface"

    again = dg.materialize(assets, resources=resources, instance=instance, partition_key="full")
    meta = again.asset_materializations_for_node("roboface_model")[0].metadata
    assert meta["checkpoint"].path == str(final) and meta["stage2_resumed_from"].value == 6
    assert again.asset_materializations_for_node("roboface_stage1")[0].metadata["stage1b_resumed_from"].value == 4
