"""The papers' tables as an asset (``paper_report``), and the ``reproduce`` job that goes from photos to them.

``paper_report`` reads what the experiment evaluations left (``a2bfr_eval`` / ``roboface_eval``, one partition per
experiment) and ``baseline_eval``, and lays out every published table of both papers with the experiments' rows
beside the published rows (training/eval/paper.py; configs/published_tables.yaml), each model's training table
(final loss and trained weights against ``full``), the complexity table (parameters from the real architectures on
the meta device, estimated peak memory, s/face from the GPU benchmark's JSON when one was run, RoboFace Tab. 10's
published rows), the experiments' loss curves overlaid and each metric against the degradation level. Offline, it
says at its top that the rows of ours come from tiny random models.

``reproduce`` runs, one after another and each as its own Dagster run (so each shows in the UI with its partition
and resumes on its own): build_dataset, build_benchmarks, every selected experiment of each model (training, then
its evaluation), then reproduce_report (the baselines and paper_report). Selected: ``experiments.a2bfr`` /
``experiments.roboface``. A failed step stops the job and names the run that failed.
"""

import html
import json
import math
from pathlib import Path

import dagster as dg

from attrface_pipeline.assets.common import png_markdown
from attrface_pipeline.assets.evaluation import EVAL_DIR, a2bfr_eval, baseline_eval, roboface_eval
from attrface_pipeline.assets.experiments import latest_partition_metadata
from attrface_pipeline.assets.publish import PUBLISH_DIR
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.remote import push_dirs
from attrface_pipeline.storage import atomic_write_bytes

PAPER_DIR = "paper"
EVALS = {"a2bfr": a2bfr_eval, "roboface": roboface_eval}
GPU_BENCH_JSON = "bench_gpu.json"  # attrface bench-gpu --all writes it under <data_root>/benchmarks_gpu/


def _results(path: str | None) -> list[dict]:
    import pyarrow.parquet as pq

    if not path or not Path(path).is_file():
        return []
    return pq.read_table(path).to_pylist()


def _meta_value(metadata: dict | None, key: str):
    """A metadata entry's plain value: a path's path, a JSON entry's data, else its value (None if absent)."""
    value = (metadata or {}).get(key)
    if value is None:
        return None
    if isinstance(value, dg.PathMetadataValue):
        return value.path
    if isinstance(value, dg.JsonMetadataValue):
        return value.data
    return getattr(value, "value", value)


def collect_results(instance: dg.DagsterInstance, cfg) -> tuple[list, dict, dict]:
    """(defined experiments, {model: {name: ExperimentResult}}, loss rows by experiment key) from the evaluations'
    newest materializations."""
    from attrface_pipeline.builders import experiment_run_dir
    from training.engine import read_losses
    from training.eval.paper import ExperimentResult
    from training.experiments import load_experiments, select

    defined = load_experiments(cfg.experiments.files)
    shards = str(cfg.paths.data_root / PUBLISH_DIR)
    experiments, results, curves = [], {"a2bfr": {}, "roboface": {}}, {}
    for model in ("a2bfr", "roboface"):
        chosen = {e.name for e in select(defined, model, getattr(cfg.experiments, model))}
        for exp in defined[model].values():
            experiments.append(exp)
            try:
                fingerprint = experiment_run_dir(cfg, exp, shards=shards).name
            except Exception:  # noqa: BLE001 - no fingerprint: its row cannot borrow a same-run row's numbers
                fingerprint = None
            meta = latest_partition_metadata(instance, EVALS[model].key, exp.name)
            record = _meta_value(meta, "record") or {}
            rows = _results(_meta_value(meta, "results"))
            if rows:
                losses = read_losses(record["losses"]) if record.get("losses") else []
                results[model][exp.name] = ExperimentResult(exp.name, record.get("fingerprint") or fingerprint, rows,
                                                            caveat=record.get("caveat") or "",
                                                            weights=record.get("weights"), losses=losses)
                if losses:
                    curves[exp.key] = losses
                continue
            why = (f"not evaluated yet: materialize {EVALS[model].key.to_user_string()} [{exp.name}] (or run the "
                   f"reproduce job)" if exp.name in chosen else
                   f"not selected (experiments.{model} of this config; add {exp.name!r} or choose all)")
            results[model][exp.name] = ExperimentResult(exp.name, fingerprint, [], missing=why)
    return experiments, results, curves


def complexity_table(cfg, bench: dict | None):
    """RoboFace Tab. 10's columns for both models: parameters and trainable parameters of the real architectures
    (meta device), the plan's estimated training peak at batch 1, and restore s/face from a GPU benchmark JSON."""
    from training.eval.paper import add_published_complexity
    from training.eval.report import Cell, Table
    from training.plan import a2bfr_plan, roboface_plan

    from attrface_pipeline.config import load_config

    columns = ["params", "trainable", "peak_train_gib", "s_per_face"]
    labels = {"params": "parameters (B)", "trainable": "trainable (M)", "peak_train_gib": "peak memory, train "
              "batch 1 (GiB, est.)", "s_per_face": "restore s/face"}
    table = Table("RoboFace Tab. 10 · complexity", columns, [], labels=labels)
    # the published architectures always (the papers' models); this profile's too when it runs other ones
    profiles = [load_config("full", overrides={"paths": cfg.paths.model_dump()})]
    if cfg.profile != "full":
        profiles.append(cfg)
    builds = [(f"{name} ({getattr(c.models, spec)}{', this profile' if c is cfg else ''})", key, build, c)
              for c in profiles for name, key, spec, build in (
                  ("A²BFR", "a2bfr", "flux", lambda c: a2bfr_plan(c, batch_size=1)),
                  ("RoboFace", "roboface", "sd2_controlnet", lambda c: roboface_plan(c, batch_size=1)))]
    for name, key, build, c in builds:
        try:
            plan = build(c)
            cells = {"params": Cell(plan.params / 1e9), "trainable": Cell(plan.trainable / 1e6),
                     "peak_train_gib": Cell(plan.peak_gib, note="estimate (training/plan.py)")}
        except Exception as err:  # noqa: BLE001 - a plan that cannot be made is an n/a row with the reason
            cells = {c: Cell(None, note=f"plan failed: {type(err).__name__}: {err}"[:300]) for c in columns[:3]}
        seconds = ((bench or {}).get("restore_s_per_face") or {}).get(key) if c.profile == "full" else None
        cells["s_per_face"] = (Cell(float(seconds), note=f"{bench.get('device')} ({bench.get('when', '')})")
                               if seconds else Cell(None, note="no GPU benchmark on record: run `attrface bench-gpu "
                                                               "--all` on a GPU machine" if c.profile == "full" else
                                                    "tiny models: their speed says nothing about the papers'"))
        table.rows.append((name, cells))
    return add_published_complexity(table)


def _level_plot(results: dict, baseline_rows: list[dict]) -> bytes | None:
    from attrface_pipeline.plots import metric_by_level_png

    values: dict[str, dict[str, dict[str, float]]] = {}
    levels: list[str] = []
    rows = [(name, r) for name, res in results.items() for r in res.rows]
    rows += [(r["method"], r) for r in baseline_rows]
    for label, r in rows:
        if r["set"] != "celeba_test_levels" or r["table"] != "restoration" or not math.isfinite(r["value"]):
            continue
        if r["metric"] not in ("psnr", "lpips", "fid", "ids"):
            continue
        levels.append(r["level"])
        values.setdefault(r["metric"], {}).setdefault(label, {})[r["level"]] = r["value"]
    if not values:
        return None
    return metric_by_level_png(values, list(dict.fromkeys(levels)), "CelebA-Test levels: each metric against the "
                                                                     "degradation level")


PAPER_REPORT_INTRO = (
    "Rows marked (published) are the papers' numbers on their own data (configs/published_tables.yaml: every numeric "
    "table of both papers, every method compared, as printed); every other row is measured here. A row of ours sits "
    "below the published row it stands for (configs/experiments.yaml: paper_row), and '(vs published ±x)' is our "
    "number minus that published one. Ablation cells carry the difference to the table's reference experiment in "
    "brackets. The training tables compare each experiment's final loss and trained weights with the full model's.")
OFFLINE_CAVEAT = (
    "Offline profile: every row of ours comes from tiny, randomly initialised models trained for a few minutes on the "
    "CPU on the sample photos, and is scored by tiny random metric networks where the real ones are not installed. "
    "These rows show that each step runs and that the ablation switches change the training; their numbers, and "
    "their differences to the published ones, say nothing about the papers' methods.")


@dg.asset(
    deps=[a2bfr_eval, roboface_eval, baseline_eval],
    description="The papers' tables: every published row of A²BFR Tab. 1-5 and RoboFace Tab. 1-10 with the "
    "experiments' rows beside the paper rows they stand for (and their differences), deltas to each ablation's "
    "reference experiment, what each experiment's training changed, the complexity table, overlaid loss curves and "
    "metrics against the degradation level.",
    group_name="evaluation",
    kinds={"python"},
)
def paper_report(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    from attrface_pipeline.plots import overlaid_curves_png
    from training.eval.paper import paper_tables, training_table

    cfg = attrface.pipeline_config()
    experiments, results, curves = collect_results(context.instance, cfg)
    base_meta = latest_partition_metadata_unpartitioned(context.instance, baseline_eval.key)
    baseline_rows = _results(_meta_value(base_meta, "results"))
    baseline_notes = {m["name"]: m.get("unavailable") or "" for m in (_meta_value(base_meta, "methods") or [])}
    tables = [t for model in ("a2bfr", "roboface")
              for t in [*paper_tables(experiments, results[model], baseline_rows, baseline_notes, model=model),
                        training_table(model, experiments, results[model])]]
    bench_path = cfg.paths.data_root / "benchmarks_gpu" / GPU_BENCH_JSON
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    tables.append(complexity_table(cfg, bench))
    out = cfg.paths.data_root / EVAL_DIR / PAPER_DIR
    md = ["# AttrFace: the papers' tables", "", PAPER_REPORT_INTRO, ""]
    if cfg.profile == "offline":
        md += [OFFLINE_CAVEAT, ""]
    md += [t.markdown() for t in tables]
    metadata: dict = {}
    if curves:
        png = overlaid_curves_png(curves, title="training loss of every evaluated experiment")
        atomic_write_bytes(out / "loss_curves.png", png)
        metadata["loss_curves"] = png_markdown(png, "loss curves")
        md += ["![loss curves](loss_curves.png)", ""]
    level_png = _level_plot({f"{model}/{name}": res for model, by_name in results.items()
                             for name, res in by_name.items()}, baseline_rows)
    if level_png:
        atomic_write_bytes(out / "metrics_by_level.png", level_png)
        metadata["metrics_by_level"] = png_markdown(level_png, "metrics by level")
        md += ["![metrics against the degradation level](metrics_by_level.png)", ""]
    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "paper_tables.md", text.encode())
    page = ("<!doctype html><meta charset=utf-8><title>AttrFace: the papers' tables</title><style>body{font-family:"
            "sans-serif}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
            "text-align:right}td:first-child{text-align:left}tr.published{color:#666;font-style:italic}</style>"
            "<h1>AttrFace: the papers' tables</h1>" + f"<p>{html.escape(PAPER_REPORT_INTRO)}</p>"
            + (f"<p><b>{html.escape(OFFLINE_CAVEAT)}</b></p>" if cfg.profile == "offline" else "")
            + "".join(t.html() for t in tables))
    atomic_write_bytes(out / "paper_tables.html", page.encode())
    push_dirs(cfg.paths, f"{EVAL_DIR}/{PAPER_DIR}")
    evaluated = sorted(f"{model}/{name}" for model, by_name in results.items() for name, res in by_name.items()
                       if res.rows)
    return dg.MaterializeResult(metadata={
        "tables": dg.MetadataValue.md(text), "paper_tables": len(tables), "evaluated_experiments": evaluated,
        "markdown": dg.MetadataValue.path(str(out / "paper_tables.md")),
        "html": dg.MetadataValue.path(str(out / "paper_tables.html")), **metadata})


def latest_partition_metadata_unpartitioned(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict | None:
    event = instance.get_latest_materialization_event(key)
    return dict(event.asset_materialization.metadata) if event and event.asset_materialization else None


# -- the reproduce job ------------------------------------------------------------------------------------------------
# One H100, bf16, the full profile's models at 512² (docs/benchmarks.md): what the cost estimate multiplies.
H100_SECONDS = {
    "flowedit_pair": 2.17,  # SD3.5 Large FlowEdit, batch 8, compiled
    "a2bfr_step_batch1": 0.64,  # FLUX.1-dev LoRA r64 training step, plain token concatenation
    "a2bfr_sample_batch8": 0.40,
    "roboface_stage2_sample": 0.0096,  # SD2.1 + ControlNet, batch 32
    "a2bfr_restore_face": 2.9,
    "roboface_restore_face": 2.1,
}


PUBLISHED_PAIRS = 90_212  # AttrFace-90K's size: the train split's size before this instance has published one


def _train_hours(cfg, model: str, *, with_stage1: bool = True) -> float:
    """GPU-hours of one experiment's training at its settings, from the H100 figures (RoboFace: stage II, plus
    stage I unless an earlier experiment already trains the same stage I)."""
    if model == "a2bfr":
        a = cfg.a2bfr
        per_sample = H100_SECONDS["a2bfr_step_batch1"] if a.batch_size == 1 else H100_SECONDS["a2bfr_sample_batch8"]
        rows = 2 if a.mode == "dual" else 1  # the dual branches double the transformer's rows
        return a.max_steps * a.batch_size * a.num_processes * per_sample * rows / 3600
    r = cfg.roboface
    samples = (r.stage2_steps or 0) * r.stage2_batch_size * r.stage2_accumulation * r.num_processes
    if r.stage2_steps is None:
        sizes = cfg.paths.data_root / PUBLISH_DIR / "train" / "sizes.json"
        train = sum(json.loads(sizes.read_text()).values()) if sizes.is_file() else PUBLISHED_PAIRS
        samples = r.stage2_epochs * train
    stage1 = (r.stage1a_steps * 2 + r.stage1b_steps) * r.stage1_batch_size if with_stage1 else 0  # I-a: HQ + LQ
    return (samples + stage1) * H100_SECONDS["roboface_stage2_sample"] / 3600


def _stage1_key(cfg, exp, shards: str) -> str:
    from attrface_pipeline.builders import experiment_config, roboface_train_config

    return "stage1/" + roboface_train_config(experiment_config(cfg, exp), shards=shards, stage="stage1",
                                             stage2_steps=1).run.output_dir


def plan_runs(cfg) -> list[dict]:
    """The runs ``reproduce`` makes, in order: {job, partition, what, fingerprint, gpu_hours}. ``gpu_hours`` is
    the training estimate on one H100 from the benchmark figures (full profile; None offline, where the tiny models
    run on the CPU); an experiment whose fingerprint an earlier one has costs nothing more (it trains once)."""
    from attrface_pipeline.builders import experiment_config, experiment_run_dir
    from training.experiments import load_experiments, select

    defined = load_experiments(cfg.experiments.files)
    shards = str(cfg.paths.data_root / PUBLISH_DIR)
    full = cfg.profile == "full"
    runs = [{"job": "build_dataset", "partition": None, "what": "photos -> published shards", "fingerprint": "",
             "gpu_hours": None},
            {"job": "build_benchmarks", "partition": None, "what": "benchmark sets", "fingerprint": "",
             "gpu_hours": None}]
    seen: dict[str, str] = {}
    for model in ("a2bfr", "roboface"):
        for exp in select(defined, model, getattr(cfg.experiments, model)):
            run_dir = experiment_run_dir(cfg, exp, shards=shards)
            fingerprint = run_dir.name
            same = seen.get(f"{model}/{fingerprint}")
            stage1_key = _stage1_key(cfg, exp, shards) if model == "roboface" else ""
            hours = (0.0 if same else _train_hours(experiment_config(cfg, exp), model,
                                                   with_stage1=stage1_key not in seen)) if full else None
            seen.setdefault(stage1_key, exp.key)
            what = f"train + evaluate {exp.key}" + (f" (= {same}: trains once)" if same else "")
            runs.append({"job": f"{model}_experiment", "partition": exp.name, "what": what, "model": model,
                         "fingerprint": fingerprint, "gpu_hours": hours, "description": exp.description})
            seen.setdefault(f"{model}/{fingerprint}", exp.key)
    runs.append({"job": "reproduce_report", "partition": None, "what": "baselines + the papers' tables",
                 "fingerprint": "", "gpu_hours": None})
    return runs


def _child_run_config(context: dg.OpExecutionContext) -> dict:
    resources = (context.run.run_config or {}).get("resources")
    return {"resources": resources} if resources else {}


def _run_child(context: dg.OpExecutionContext, job: str, partition: str | None) -> None:
    from attrface_pipeline.definitions import RUNNABLE_JOBS

    tags = {"attrface/parent_run": context.run_id, "attrface/reproduce": "1"}
    if partition:
        tags["dagster/partition"] = partition
    context.log.info(f"reproduce: {job}" + (f" [{partition}]" if partition else ""))
    result = dg.execute_job(dg.reconstructable(RUNNABLE_JOBS[job]), instance=context.instance,
                            run_config=_child_run_config(context), tags=tags, raise_on_error=False)
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        why = "; ".join(f"{e.step_key}: {e.step_failure_data.error.message.strip()[:300]}" for e in failures[:3]
                        if e.step_failure_data and e.step_failure_data.error)
        raise dg.Failure(f"reproduce stopped: run {result.run_id} ({job}" + (f" [{partition}]" if partition else "")
                         + f") failed{': ' + why if why else ''}. Its logs are in the UI; re-running reproduce "
                         f"resumes", metadata={"failed_run": result.run_id})


@dg.op(description="Every run of the reproduction in order: dataset, benchmark sets, the selected experiments "
                   "(train + evaluate), then the baselines and the papers' tables.")
def reproduce_runs(context: dg.OpExecutionContext, attrface: AttrFaceConfig) -> None:
    cfg = attrface.pipeline_config()
    runs = plan_runs(cfg)
    context.log.info("reproduce: " + ", ".join(r["job"] + (f"[{r['partition']}]" if r["partition"] else "")
                                                for r in runs))
    for run in runs:
        _run_child(context, run["job"], run["partition"])
