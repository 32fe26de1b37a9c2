"""``attrface`` command line: offline model zoo, config inspection, model resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from attrface_pipeline.options import (PORT, PROFILE, RESUME, SEED, Choice, ConfigKey, Device, Float, Int, Name,
                                       PathArg, Text)

# rich_markup_mode=None: help texts print as written (square brackets such as "[iqa]" are text, not markup)
app = typer.Typer(help="AttrFace tools. The dataset itself is built by Dagster: see README.md and docs/.",
                  no_args_is_help=True, rich_markup_mode=None)


def _profile_option():
    return typer.Option(None, parser=PROFILE, help="offline | full (default: $ATTRFACE_PROFILE or offline)")


def _config_option():
    return typer.Option(None, "-c", "--config", parser=PathArg("file", exists=True, what="a YAML settings file"),
                        help="YAML settings file(s), in order")


def _tiny_names() -> list[str]:
    from attrface_pipeline.models import tiny

    return list(tiny.GENERATORS)


def _job_names() -> list[str]:
    from attrface_pipeline.definitions import RUNNABLE_JOBS

    return sorted(RUNNABLE_JOBS)


def _metric_names() -> list[str]:
    from training.eval.report import FOLDER_METRICS

    return list(FOLDER_METRICS)


@app.command("make-tiny-models")
def make_tiny_models(
    out_dir: Path = typer.Argument(..., parser=PathArg("dir", exists=None),
                                   help="directory to write <name>/ checkpoints into"),
    only: Optional[list[str]] = typer.Option(None, "--only", parser=Choice(_tiny_names),
                                             help="generate just these (repeatable)"),
    force: bool = typer.Option(False, help="regenerate models that already exist"),
) -> None:
    """Write deterministic tiny random checkpoints in the real on-disk formats (offline)."""
    from attrface_pipeline.models import tiny

    names = only or list(tiny.GENERATORS)
    for name in names:
        target = out_dir / name
        if (target / tiny.DONE_MARKER).exists() and not force:
            typer.echo(f"{name}: exists at {target}")
            continue
        tiny.generate(name, target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        typer.echo(f"{name}: wrote {target} ({size / 1e6:.1f} MB)")


@app.command("demo")
def demo(
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Build the dataset (offline: the shipped sample photos, tiny models) with the build_dataset job, then say what
    was built, where, and what to do next."""
    from attrface_pipeline.summary import build_summary, format_summary

    files = _files(config_file)
    cfg = _config_or_exit(profile, files)
    typer.echo(f"building the dataset into {cfg.paths.data_root}", err=True)
    seconds = _run_job("build_dataset", profile, files)
    typer.echo(format_summary(build_summary(cfg.paths.data_root), seconds))


def _run_job(name: str, profile: Optional[str], files: Optional[list[str]]) -> float:
    """Run one of the project's jobs in-process through Dagster's Python API (the configured executor, this
    instance); returns the wall time, or exits 1 naming the failed steps."""
    import os
    import time

    from attrface_pipeline.config import HOME, ConfigError, check_home

    try:
        check_home()
    except ConfigError as err:
        _usage(str(err.problems[0]) if err.problems else str(err))
    if "DAGSTER_HOME" not in os.environ:  # the project's instance settings (pools, run limits, telemetry off)
        _prepare_instance(HOME / "dagster_home")
    typer.echo(f"running {name} (Dagster instance {os.environ['DAGSTER_HOME']})", err=True)
    if profile:
        os.environ["ATTRFACE_PROFILE"] = profile
    if files:  # the code location reads the same config (partitions come from it)
        os.environ["ATTRFACE_CONFIG"] = os.pathsep.join(str(Path(f).resolve()) for f in files)
    import dagster as dg

    from attrface_pipeline.definitions import RUNNABLE_JOBS

    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(RUNNABLE_JOBS[name]), instance=instance, raise_on_error=False)
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        typer.echo(f"error: {name} failed (run {result.run_id}; failed steps: {', '.join(failed) or '?'}). "
                   f"`make ui` shows its logs", err=True)
        raise typer.Exit(1)
    return time.perf_counter() - t0


# jobs that start from the published shards (checked before Dagster starts, so a missing dataset is one line)
JOBS_ON_SHARDS = ("train_a2bfr", "train_roboface", "a2bfr_experiment", "roboface_experiment")


def _usage(message: str) -> None:
    """A usage error after parsing: one line, exit status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command("job")
def job(
    name: str = typer.Argument(..., parser=Choice(_job_names),
                               help="build_dataset | build_benchmarks | train_a2bfr | train_roboface | evaluate | "
                               "a2bfr_experiment | roboface_experiment | reproduce_report | reproduce"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Run one of the project's jobs with this instance (what `make train-a2bfr`, `make evaluate` run)."""
    files = _files(config_file)
    cfg = _config_or_exit(profile, files)
    if name in JOBS_ON_SHARDS:
        _published_shards(cfg)
    seconds = _run_job(name, profile, files)
    typer.echo(f"{name}: done in {seconds / 60:.1f} min")


@app.command("reproduce")
def reproduce_command(
    list_only: bool = typer.Option(False, "--list", help="show the runs and their estimated cost; run nothing"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Reproduce the papers: dataset, benchmark sets, every selected experiment, then the papers' tables."""
    from attrface_pipeline.assets.reproduce import plan_runs

    files = _files(config_file)
    cfg = _config_or_exit(profile, files)
    try:
        runs = plan_runs(cfg)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"reproduce ({cfg.profile} profile): {len(runs)} runs, in order")
    typer.echo(f"{'job':<22}{'experiment':<18}{'fingerprint':<22}{'GPU-h (H100)':>13}  what")
    for r in runs:
        hours = "-" if r["gpu_hours"] is None else f"{r['gpu_hours']:.1f}"
        typer.echo(f"{r['job']:<22}{r['partition'] or '':<18}{r['fingerprint'] or '':<22}{hours:>13}  {r['what']}")
    if cfg.profile == "full":
        total = sum(r["gpu_hours"] or 0 for r in runs)
        typer.echo(f"training: about {total:.0f} GPU-hours on H100s (from the benchmark figures in "
                   f"docs/benchmarks.md; dataset editing and evaluation come on top)")
    else:
        typer.echo("offline: the tiny models on this machine's CPU (a few minutes per experiment)")
    if list_only:
        return
    seconds = _run_job("reproduce", profile, files)
    typer.echo(f"reproduce: done in {seconds / 60:.1f} min; the tables: "
               f"{cfg.paths.data_root / 'eval' / 'paper' / 'paper_tables.md'}")


def _experiment_cfg(model: str, profile: Optional[str], files: Optional[list[str]], experiment: Optional[str],
                    overrides: dict):
    """The config with an experiment's overrides (default: experiments.default) and the command's own."""
    from attrface_pipeline.builders import experiment_config
    from training.experiments import ExperimentError, load_experiments

    from pydantic import ValidationError

    from attrface_pipeline.config import validation_lines

    cfg = _config_or_exit(profile, files)
    name = experiment or cfg.experiments.default[model]
    try:
        defined = load_experiments(cfg.experiments.files)[model]
        if name not in defined:
            _usage(f"--experiment {name!r} is not a {model} experiment; defined: {', '.join(defined)}")
        cfg = experiment_config(cfg, defined[name])
    except ExperimentError as err:
        _usage(str(err))
    section = getattr(cfg, model)
    changed = {k: v for k, v in overrides.items() if v is not None}
    try:  # each value passed its key's domain; together with the experiment's they may still clash
        merged = type(section).model_validate({**section.model_dump(), **changed})
    except ValidationError as err:
        _usage("; ".join(validation_lines(err, f"{model}.", model=type(section),
                                          labels={k: f"--{k.replace('_', '-')}" for k in changed})))
    return cfg.model_copy(update={model: merged}), name


def _launch(module: str, train_cfg, output_dir: Path, processes: int, mixed_precision: str,
            extra: tuple[str, ...] = ()) -> None:
    """Write the run's config into its folder and run the trainer module as the assets do (``accelerate launch``
    with one process per GPU), in the foreground."""
    import os
    import subprocess
    import tempfile

    import torch

    from attrface_pipeline.assets.training import LAUNCH_CONFIG, launch_command
    from training.child import ERROR_FILE_ENV, read_error
    from attrface_pipeline.storage import atomic_write_json

    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / LAUNCH_CONFIG
    atomic_write_json(config_path, train_cfg.model_dump(mode="json"))
    cmd = launch_command(module, config_path, num_processes=processes, mixed_precision=mixed_precision,
                         cuda=torch.cuda.is_available()) + list(extra)
    typer.echo(f"training: {' '.join(cmd)}", err=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if processes > 1 and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        env[ERROR_FILE_ENV] = os.path.join(tmp, "error.txt")
        code = subprocess.run(cmd, env=env).returncode
        line = read_error(env[ERROR_FILE_ENV]) if code else None
    if code:
        # the child printed its own error line (or, for a bug, its traceback); the last line says which run failed
        typer.echo(f"error: training stopped ({line or f'exit status {code}; see above'}); the run folder "
                   f"{output_dir} keeps its checkpoints", err=True)
        raise typer.Exit(EXIT_FAILED)


def _published_shards(cfg) -> Path:
    """The published shards the train commands read, or exit 2 saying how to make them."""
    shards = cfg.paths.data_root / "attrface_shards"
    if not (shards / "train").is_dir():
        typer.echo(f"error: no published shards at {shards}: build the dataset first (attrface demo or job "
                   f"build_dataset)", err=True)
        raise typer.Exit(2)
    return shards


RESUME_HELP = "latest (continue the run folder's newest checkpoint), a checkpoint folder, or none (start over; with " \
              "--overwrite when the folder has checkpoints)"


@app.command("train-a2bfr")
def train_a2bfr_command(
    plan: bool = typer.Option(False, "--plan", help="print parameters and the estimated peak memory per component "
                              "(the real architectures on the meta device) and exit"),
    experiment: Optional[str] = typer.Option(None, parser=Name("an experiment name"),
                                             help="a named experiment (default: experiments.default)"),
    base_dtype: Optional[str] = typer.Option(None, parser=ConfigKey("a2bfr.base_dtype"),
                                             help="bf16 | fp8 | nf4: the frozen transformer's storage"),
    batch_size: Optional[int] = typer.Option(None, parser=ConfigKey("a2bfr.batch_size"), help="per process"),
    max_steps: Optional[int] = typer.Option(None, parser=ConfigKey("a2bfr.max_steps")),
    optimizer: Optional[str] = typer.Option(None, parser=ConfigKey("a2bfr.optimizer"),
                                            help="prodigy | adamw | adamw8bit"),
    num_processes: Optional[int] = typer.Option(None, parser=ConfigKey("a2bfr.num_processes"),
                                                help="GPUs (accelerate processes)"),
    resume: str = typer.Option("latest", parser=RESUME, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help="with --resume none: delete the folder's checkpoints first"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Train A²BFR from the command line: the code the a2bfr_lora asset runs (`accelerate launch -m
    training.a2bfr.train`), on the published shards, resuming the run folder of the same settings."""
    from attrface_pipeline.builders import a2bfr_train_config, build_gt_latents, build_text_embeddings
    from training.plan import a2bfr_plan

    if overwrite and resume != "none":
        _usage("--overwrite starts the run over: give it with --resume none (--resume latest continues the run)")

    cfg, name = _experiment_cfg("a2bfr", profile, _files(config_file), experiment, {
        "base_dtype": base_dtype, "batch_size": batch_size, "max_steps": max_steps, "optimizer": optimizer,
        "num_processes": num_processes})
    if plan:
        typer.echo(a2bfr_plan(cfg, text_cache=cfg.a2bfr.text_cache).table())
        return
    shards = _published_shards(cfg)
    if cfg.a2bfr.text_cache:
        summary = build_text_embeddings(cfg, log=lambda m: typer.echo(m, err=True))
        typer.echo(f"text embeddings: {summary['prompts']} prompts ({summary['encoded']} encoded now)", err=True)
    if cfg.a2bfr.latent_cache:
        summary = build_gt_latents(cfg, log=lambda m: typer.echo(m, err=True))
        typer.echo(f"GT latents: {summary['items']} faces ({summary['encoded']} encoded now)", err=True)
    train_cfg = a2bfr_train_config(cfg, shards=str(shards))
    train_cfg.train.resume = None if resume == "none" else resume
    train_cfg.train.overwrite = overwrite
    typer.echo(f"A²BFR {name}: run folder {train_cfg.train.output_dir}", err=True)
    _launch("training.a2bfr.train", train_cfg, Path(train_cfg.train.output_dir), cfg.a2bfr.num_processes,
            cfg.a2bfr.mixed_precision)


@app.command("train-roboface")
def train_roboface_command(
    plan: bool = typer.Option(False, "--plan", help="print stage II's parameters and estimated peak memory per "
                              "component (the real architectures on the meta device) and exit"),
    experiment: Optional[str] = typer.Option(None, parser=Name("an experiment name"),
                                             help="a named experiment (default: experiments.default)"),
    batch_size: Optional[int] = typer.Option(None, parser=ConfigKey("roboface.stage2_batch_size"),
                                             help="stage II, per process and micro-batch"),
    num_processes: Optional[int] = typer.Option(None, parser=ConfigKey("roboface.num_processes"),
                                                help="GPUs (accelerate processes)"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Train RoboFace from the command line: captions, stage I, stage II -- the code the RoboFace assets run,
    resuming the run folders of the same settings."""
    from attrface_pipeline.builders import (build_roboface_captioner, build_roboface_text_embeddings, captions_folder,
                                            roboface_train_config)
    from training.plan import roboface_plan
    from training.roboface.captions import CAPTIONS_FILE, caption_split

    cfg, name = _experiment_cfg("roboface", profile, _files(config_file), experiment, {
        "stage2_batch_size": batch_size, "num_processes": num_processes})
    if plan:
        typer.echo(roboface_plan(cfg).table())
        return
    shards = _published_shards(cfg)
    captions = cfg.paths.data_root / "roboface_captions" / captions_folder(cfg)
    caption_split(shards, captions, build_roboface_captioner(cfg), batch_size=cfg.roboface.caption_batch_size,
                  log=lambda m: typer.echo(m, err=True))
    r = cfg.roboface
    if r.text_cache:
        summary = build_roboface_text_embeddings(cfg, str(captions / CAPTIONS_FILE),
                                                 log=lambda m: typer.echo(m, err=True))
        typer.echo(f"text embeddings: {summary['prompts']} texts ({summary['encoded']} encoded now)", err=True)
    stage1 = roboface_train_config(cfg, shards=str(shards), stage="stage1")
    typer.echo(f"RoboFace {name}: stage I {stage1.run.output_dir}", err=True)
    _launch("training.roboface.train", stage1, Path(stage1.run.output_dir), r.num_processes, r.mixed_precision,
            ("--stage", "stage1"))
    stage2 = roboface_train_config(cfg, shards=str(shards), stage="stage2", captions=str(captions / CAPTIONS_FILE),
                                   stage1_dir=str(stage1.stage1_weights()))
    typer.echo(f"RoboFace {name}: stage II {stage2.run.output_dir}", err=True)
    _launch("training.roboface.train", stage2, Path(stage2.run.output_dir), r.num_processes, r.mixed_precision,
            ("--stage", "stage2"))


@app.command("config")
def show_config(
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Print the fully resolved pipeline config as JSON."""

    cfg = _config_or_exit(profile, _files(config_file))
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


def _files(paths: Optional[list[Path]]) -> Optional[list[str]]:
    return [str(p) for p in paths] if paths else None


def _config_or_exit(profile: Optional[str], files: Optional[list[str]] = None):
    """The resolved config, or the problems one per line and exit status 2."""
    from attrface_pipeline.config import ConfigError, load_config

    try:
        return load_config(profile, files)
    except ConfigError as err:
        typer.echo("error: " + "\n  ".join(err.problems) if len(err.problems) == 1 else f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command("check-models")
def check_models_command(
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Check that every model build_dataset will load is present; list all missing ones with the fix."""
    from attrface_pipeline.models.store import ModelNotAvailableError, check_models, required_models

    cfg = _config_or_exit(profile, _files(config_file))
    steps = ["faces", "face_attributes", "edit_prompts", "edits", "qc"]
    try:
        check_models(cfg, steps)
    except ModelNotAvailableError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for key, spec in required_models(cfg, steps).items():
        typer.echo(f"ok: models.{key} = {spec}")


def _prepare_instance(home: Path) -> Path:
    """The instance folder with the project's dagster.yaml (pools, run limits, telemetry off) and its storage."""
    import os
    import shutil

    from attrface_pipeline.config import DAGSTER_YAML

    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(DAGSTER_YAML, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        instance.upgrade()  # creates (or migrates) run, event-log and schedule storage
    return home


@app.command("init-instance")
def init_instance(
    home: Optional[Path] = typer.Option(None, envvar="DAGSTER_HOME", parser=PathArg("dir", exists=None),
                                        help="instance folder (default $DAGSTER_HOME)"),
) -> None:
    """Create the Dagster instance's storage once (setup does this), so first runs may start concurrently."""
    if home is None:
        raise typer.BadParameter("set DAGSTER_HOME or pass --home")
    home = _prepare_instance(home)
    typer.echo(f"Dagster instance ready at {home}")


@app.command("resolve-model")
def resolve_model(
    spec: str = typer.Argument(..., parser=Text(1000, what="a model spec"),
                               help="hub id, local path, tiny/<name> or insightface pack name"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Resolve a model spec to a local directory (generating tiny models on first use)."""
    from attrface_pipeline.models.store import ModelNotAvailableError, ModelStore

    cfg = _config_or_exit(profile, _files(config_file))
    try:
        typer.echo(str(ModelStore.from_config(cfg).resolve(spec)))
    except ModelNotAvailableError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("serve-llm")
def serve_llm(
    model: str = typer.Option("tiny/qwen3", parser=Text(1000, what="a model spec"),
                              help="model spec (tiny/qwen3, a local dir, or a cached hub id)"),
    port: int = typer.Option(8000, parser=PORT,
                             help="port on 127.0.0.1 (the default verbalize.vllm.base_url uses 8000)"),
    name: Optional[str] = typer.Option(None, parser=Text(200, what="a served model name"),
                                       help="served model name (default: the spec)"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Run a local OpenAI-compatible vLLM server (from .venv-vllm) until Ctrl-C, for backend=vllm runs."""
    import time

    from attrface_pipeline.models.store import ModelStore
    from attrface_pipeline.models.vllm_server import VllmServer

    cfg = _config_or_exit(profile, _files(config_file))
    server = VllmServer(ModelStore.from_config(cfg).resolve(model), name or model, port=port,
                        cache_dir=cfg.paths.cache_dir)
    typer.echo(f"starting vLLM for {model} (log: {server.log_path}) ...")
    with server:
        typer.echo(f"serving {name or model} at {server.base_url}; Ctrl-C stops it")
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


@app.command("review")
def review(
    host: str = typer.Option("127.0.0.1", parser=Text(253, what="a host name or address"),
                             help="bind address; anything but loopback needs --token"),
    port: int = typer.Option(8765, parser=PORT),
    token: Optional[str] = typer.Option(None, envvar="ATTRFACE_REVIEW_TOKEN", parser=Text(1000, what="a token"),
                                        help="required on every request"),
    include_failed: bool = typer.Option(False, help="also show pairs that failed automatic QC"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Open the human-review web app over the pairs that passed QC (decisions go to SQLite)."""
    from attrface_pipeline.web.review_app import serve

    cfg = _config_or_exit(profile, _files(config_file))
    typer.echo(f"review app on http://{host}:{port}/  (decisions: {cfg.review_db}; Ctrl-C stops it)")
    try:
        serve(cfg.paths.data_root, cfg.review_db, host, port, token, include_failed)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


# --model -> the module whose build_restorer(base, weights, **settings) gives a RestoreFn (imported when used).
RESTORERS = {"a2bfr": "training.a2bfr.restore", "roboface": "training.roboface.restore"}
# --model -> the models.* key of its default --base
DEFAULT_BASES = {"a2bfr": "flux", "roboface": "sd2_controlnet"}
# exit status of `attrface restore`: every input done | the run could not start or every input failed | usage or
# config error | some inputs failed (their records say why)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


@app.command("restore")
def restore(
    input_path: Path = typer.Option(..., "-i", "--input", parser=PathArg("any", exists=True),
                                    help="a photo, an aligned face, or a folder of them (searched recursively)"),
    output: Path = typer.Option(Path("results"), "-o", "--output", parser=PathArg("dir", exists=None),
                                help="results folder: cropped_faces/, restored_faces/, restored_imgs/, cmp/, "
                                "settings.json, restore_log.jsonl"),
    model: str = typer.Option("a2bfr", parser=Choice(RESTORERS), help=f"restorer: {', '.join(RESTORERS)}"),
    weights: Optional[str] = typer.Option(None, parser=Text(4096, what="release, latest or a path"),
                                          help="release (the official A²BFR release through the model "
                                          "store: the a2bfr default) | latest (this instance's newest trained run: "
                                          "the roboface default) | a path: an A²BFR LoRA folder or .safetensors, "
                                          "a RoboFace <run>/stage2/final"),
    base: Optional[str] = typer.Option(None, parser=Text(1000, what="a model spec"),
                                       help="base pipeline spec (default: the config's models.flux for a2bfr, "
                                       "models.sd2_controlnet for roboface)"),
    has_aligned: bool = typer.Option(False, "--has-aligned", help="inputs are aligned faces: restored whole, no "
                                     "detection (default: detected per image)"),
    input_kind: str = typer.Option("auto", parser=Choice(("auto", "aligned", "photo")),
                                   help="auto (aligned faces recognised by their landmarks) | aligned | photo"),
    only_center_face: bool = typer.Option(False, "--only-center-face", help="restore only the face nearest the "
                                          "centre of each photo"),
    upscale: float = typer.Option(1.0, parser=Float(1, 8), help="enlarge the whole photo by this factor (faces "
                                  "pasted at that scale)"),
    bg_upsampler: str = typer.Option("none", parser=Choice(("none", "bicubic")),
                                     help="background when upscaling: none (plain Lanczos resize) | bicubic"),
    suffix: Optional[str] = typer.Option(None, parser=Name("a file-name suffix"),
                                         help="appended to restored file names (name_SUFFIX.png)"),
    ext: str = typer.Option("auto", parser=Choice(("auto", "png", "jpg", "webp")),
                            help="restored_imgs/ format: auto (the input's) | png | jpg | webp"),
    prompt: Optional[str] = typer.Option(None, parser=Text(2000, empty=True, what="a prompt"),
                                         help="steer the restoration, e.g. 'a photo of a smiling face'"),
    steps: Optional[int] = typer.Option(None, parser=Int(1, 1000), help="denoising steps (A²BFR: 28, RoboFace: 50)"),
    guidance: Optional[float] = typer.Option(None, parser=Float(0, 100),
                                             help="text guidance (A²BFR: 3.0, RoboFace: 7.5)"),
    image_guidance: Optional[float] = typer.Option(None, parser=Float(0, 100),
                                                   help="A²BFR condition guidance (1.0 = off)"),
    seed: int = typer.Option(0, parser=SEED, help="every face is restored from this seed, as the official inference"),
    device: str = typer.Option("auto", parser=Device(), help="auto (cuda if present) | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", parser=Choice(("auto", "float32", "bfloat16", "float16")),
                              help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16 (any "
                              "device)"),
    width: Optional[int] = typer.Option(None, parser=Int(16, 4096, multiple=16),
                                        help="A²BFR output width (multiple of 16; default: the LoRA's training size, "
                                        "else 512)"),
    height: Optional[int] = typer.Option(None, parser=Int(16, 4096, multiple=16),
                                         help="A²BFR output height (multiple of 16)"),
    lora_scale: Optional[float] = typer.Option(None, parser=Float(-10, 10),
                                               help="A²BFR adapter scale on the condition tokens (default: the LoRA's "
                                               "recorded scale; 1.0 for the release)"),
    condition_latent: Optional[str] = typer.Option(None, parser=Choice(("sample", "mean")),
                                                   help="A²BFR condition latent: sample (the official draw) | mean "
                                                   "(deterministic; not the official output); default: the one "
                                                   "the LoRA records it was trained with, else sample"),
    condition_cache: bool = typer.Option(False, "--condition-cache", help="A²BFR: compute the condition once per "
                                         "face (LoRAs trained with condition_attends: self)"),
    batch_guidance: bool = typer.Option(False, "--batch-guidance", help="A²BFR: run the image-guidance pass in the "
                                        "same call (faster on a GPU; bf16 rounds differently from the official)"),
    batch_size: int = typer.Option(1, parser=Int(1, 64), help="faces per model call (each keeps its own seeded "
                                   "noise)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="redo inputs already restored into this folder"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Restore faces: photos are detected, aligned, restored face by face and pasted back; aligned faces are restored
    whole. Outputs follow CodeFormer's layout; exit status 0 all done, 1 the run failed, 2 usage error, 3 some
    inputs failed (see restore_log.jsonl)."""
    import importlib

    from attrface_pipeline.builders import align_spec, build_detector, resolve_restore_weights
    from attrface_pipeline.models.device import resolve_device, resolve_dtype
    from attrface_pipeline.models.store import ModelNotAvailableError, ModelStore
    from attrface_pipeline.storage import StorageError
    from training.restore_faces import RestoreOptions, list_inputs, prepare_output_dir, restore_folder

    def fail(message: str, code: int) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code)

    if model not in RESTORERS:
        fail(f"unknown model {model!r}; choose from {sorted(RESTORERS)}", EXIT_USAGE)
    cfg = _config_or_exit(profile, _files(config_file))
    try:
        options = RestoreOptions(input_kind="aligned" if has_aligned else input_kind,
                                 only_center_face=only_center_face, upscale=upscale, bg_upsampler=bg_upsampler,
                                 suffix=suffix, ext=ext)
        inputs = list_inputs(input_path, output)
        run_device = resolve_device(device)
        run_dtype = resolve_dtype(dtype, run_device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e), EXIT_USAGE)
    if not inputs:
        fail(f"no images in {input_path} (suffixes: {', '.join(sorted(cfg.source.extensions))})", EXIT_USAGE)
    try:
        prepare_output_dir(output)  # before any model loads
    except (StorageError, NotADirectoryError) as e:
        fail(str(e), EXIT_FAILED)
    a2bfr_only = {"width": width, "height": height, "lora_scale": lora_scale, "batch_size": batch_size,
                  "condition_latent": condition_latent, "condition_cache": condition_cache,
                  "batch_guidance": batch_guidance}
    if model != "a2bfr":
        given = [k for k, v in a2bfr_only.items() if v not in (None, False, 1)]
        if given:
            fail(f"--{given[0].replace('_', '-')} is an A²BFR option; {model} does not take it", EXIT_USAGE)
        a2bfr_only = {}
    try:
        weights_path, weights_about = resolve_restore_weights(cfg, model, weights)
        base_spec = base or getattr(cfg.models, DEFAULT_BASES[model])
        restorer = importlib.import_module(RESTORERS[model]).build_restorer(
            ModelStore.from_config(cfg).resolve(base_spec), weights_path, device=run_device, dtype=run_dtype,
            prompt=prompt, steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance, seed=seed,
            **a2bfr_only)
    except (FileNotFoundError, ModelNotAvailableError, ValueError) as e:  # missing or wrong weights/base: say which
        fail(f"{model}: {e}", EXIT_FAILED)
    settings = {"model": model, "weights": str(weights_path), "weights_source": weights_about, "base": base_spec,
                "device": str(run_device), "dtype": str(run_dtype).removeprefix("torch."), "seed": seed,
                **(restorer.settings() if hasattr(restorer, "settings") else
                   {"prompt": prompt, "steps": steps, "guidance": guidance}),
                "detector": cfg.detect.backend, "align_size": cfg.align.size}
    typer.echo(f"{model} from {weights_about} on {run_device} ({settings['dtype']}): {len(inputs)} input(s) -> "
               f"{output}", err=True)
    try:
        summary = restore_folder(inputs, output, restorer, detector=build_detector(cfg), align_spec=align_spec(cfg),
                                 settings=settings, options=options, overwrite=overwrite,
                                 log=lambda m: typer.echo(m, err=True))
    except (StorageError, ValueError) as e:
        fail(str(e), EXIT_FAILED)
    typer.echo(f"restored {summary['faces']} face(s) in {summary['restored']} image(s), skipped {summary['skipped']} "
               f"already done, {summary['failed']} failed, in {summary['seconds']:.1f} s -> {output}")
    for name, reason in summary["failures"][:10]:
        typer.echo(f"  failed: {name}: {reason}")
    if summary["failed"]:
        if len(summary["failures"]) > 10:
            typer.echo(f"  ... and {len(summary['failures']) - 10} more: {output / 'restore_log.jsonl'}")
        raise typer.Exit(EXIT_FAILED if summary["failed"] == summary["inputs"] else EXIT_PARTIAL)


@app.command("bench-gpu")
def bench_gpu(
    model: Optional[list[str]] = typer.Option(None, parser=Choice(("large", "medium", "tiny")),
                                              help="large | medium | tiny, repeatable (default: SD3.5 Large and "
                                              "Medium on CUDA, tiny on a CPU)"),
    mode: Optional[list[str]] = typer.Option(None, parser=Choice(("eager", "compiled", "fp8")),
                                             help="eager | compiled | fp8, repeatable (default: all that run here)"),
    batch: Optional[list[int]] = typer.Option(None, parser=Int(1, 64),
                                              help="batch sizes, repeatable (default: 1 4 8)"),
    max_sequence_length: Optional[list[int]] = typer.Option(None, parser=Int(8, 512),
                                                            help="T5 tokens, repeatable (default: the full "
                                                            "profile's)"),
    resolution: Optional[int] = typer.Option(None, parser=Int(64, 6144, multiple=16),
                                             help="square size in pixels (default 512)"),
    repeats: Optional[int] = typer.Option(None, parser=Int(1, 100), help="timed runs per row (default 2)"),
    json_out: Optional[Path] = typer.Option(None, "--json", parser=PathArg("file", exists=None),
                                            help="also write the results as JSON here"),
    all_rows: bool = typer.Option(False, "--all", help="the acceptance run: every GPU row of docs/benchmarks.md "
                                  "(FlowEdit, A²BFR train bf16/fp8/nf4 + restore, RoboFace, FaRL, metrics) into "
                                  "<data_root>/benchmarks_gpu/bench_gpu.json and .md"),
    update_docs: bool = typer.Option(False, "--update-docs", help="with --all: write the table into "
                                     "docs/benchmarks.md"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """FlowEdit cost at the full profile's parameters: SD3.5 Large/Medium from their configs with random weights on
    CUDA (eager, compiled, float8; batch 1/4/8), the tiny model on a CPU. --all: every GPU row (about 8 minutes on
    one H100)."""
    from attrface_pipeline import bench_gpu as bench

    cfg = _config_or_exit(profile, _files(config_file))
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    if all_rows:
        given = [name for name, value in (("--model", model), ("--mode", mode), ("--batch", batch),
                                          ("--max-sequence-length", max_sequence_length),
                                          ("--resolution", resolution), ("--repeats", repeats)) if value]
        if given:
            _usage(f"--all runs every row of docs/benchmarks.md at their own settings; drop {', '.join(given)}")
        out = cfg.paths.data_root / "benchmarks_gpu"
        try:
            result = bench.run_all(out, cache_dir=cfg.paths.cache_dir, json_path=json_out, log=log)
        except ValueError as err:
            _usage(str(err))
        typer.echo(bench.all_table(result))
        typer.echo(f"written: {out / 'bench_gpu.json'}, {out / 'bench_gpu.md'}")
        if update_docs:
            from attrface_pipeline.config import PROJECT_ROOT

            if bench.update_docs(result, PROJECT_ROOT / "docs" / "benchmarks.md"):
                typer.echo("docs/benchmarks.md updated")
        return
    if update_docs:
        _usage("--update-docs writes the table of --all; give both")
    try:  # before anything is built: models this machine cannot run, sizes a model cannot take
        bench.check_arguments(model, mode, batch, max_sequence_length, resolution, repeats)
    except ValueError as err:
        _usage(str(err))
    result = bench.run_benchmark(model, mode, batch, max_sequence_length, resolution, repeats, log=log,
                                 cache_dir=cfg.paths.cache_dir, json_path=json_out)
    typer.echo(bench.table(result))


@app.command("evaluate")
def evaluate(
    pred: Path = typer.Option(..., "--pred", parser=PathArg("dir", exists=True),
                              help="folder of restored faces (aligned crops)"),
    gt: Path = typer.Option(..., "--gt", parser=PathArg("dir", exists=True),
                            help="folder of ground-truth faces with the same file names"),
    metrics: Optional[list[str]] = typer.Option(
        None, "--metric", parser=Choice(_metric_names),
        help="repeatable; default: psnr ssim lpips ids fid and the no-reference metrics "
        "(those need the [iqa] extra)"),
    json_out: Optional[Path] = typer.Option(None, "--json", parser=PathArg("file", exists=None),
                                            help="also write the results as JSON here"),
    profile: Optional[str] = _profile_option(),
    config_file: Optional[list[Path]] = _config_option(),
) -> None:
    """Metrics of a folder of restorations against a folder of GT faces (paired by file name). A pair whose image
    cannot be read is reported and left out; exit status 0 all pairs scored, 1 nothing could be scored, 2 usage
    error, 3 some pairs failed."""
    from attrface_pipeline.builders import build_eval_scorers
    from attrface_pipeline.storage import StorageError, atomic_write_json
    from training.eval.report import FOLDER_METRICS, LABELS, cells_json, check_json_path, evaluate_folders
    from training.restore_faces import prepare_output_dir

    chosen = metrics or list(FOLDER_METRICS)
    cfg = _config_or_exit(profile, _files(config_file))
    if json_out is not None:
        try:
            check_json_path(json_out)
        except ValueError as err:
            _usage(str(err))
        try:
            prepare_output_dir(json_out.parent)  # before any network loads
        except (StorageError, NotADirectoryError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
    try:
        cells, unpaired, records = evaluate_folders(pred, gt, build_eval_scorers(cfg, chosen), metrics=chosen)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    if unpaired:
        typer.echo(f"warning: {len(unpaired)} file(s) in only one folder, skipped (e.g. {unpaired[0]})", err=True)
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        typer.echo(f"warning: pair {r['name']} left out: {r['reason']}", err=True)
    n = max((c.n for c in cells.values()), default=0)
    typer.echo(f"{n} pairs" + (f" ({len(failed)} unreadable, left out)" if failed else ""))
    for metric, cell in cells.items():
        shown = f"{cell.value:.4f}" if cell.value is not None else f"n/a ({cell.note})"
        if cell.value is not None and cell.note:  # e.g. an untrained network: said beside the number
            shown += f"  ({cell.note})"
        typer.echo(f"{LABELS[metric]:<10} {shown}")
    if json_out is not None:
        atomic_write_json(json_out, {"pred": str(pred), "gt": str(gt), "pairs": n, "unpaired": unpaired,
                                     "failed": failed, "metrics": cells_json(cells)})
    if all(c.value is None for c in cells.values()):
        raise typer.Exit(EXIT_FAILED)
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


if __name__ == "__main__":
    app()
