"""The experiment partitions of the training and evaluation assets (training/experiments.py holds the logic).

Every experiment defined when the code location loads (the shipped papers' rows + ``experiments.files`` of the
config in ``$ATTRFACE_CONFIG``) is a partition: ``a2bfr_lora`` / ``a2bfr_eval`` have one per A²BFR experiment,
the RoboFace assets one per RoboFace experiment. The UI shows one row per experiment, a backfill trains a chosen
set (one run per experiment, each resuming on its own), and the GPU pool and the Kubernetes executor run them in
parallel as they run any GPU step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from attrface_pipeline.config import ConfigError, PipelineConfig, load_config
from training.experiments import Experiment, ExperimentError, load_experiments

ONE_PER_RUN = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)  # a backfill runs experiments side by side


def _defined() -> dict[str, dict[str, Experiment]]:
    try:
        return load_experiments(load_config().experiments.files)
    except (ConfigError, ExperimentError) as err:
        if len(sys.argv) > 1 and sys.argv[1] in ("job", "asset") and "dagster" in sys.argv[0]:
            raise SystemExit(f"error: {err}") from None
        raise


DEFINED = _defined()
A2BFR_EXPERIMENTS = dg.StaticPartitionsDefinition(list(DEFINED["a2bfr"]))
ROBOFACE_EXPERIMENTS = dg.StaticPartitionsDefinition(list(DEFINED["roboface"]))


def experiment_for(context: dg.AssetExecutionContext, cfg: PipelineConfig, model: str) -> Experiment:
    """The run's experiment: its partition, looked up in the run's own config (which may add experiment files)."""
    defined = load_experiments(cfg.experiments.files)[model]
    name = context.partition_key
    if name not in defined:
        raise dg.Failure(f"experiment {model}/{name} is not defined in this run's config (defined: "
                         f"{', '.join(defined)}); the partitions come from the config the code location loaded")
    return defined[name]


def latest_partition_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str) -> dict | None:
    """The metadata of ``asset_key``'s newest materialization of ``partition`` (None if it has none)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    if not records or records[0].asset_materialization is None:
        return None
    return dict(records[0].asset_materialization.metadata)


def checkpoint_of(metadata: dict | None) -> str | None:
    """The ``checkpoint`` path a training asset reported (None when not materialized)."""
    if not metadata:
        return None
    checkpoint = metadata.get("checkpoint")
    return getattr(checkpoint, "path", None) or getattr(checkpoint, "value", None)


def experiment_metadata(experiment: Experiment, run_dir) -> dict:
    """What a training asset adds about its experiment: name, description, overrides and fingerprint (its run
    folder's name)."""
    return {"experiment": experiment.key, "description": experiment.description or "-",
            "overrides": dg.MetadataValue.json(experiment.overrides), "fingerprint": Path(run_dir).name}
