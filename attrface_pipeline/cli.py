"""``attrface`` command line: offline model zoo, config inspection, model resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="AttrFace tools. The dataset itself is built by Dagster: see README.", no_args_is_help=True)


@app.command("make-tiny-models")
def make_tiny_models(
    out_dir: Path = typer.Argument(..., help="directory to write <name>/ checkpoints into"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="generate just these (repeatable)"),
    force: bool = typer.Option(False, help="regenerate models that already exist"),
) -> None:
    """Write deterministic tiny random checkpoints in the real on-disk formats (offline)."""
    from attrface_pipeline.models import tiny

    names = only or list(tiny.GENERATORS)
    unknown = sorted(set(names) - set(tiny.GENERATORS))
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; choose from {sorted(tiny.GENERATORS)}")
    for name in names:
        target = out_dir / name
        if (target / tiny.DONE_MARKER).exists() and not force:
            typer.echo(f"{name}: exists at {target}")
            continue
        tiny.generate(name, target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        typer.echo(f"{name}: wrote {target} ({size / 1e6:.1f} MB)")


@app.command("config")
def show_config(
    profile: Optional[str] = typer.Option(None, help="offline | full (default: $ATTRFACE_PROFILE or offline)"),
    config_file: Optional[list[Path]] = typer.Option(None, "-c", "--config", help="YAML file(s), in order"),
) -> None:
    """Print the fully resolved pipeline config as JSON."""

    cfg = _config_or_exit(profile, [str(p) for p in config_file] if config_file else None)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


def _config_or_exit(profile: Optional[str], files: Optional[list[str]] = None):
    """The resolved config, or the problems one per line and exit status 2."""
    from attrface_pipeline.config import ConfigError, load_config

    try:
        return load_config(profile, files)
    except (ConfigError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command("check-models")
def check_models_command(
    profile: Optional[str] = typer.Option(None, help="offline | full (default: $ATTRFACE_PROFILE or offline)"),
    config_file: Optional[list[Path]] = typer.Option(None, "-c", "--config", help="YAML file(s), in order"),
) -> None:
    """Check that every model build_dataset will load is present; list all missing ones with the fix."""
    from attrface_pipeline.models.store import ModelNotAvailableError, check_models, required_models

    cfg = _config_or_exit(profile, [str(p) for p in config_file] if config_file else None)
    steps = ["faces", "face_attributes", "edit_prompts", "edits", "qc"]
    try:
        check_models(cfg, steps)
    except ModelNotAvailableError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for key, spec in required_models(cfg, steps).items():
        typer.echo(f"ok: models.{key} = {spec}")


@app.command("init-instance")
def init_instance(
    home: Optional[Path] = typer.Option(None, envvar="DAGSTER_HOME", help="instance folder (default $DAGSTER_HOME)"),
) -> None:
    """Create the Dagster instance's storage once (setup does this), so first runs may start concurrently."""
    import os
    import shutil

    from attrface_pipeline.config import PROJECT_ROOT

    if home is None:
        raise typer.BadParameter("set DAGSTER_HOME or pass --home")
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # pools, run limits, telemetry off: the project's instance settings
        shutil.copyfile(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        instance.upgrade()  # creates (or migrates) run, event-log and schedule storage
    typer.echo(f"Dagster instance ready at {home}")


@app.command("resolve-model")
def resolve_model(
    spec: str = typer.Argument(..., help="hub id, local path, tiny/<name> or insightface pack name"),
    profile: Optional[str] = typer.Option(None),
) -> None:
    """Resolve a model spec to a local directory (generating tiny models on first use)."""
    from attrface_pipeline.config import load_config
    from attrface_pipeline.models.store import ModelNotAvailableError, ModelStore

    try:
        typer.echo(str(ModelStore.from_config(load_config(profile)).resolve(spec)))
    except ModelNotAvailableError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("serve-llm")
def serve_llm(
    model: str = typer.Option("tiny/qwen3", help="model spec (tiny/qwen3, a local dir, or a cached hub id)"),
    port: int = typer.Option(8000, help="port on 127.0.0.1 (the default verbalize.vllm.base_url uses 8000)"),
    name: Optional[str] = typer.Option(None, help="served model name (default: the spec)"),
    profile: Optional[str] = typer.Option(None),
) -> None:
    """Run a local OpenAI-compatible vLLM server (from .venv-vllm) until Ctrl-C, for backend=vllm runs."""
    import time

    from attrface_pipeline.config import load_config
    from attrface_pipeline.models.store import ModelStore
    from attrface_pipeline.models.vllm_server import VllmServer

    cfg = load_config(profile)
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
    host: str = typer.Option("127.0.0.1", help="bind address; anything but loopback needs --token"),
    port: int = typer.Option(8765),
    token: Optional[str] = typer.Option(None, envvar="ATTRFACE_REVIEW_TOKEN", help="required on every request"),
    include_failed: bool = typer.Option(False, help="also show pairs that failed automatic QC"),
    profile: Optional[str] = typer.Option(None),
) -> None:
    """Open the human-review web app over the pairs that passed QC (decisions go to SQLite)."""
    from attrface_pipeline.config import load_config
    from attrface_pipeline.web.review_app import serve

    cfg = load_config(profile)
    typer.echo(f"review app on http://{host}:{port}/  (decisions: {cfg.review_db}; Ctrl-C stops it)")
    try:
        serve(cfg.paths.data_root, cfg.review_db, host, port, token, include_failed)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()


# --model -> the module whose build_restorer(base, weights, **settings) gives a RestoreFn (imported when used).
RESTORERS = {"a2bfr": "training.a2bfr.restore", "roboface": "training.roboface.restore"}
# --model -> the models.* key of its default --base
DEFAULT_BASES = {"a2bfr": "flux", "roboface": "sd2_controlnet"}


@app.command("restore")
def restore(
    src: Path = typer.Argument(..., help="a photo, an aligned face, or a folder of them"),
    dst: Path = typer.Argument(..., help="output file (or folder, for a folder input)"),
    model: str = typer.Option("a2bfr", help=f"restorer: {', '.join(RESTORERS)}"),
    weights: Path = typer.Option(..., help="trained weights: the A²BFR LoRA folder (ours) or release .safetensors; "
                                 "RoboFace: the trained folder (<run>/stage2/final)"),
    base: Optional[str] = typer.Option(None, help="base pipeline spec (default: the config's models.flux for a2bfr, "
                                       "models.sd2_controlnet for roboface)"),
    prompt: Optional[str] = typer.Option(None, help="steer the restoration, e.g. 'a photo of a smiling face'"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (A²BFR: 28, RoboFace: 50)"),
    guidance: Optional[float] = typer.Option(None, help="text guidance (A²BFR: 3.0, RoboFace: 7.5)"),
    image_guidance: Optional[float] = typer.Option(None, help="condition guidance (A²BFR: 1.0 = off)"),
    seed: int = typer.Option(0),
    input_kind: str = typer.Option("auto", help="auto | aligned | photo"),
    profile: Optional[str] = typer.Option(None),
    config: Optional[list[str]] = typer.Option(None, "--config", help="YAML settings file(s)"),
) -> None:
    """Restore faces with a trained model: photos are detected, aligned, restored face by face, pasted back."""
    import importlib

    from attrface_pipeline.builders import align_spec, build_detector
    from attrface_pipeline.models.device import resolve_device, resolve_dtype
    from attrface_pipeline.models.store import ModelStore
    from training.restore_faces import expand_io, restore_paths

    if model not in RESTORERS:
        raise typer.BadParameter(f"unknown model {model!r}; choose from {sorted(RESTORERS)}")
    cfg = _config_or_exit(profile, config)
    try:
        inputs, outputs = expand_io(src, dst)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    from attrface_pipeline.models.store import ModelNotAvailableError

    device = resolve_device("auto")
    try:
        restorer = importlib.import_module(RESTORERS[model]).build_restorer(
            ModelStore.from_config(cfg).resolve(base or getattr(cfg.models, DEFAULT_BASES[model])), weights,
            device=device, dtype=resolve_dtype("auto", device), prompt=prompt, steps=steps, guidance_scale=guidance,
            image_guidance_scale=image_guidance, seed=seed)
    except (FileNotFoundError, ModelNotAvailableError) as e:  # missing or wrong --weights / --base: say which
        typer.echo(f"error: {model}: {e}", err=True)
        raise typer.Exit(2) from None
    records = restore_paths(inputs, outputs, restorer, detector=build_detector(cfg), align_spec=align_spec(cfg),
                            input_kind=input_kind, log=lambda m: typer.echo(m, err=True))
    failed = [r for r in records if r["error"]]
    faces = sum(r["faces"] for r in records)
    typer.echo(f"restored {faces} faces in {len(records) - len(failed)} images -> {dst}"
               + (f"; {len(failed)} failed" if failed else ""))
    if failed and len(failed) == len(records):
        raise typer.Exit(1)


@app.command("bench-gpu", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                            "help_option_names": []})
def bench_gpu(ctx: typer.Context) -> None:
    """FlowEdit cost at the full profile's parameters: SD3.5 Large/Medium from their configs with random weights on
    CUDA (eager, compiled, float8; batch 1/4/8), the tiny model on a CPU. Options: --help."""
    from attrface_pipeline.bench_gpu import main

    main(list(ctx.args), prog="attrface bench-gpu")


@app.command("evaluate")
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="folder of restored faces (aligned crops)"),
    gt: Path = typer.Option(..., "--gt", help="folder of ground-truth faces with the same file names"),
    metrics: Optional[list[str]] = typer.Option(
        None, "--metric", help="repeatable; default: psnr ssim lpips ids fid and the no-reference metrics "
        "(those need the [iqa] extra)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON here"),
    profile: Optional[str] = typer.Option(None),
    config: Optional[list[str]] = typer.Option(None, "--config", help="YAML settings file(s)"),
) -> None:
    """Metrics of a folder of restorations against a folder of GT faces (paired by file name)."""
    from attrface_pipeline.builders import build_eval_scorers
    from attrface_pipeline.storage import atomic_write_json
    from training.eval.report import FOLDER_METRICS, LABELS, evaluate_folders

    chosen = metrics or list(FOLDER_METRICS)
    unknown = sorted(set(chosen) - set(FOLDER_METRICS))
    if unknown:
        raise typer.BadParameter(f"unknown metric(s) {unknown}; choose from {list(FOLDER_METRICS)}")
    cfg = _config_or_exit(profile, config)
    try:
        cells, unpaired = evaluate_folders(pred, gt, build_eval_scorers(cfg, chosen), metrics=chosen)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if unpaired:
        typer.echo(f"warning: {len(unpaired)} file(s) in only one folder, skipped (e.g. {unpaired[0]})", err=True)
    n = max((c.n for c in cells.values()), default=0)
    typer.echo(f"{n} pairs")
    for metric, cell in cells.items():
        shown = f"{cell.value:.4f}" if cell.value is not None else f"n/a ({cell.note})"
        typer.echo(f"{LABELS[metric]:<10} {shown}")
    if json_out is not None:
        atomic_write_json(json_out, {"pred": str(pred), "gt": str(gt), "pairs": n, "unpaired": unpaired,
                                     "metrics": {m: {"value": c.value, "n": c.n, "note": c.note}
                                                 for m, c in cells.items()}})
    if all(c.value is None for c in cells.values()):
        raise typer.Exit(1)
