"""The one Definitions object: assets, jobs, resources.

Jobs:
- ``build_dataset``: every chunk in one run (``dagster job execute -m attrface_pipeline.definitions -j
  build_dataset``); it carries the full partition range as its default tags.
- ``build_dataset_chunk``: the per-chunk assets for one chosen partition (UI launchpad, backfills, or
  ``--tags '{"dagster/partition": "chunk-00001"}'``); it does not publish.
- ``publish_dataset``: shards + dataset card from every complete chunk (after chunk backfills).
- ``build_benchmarks``: the fixed evaluation sets (``attrface_test``, ``celeba_test_levels``, ``real_lq``).
- ``train_roboface``: RoboFace's captions, stage I (Mapper, Remover) and stage II (ControlNet + DCA).
- ``train_a2bfr``: the A²BFR LoRA on the published shards (``a2bfr_lora``; offline: the tiny Flux, a few steps).
  Both train the default experiment (``experiments.default``) unless ``--tags '{"dagster/partition": NAME}'`` names
  another; a UI backfill of several experiment partitions trains each in its own run.
- ``a2bfr_experiment`` / ``roboface_experiment``: one experiment trained and evaluated (partitioned like the above).
- ``evaluate``: the evaluation report of the default experiments and the baselines.
- ``reproduce_report``: the baselines and the papers' tables from whatever experiments were evaluated.
- ``reproduce``: photos -> dataset -> benchmark sets -> every selected experiment -> the papers' tables, each step a
  Dagster run of the jobs above (``attrface reproduce --list`` shows the plan and its cost).
"""

import os

import dagster as dg

from attrface_pipeline.assets.a2bfr import a2bfr_lora, gt_latents, text_embeddings
from attrface_pipeline.assets.attributes import edit_prompts, face_attributes
from attrface_pipeline.assets.benchmarks import attrface_test, celeba_test_levels, real_lq
from attrface_pipeline.assets.edits import edits
from attrface_pipeline.assets.evaluation import a2bfr_eval, baseline_eval, eval_report, roboface_eval
from attrface_pipeline.assets.experiments import DEFINED
from attrface_pipeline.assets.identity import face_identities
from attrface_pipeline.assets.ingest import faces, raw_images
from attrface_pipeline.assets.partitions import SOURCE_PARTITIONS
from attrface_pipeline.assets.publish import attrface_shards, dataset_card
from attrface_pipeline.assets.qc import qc
from attrface_pipeline.assets.reproduce import paper_report, reproduce_runs
from attrface_pipeline.assets.roboface import (roboface_captions, roboface_model, roboface_stage1,
                                               roboface_text_embeddings)
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.assets.run_guard import guarded_executor
from attrface_pipeline.config import load_config
from attrface_pipeline.models.store import check_models

CHUNK_ASSETS = [raw_images, faces, face_identities, face_attributes, edit_prompts, edits, qc]
PUBLISH_ASSETS = [attrface_shards, dataset_card]
DATASET_ASSETS = CHUNK_ASSETS + PUBLISH_ASSETS
BENCHMARK_ASSETS = [attrface_test, celeba_test_levels, real_lq]
MODEL_ASSETS = [text_embeddings, gt_latents, a2bfr_lora, roboface_captions, roboface_text_embeddings, roboface_stage1,
                roboface_model]
EVAL_ASSETS = [eval_report, a2bfr_eval, roboface_eval, baseline_eval, paper_report]


def _all_chunks_tags() -> dict[str, str]:
    keys = SOURCE_PARTITIONS.get_partition_keys()
    if not keys:
        return {}
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


build_dataset = dg.define_asset_job(
    "build_dataset",
    selection=DATASET_ASSETS,
    tags=_all_chunks_tags(),
    description="Build the dataset for every chunk of the configured sources in one run.",
)
build_dataset_chunk = dg.define_asset_job(
    "build_dataset_chunk",
    selection=CHUNK_ASSETS,
    partitions_def=SOURCE_PARTITIONS,
    description="Build the dataset for one chunk (pick the partition in the launchpad or a backfill).",
)
publish_dataset = dg.define_asset_job(
    "publish_dataset",
    selection=PUBLISH_ASSETS,
    description="Publish WebDataset shards and the dataset card from every complete chunk.",
)



def _preflight(run_config: dict, steps: list[str]) -> None:
    """Before the first step: every model this run's steps will load is there (all missing ones listed)."""
    resource = ((run_config.get("resources") or {}).get("attrface") or {}).get("config") or {}
    check_models(AttrFaceConfig(**resource).pipeline_config(), steps)


build_benchmarks = dg.define_asset_job(
    "build_benchmarks",
    selection=BENCHMARK_ASSETS,
    description="Build the fixed evaluation sets: the AttrFace test split, a folder of aligned HQ faces at each "
    "degradation level, and real LQ faces (after build_dataset for attrface_test).",
)

def _default_experiments() -> dict[str, str]:
    try:
        return load_config().experiments.default
    except Exception:  # noqa: BLE001 - a bad config is reported by the partitions loader
        return {"a2bfr": "full", "roboface": "full"}


DEFAULT_EXPERIMENTS = _default_experiments()  # the config is read once, as the partitions were


def _default_experiment(model: str) -> dict[str, str]:
    """The partition tag of the default experiment, so the training jobs run without naming one."""
    name = DEFAULT_EXPERIMENTS.get(model, "full")
    return {"dagster/partition": name} if name in DEFINED[model] else {}


train_a2bfr = dg.define_asset_job(
    "train_a2bfr",
    selection=[text_embeddings, gt_latents, a2bfr_lora],
    tags=_default_experiment("a2bfr"),
    description="Train the A²BFR LoRA on the published shards (after build_dataset); resumes an interrupted run. "
    "The default experiment unless the dagster/partition tag names another.",
)

train_roboface = dg.define_asset_job(
    "train_roboface",
    selection=[roboface_captions, roboface_text_embeddings, roboface_stage1, roboface_model],
    tags=_default_experiment("roboface"),
    description="Train RoboFace (captions, stage I, stage II) on the published shards (after build_dataset); resumes. "
    "The default experiment unless the dagster/partition tag names another.",
)

a2bfr_experiment = dg.define_asset_job(
    "a2bfr_experiment",
    selection=[text_embeddings, gt_latents, a2bfr_lora, a2bfr_eval],
    tags=_default_experiment("a2bfr"),
    description="Train and evaluate one A²BFR experiment (its partition; after build_dataset and build_benchmarks).",
)

roboface_experiment = dg.define_asset_job(
    "roboface_experiment",
    selection=[roboface_captions, roboface_text_embeddings, roboface_stage1, roboface_model, roboface_eval],
    tags=_default_experiment("roboface"),
    description="Train and evaluate one RoboFace experiment (its partition; after build_dataset and "
    "build_benchmarks).",
)

reproduce_report = dg.define_asset_job(
    "reproduce_report",
    selection=[baseline_eval, paper_report],
    description="The baselines (bicubic, identity, restore-then-edit, external folders) and the papers' tables from "
    "every evaluated experiment.",
)


@dg.job(executor_def=dg.in_process_executor, description="Photos -> dataset -> benchmark sets -> every selected "
        "experiment (train + evaluate) -> the papers' tables; each step runs as its own Dagster run.")
def reproduce():
    reproduce_runs()

evaluate = dg.define_asset_job(
    "evaluate",
    selection=[eval_report],
    description="The evaluation report: every configured method on every benchmark set, tables beside the papers' "
    "(after build_benchmarks; trained models are used when train_a2bfr / train_roboface have run).",
)

# Importing this module takes ~8 s (torch, diffusers, transformers, dagster): a spawned step process paid it once
# per step. A forkserver that imported it once forks each step in milliseconds (benchmarks/orchestration_overhead.py).
FORKSERVER_PRELOAD = ["attrface_pipeline.definitions"]
EXECUTORS = ("multiprocess", "spawn", "in_process", "k8s")


def _executor() -> dg.ExecutorDefinition:
    """``ATTRFACE_EXECUTOR`` picks it:

    - ``multiprocess`` (default): Dagster's multiprocess executor, each step in its own process forked from a
      forkserver that preloaded this code location (``start_method: forkserver``); run config can still choose
      ``execution.config.start_method``.
    - ``spawn``: the same with Dagster's default start method (a fresh interpreter per step).
    - ``in_process``: every step in the run's own process (one machine, steps one after another; no start-up).
    - ``k8s`` (set by deploy/values.yaml): the k8s_job_executor, one pod per step, GPU steps requesting their GPUs
      through their ``dagster-k8s/config`` tags.
    """
    kind = os.environ.get("ATTRFACE_EXECUTOR", "multiprocess")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor  # the [k8s] extra

        return guarded_executor(_preflight, base=k8s_job_executor)
    if kind == "in_process":
        return guarded_executor(_preflight, base=dg.in_process_executor)
    if kind == "spawn":
        return guarded_executor(_preflight)
    if kind != "multiprocess":
        raise SystemExit(f"error: ATTRFACE_EXECUTOR={kind!r}: expected one of {', '.join(EXECUTORS)}")
    return guarded_executor(_preflight, defaults={
        "start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}})


defs = dg.Definitions(
    assets=DATASET_ASSETS + BENCHMARK_ASSETS + MODEL_ASSETS + EVAL_ASSETS,
    jobs=[build_dataset, build_dataset_chunk, publish_dataset, build_benchmarks, train_a2bfr, train_roboface,
          evaluate, a2bfr_experiment, roboface_experiment, reproduce_report, reproduce],
    resources={"attrface": AttrFaceConfig()},
    executor=_executor(),
)


# Module-level job factories for ``dg.reconstructable``: ``attrface demo`` and ``attrface job`` run these jobs through
# the Python API (the multiprocess executor needs a reconstructable job), without the superseded
# `dagster job execute` CLI path.
def build_dataset_job() -> dg.JobDefinition:
    return defs.resolve_job_def("build_dataset")


def build_benchmarks_job() -> dg.JobDefinition:
    return defs.resolve_job_def("build_benchmarks")


def train_a2bfr_job() -> dg.JobDefinition:
    return defs.resolve_job_def("train_a2bfr")


def train_roboface_job() -> dg.JobDefinition:
    return defs.resolve_job_def("train_roboface")


def evaluate_job() -> dg.JobDefinition:
    return defs.resolve_job_def("evaluate")


def a2bfr_experiment_job() -> dg.JobDefinition:
    return defs.resolve_job_def("a2bfr_experiment")


def roboface_experiment_job() -> dg.JobDefinition:
    return defs.resolve_job_def("roboface_experiment")


def reproduce_report_job() -> dg.JobDefinition:
    return defs.resolve_job_def("reproduce_report")


def reproduce_job() -> dg.JobDefinition:
    return defs.resolve_job_def("reproduce")


RUNNABLE_JOBS = {"build_dataset": build_dataset_job, "build_benchmarks": build_benchmarks_job,
                 "train_a2bfr": train_a2bfr_job, "train_roboface": train_roboface_job, "evaluate": evaluate_job,
                 "a2bfr_experiment": a2bfr_experiment_job, "roboface_experiment": roboface_experiment_job,
                 "reproduce_report": reproduce_report_job, "reproduce": reproduce_job}
