"""FlowEdit cost of the project's own ``FlowEditor`` at the full profile's parameters, for sizing a cluster before
fetching weights (``attrface bench-gpu``, ``benchmarks/flowedit_gpu.py``).

On CUDA it builds the published SD3.5 Large / Medium transformer and the SD3 VAE from their configs with random
weights (cost does not depend on weight values; no download) and times eager, ``torch.compile`` and float8
(torchao, per row, compiled) at each batch size: s/pair, transformer TFLOP/s, peak memory, GPU-hours per 10K pairs.
Prompt embeddings are random tensors of the real shapes (CLIP 77 + T5 ``max_sequence_length`` tokens × 4096):
the text encoders run once per caption in a build, not per evaluation. For float8 it also reports how far the
edit moves from the bf16 edit of the same faces (SSIM of the luma; on random weights this is numerical drift only,
identity needs real weights).

On a CPU it runs the tiny random SD3 of the offline profile, and says so: those figures say nothing about SD3.5.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

# stabilityai/stable-diffusion-3.5-{large,medium} transformer/config.json and the SD3 VAE's vae/config.json.
SD35 = {
    "large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm"),
    "medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13))),
}
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
CLIP_TOKENS = 77
MODELS = ("large", "medium", "tiny")
MODES = ("eager", "compiled", "fp8")
MSL_RANGE = (8, 512)  # edit.max_sequence_length's domain: SD3's T5 takes at most 512 tokens
RESOLUTION_STEP = 16  # 8x VAE and 2x2 patches (the tiny model needs 4: 16 serves all three)
# the largest square each transformer's positional embedding covers: pos_embed_max_size patches of 16 (tiny: 4) px
MAX_RESOLUTION = {"large": 192 * 16, "medium": 384 * 16, "tiny": 128 * 4}
CPU_RESOLUTION = 128  # on a CPU the tiny model runs at most at this size
NO_CUDA_PEAK = "no CUDA: peak GPU memory is measured on CUDA only"
SRC = "A close-up portrait photo of a young woman with black hair, smiling and without eyeglasses."
TAR = "A close-up portrait photo of a young woman with black hair, smiling and wearing eyeglasses."


@dataclass
class Row:
    model: str
    mode: str  # eager | compiled | fp8
    batch: int
    max_sequence_length: int
    s_per_pair: float | None
    tflops: float | None  # transformer FLOP/s (the VAE's share is small and not counted)
    peak_gib: float | None
    gpu_hours_per_10k: float | None
    note: str = ""


def build_architecture(name: str, device: torch.device, dtype: torch.dtype):
    """A ``StableDiffusion3Pipeline`` of the published architecture with random weights and no text encoders."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD35[name]).to(dtype)
        vae = AutoencoderKL(**SD3_VAE).to(dtype)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def sample_faces(resolution: int, count: int) -> list[np.ndarray]:
    """``count`` square faces at ``resolution``, cycled from the shipped HQ sample photos."""
    from attrface_pipeline.config import SAMPLES_DIR
    from attrface_pipeline.images import read_rgb

    photos = sorted((SAMPLES_DIR / "faces" / "hq").glob("*.[jp][pn]g"))
    return [cv2.resize(read_rgb(photos[i % len(photos)]), (resolution, resolution), interpolation=cv2.INTER_AREA)
            for i in range(count)]


def _editor(model: str, mode: str, device: torch.device, dtype: torch.dtype, batch: int, msl: int,
            cache_dir: Path | None = None):
    from attrface_pipeline.stages.flowedit import FlowEditor

    compile_, quantize = mode in ("compiled", "fp8"), "fp8" if mode == "fp8" else "none"
    if model == "tiny":
        from attrface_pipeline.config import load_config
        from attrface_pipeline.models.store import ModelStore

        store = ModelStore(cache_dir) if cache_dir is not None else ModelStore.from_config(load_config())
        path = store.resolve("tiny/sd3")
        return FlowEditor.from_pretrained(path, device=device, dtype=dtype, compile=compile_, quantize=quantize,
                                          batch_size=batch)
    editor = FlowEditor.from_pipeline(build_architecture(model, device, dtype), device, dtype, compile=compile_,
                                      quantize=quantize, batch_size=batch)
    dim = SD35[model]["joint_attention_dim"]
    gen = torch.Generator("cpu").manual_seed(0)
    for prompt in (SRC, TAR, ""):
        editor.prime_embedding(prompt, msl, torch.randn(1, CLIP_TOKENS + msl, dim, generator=gen),
                               torch.randn(1, SD35[model]["pooled_projection_dim"], generator=gen))
    return editor


def _flops_per_call(editor, batch: int, resolution: int, msl: int) -> float:
    """FLOPs of one transformer evaluation on ``batch`` latents (counted on the eager module)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = getattr(editor.pipe.transformer, "_orig_mod", editor.pipe.transformer)
    latent = resolution // editor.pipe.vae_scale_factor
    channels = module.config.in_channels
    x = torch.zeros(batch, channels, latent, latent, device=editor.device, dtype=editor.dtype)
    embeds, pooled = editor._embed_batch([SRC] * batch, msl)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(hidden_states=x, timestep=torch.ones(batch, device=editor.device), encoder_hidden_states=embeds,
               pooled_projections=pooled, return_dict=False)
    return float(counter.get_total_flops())


def measure(model: str, mode: str, batch: int, msl: int, *, device: torch.device, dtype: torch.dtype,
            resolution: int, repeats: int, params, reference: dict | None = None,
            cache_dir: Path | None = None) -> tuple[Row, list[np.ndarray]]:
    from attrface_pipeline.stages.checks import ssim
    from attrface_pipeline.stages.flowedit import float8_problem

    if mode == "fp8" and (problem := float8_problem(device)) is not None:
        return Row(model, mode, batch, msl, None, None, None, None, f"n/a: {problem}"), []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    editor = _editor(model, mode, device, dtype, batch, msl, cache_dir)
    params = replace(params, max_sequence_length=msl)
    faces = sample_faces(resolution, batch)
    seeds = list(range(batch))

    times = []
    for _ in range(1 + repeats):  # the first is a warm-up (and compiles when compiled)
        t0 = time.perf_counter()
        out, timing = editor.edit(faces, [SRC] * batch, [TAR] * batch, params, seeds)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    first, seconds = times[0], statistics.median(times[1:])
    # each FlowEdit call evaluates 4 latents per pair (source and target, unconditional and conditional)
    flops = _flops_per_call(editor, 4 * batch, resolution, msl) * timing.transformer_calls
    note = f"first batch {first:.1f} s (compile)" if mode != "eager" else ""
    if reference and (model, batch, msl) in reference:  # fp8 against the bf16 edit of the same faces and seeds
        drift = [ssim(a, b) for a, b in zip(out, reference[(model, batch, msl)])]
        note += f"; SSIM vs bf16 edit {min(drift):.4f} min / {statistics.mean(drift):.4f} mean"
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    if peak is None:  # a missing figure always says why
        note += f"; {NO_CUDA_PEAK}"
    s_pair = seconds / batch
    row = Row(model, mode, batch, msl, round(s_pair, 4), float(f"{flops / seconds / 1e12:.3g}"), peak,
              round(s_pair * 10_000 / 3600, 2), note.strip("; "))
    return row, out


def _names(what: str, values, allowed: tuple[str, ...]) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{what}: expected a list of names, got the string {values!r}")
    out = list(dict.fromkeys(values))
    for v in out:
        if v not in allowed:
            raise ValueError(f"{what} {v!r}: choose from {', '.join(allowed)}")
    return out


def _whole(what: str, value, low: int, high: int | None = None, why: str = "") -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{what} {value!r}: expected a whole number {bound}{why}")
    return int(value)


def check_arguments(models: list[str] | None = None, modes: list[str] | None = None,
                    batches: list[int] | None = None, msls: list[int] | None = None, resolution: int | None = 512,
                    repeats: int | None = 2, *, cuda: bool | None = None) -> dict:
    """The arguments of :func:`run_benchmark` checked before anything is built, defaults filled in for this machine
    (None or an empty list: the default; ``cuda``: whether it has a CUDA device, None: look). ValueError (one line)
    for any bad one, including SD3.5 Large/Medium without CUDA (only the tiny model runs on a CPU)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    resolution = 512 if resolution is None else resolution
    repeats = 2 if repeats is None else repeats
    models = _names("model", models or (), MODELS) or (["large", "medium"] if cuda else ["tiny"])
    modes = _names("mode", modes or (), MODES) or (["eager", "compiled", "fp8"] if cuda else ["eager", "fp8"])
    if not cuda:
        for m in models:
            if m != "tiny":
                raise ValueError(f"model {m} (SD3.5 {m.title()}) needs a CUDA GPU and this machine has none: "
                                 f"here only the tiny random SD3 runs (model tiny)")
    batches = [_whole("batch", b, 1) for b in dict.fromkeys(batches or ())] or ([1, 4, 8] if cuda else [1, 4])
    msls = [_whole("max_sequence_length", v, *MSL_RANGE, " T5 tokens") for v in dict.fromkeys(msls or ())]
    _whole("resolution", resolution, RESOLUTION_STEP, None, " px")
    limit = min(models, key=MAX_RESOLUTION.get)
    if cuda and resolution > MAX_RESOLUTION[limit]:  # a CPU runs at most CPU_RESOLUTION anyway
        raise ValueError(f"resolution {resolution}: model {limit} covers at most {MAX_RESOLUTION[limit]} px "
                         f"(its positional embedding)")
    if resolution % RESOLUTION_STEP:
        raise ValueError(f"resolution {resolution}: expected a multiple of {RESOLUTION_STEP} (8x VAE, 2x2 patches)")
    _whole("repeats", repeats, 1, None, " (timed calls after the warm-up; the median is reported)")
    return {"models": models, "modes": modes, "batches": batches, "msls": msls, "resolution": int(resolution),
            "repeats": int(repeats), "cuda": cuda}


def check_output_file(path: str | Path | None, what: str = "json") -> Path | None:
    """``path`` usable as an output file (None passes): storage.check_output_file."""
    from attrface_pipeline.storage import check_output_file as check

    return None if path is None else check(path, what)


def write_json(path: str | Path, result: dict) -> None:
    """``result`` as standard JSON (a non-finite number is written as null), atomically."""
    from attrface_pipeline.storage import atomic_write_json

    atomic_write_json(Path(path), result)


def run_benchmark(models: list[str] | None = None, modes: list[str] | None = None, batches: list[int] | None = None,
                  msls: list[int] | None = None, resolution: int | None = 512, repeats: int | None = 2, log=print, *,
                  cache_dir: str | Path | None = None, json_path: str | Path | None = None) -> dict:
    """FlowEdit rows for every model x T5 length x mode x batch. Arguments are checked first
    (:func:`check_arguments`; ValueError). ``cache_dir``: the model store holding the tiny model (None: the
    configured ``paths.cache_dir``); ``json_path``: also write the result there (checked before any work)."""
    from attrface_pipeline.builders import flowedit_params
    from attrface_pipeline.config import load_config
    from attrface_pipeline.stages.flowedit import float8_problem

    plan = check_arguments(models, modes, batches, msls, resolution, repeats)
    json_path = check_output_file(json_path)
    models, modes, batches, resolution = plan["models"], plan["modes"], plan["batches"], plan["resolution"]
    cuda, repeats = plan["cuda"], plan["repeats"]
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    full = load_config(profile="full").edit
    params = flowedit_params(full)
    msls = plan["msls"] or [full.max_sequence_length]
    if not cuda:
        resolution = min(resolution, CPU_RESOLUTION)
        log(f"no CUDA device: the tiny random SD3 on CPU at {resolution}²; these figures say nothing about SD3.5")
    log(f"FlowEdit, full profile: T={params.steps}, n_max={params.n_max}, n_avg={params.n_avg}: "
        f"{params.sample_evaluations()} evaluations/pair; {device}, {dtype}")
    if "fp8" in modes and (problem := float8_problem(device)) is not None:
        log(f"mode fp8 cannot run here ({problem}): its rows are n/a and say so")
    if "compiled" in modes and not cuda:
        log("mode compiled on a CPU: torch.compile's C++ backend, about a minute of compiling before each row's "
            "first batch (the row's note gives it)")
    rows, reference = [], {}
    for model in models:
        for msl in msls:
            for mode in sorted(modes, key=lambda m: m == "fp8"):  # bf16 first: fp8 is compared with it
                for batch in batches:
                    row, out = measure(model, mode, batch, msl, device=device, dtype=dtype, resolution=resolution,
                                       repeats=repeats, params=params,
                                       reference=reference if mode == "fp8" else None, cache_dir=cache_dir)
                    if mode == "compiled" or (mode == "eager" and (model, batch, msl) not in reference):
                        reference[(model, batch, msl)] = out
                    rows.append(row)
                    log(json.dumps(asdict(row)))
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
              "resolution": resolution, "evaluations_per_pair": params.sample_evaluations(),
              "rows": [asdict(r) for r in rows]}
    if json_path is not None:
        write_json(json_path, result)
    return result


def table(result: dict) -> str:
    lines = [f"{result['device']}, {result['dtype']}, {result['resolution']}², "
             f"{result['evaluations_per_pair']} evaluations/pair",
             "| model | mode | batch | T5 tokens | s/pair | TFLOP/s | peak GiB | GPU-h / 10K pairs | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["model"], r["mode"], r["batch"], r["max_sequence_length"], r["s_per_pair"], r["tflops"],
                 r["peak_gib"], r["gpu_hours_per_10k"], r["note"]]
        lines.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=MODELS)
    ap.add_argument("--mode", nargs="+", choices=MODES)
    ap.add_argument("--batch", nargs="+", type=int)
    ap.add_argument("--max-sequence-length", nargs="+", type=int, help="T5 tokens (default: the full profile's)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        check_arguments(args.model, args.mode, args.batch, args.max_sequence_length, args.resolution, args.repeats)
        check_output_file(args.json, "--json")
    except ValueError as err:
        ap.error(str(err))
    print(table(run_benchmark(args.model, args.mode, args.batch, args.max_sequence_length, args.resolution,
                              args.repeats, json_path=args.json)))


# -- the acceptance run: every GPU row of docs/benchmarks.md in one command ---------------------------------------
GOALS = {"a2bfr_nf4_b1_peak_gib": ("≤ 22.4 GiB (24 GB: fits a 4090)", lambda v: v <= 22.35),
         "a2bfr_bf16_b8_peak_gib": ("≤ 37.3 GiB (40 GB)", lambda v: v <= 37.25),
         "a2bfr_bf16_b8_s_per_sample": ("≤ 0.35 s/sample", lambda v: v <= 0.35),
         "a2bfr_restore_cache_s_per_face": ("≤ 1.9 s/face", lambda v: v <= 1.9)}
DOCS_START, DOCS_END = "<!-- bench-gpu --all: start -->", "<!-- bench-gpu --all: end -->"


def _script(name: str, args: list[str], out: Path, log, timeout: int) -> dict:
    """Run ``benchmarks/<name>`` with ``--json``; its JSON, or {"note": why not}."""
    import subprocess
    import sys

    from attrface_pipeline.config import PROJECT_ROOT

    script = PROJECT_ROOT / "benchmarks" / name
    if not script.is_file():
        return {"note": f"n/a: {script} missing (bench-gpu --all runs from a checkout)"}
    path = out / f"{Path(name).stem}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), *args, "--json", str(path)]
    log(" ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"n/a: timed out after {timeout} s"}
    if proc.returncode != 0 or not path.is_file():
        return {"note": f"failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-400:]}"}
    return json.loads(path.read_text())


def _farl_rate(device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> dict:
    """FaRL ViT-B/16 (the published architecture, random weights) faces/s at 224²."""
    from attrface_pipeline.models.farl import FaRLAttributeModel

    model = FaRLAttributeModel().to(device, dtype).eval()
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    with torch.inference_mode():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {"batch": batch, "faces_per_s": round(batch * repeats / (time.perf_counter() - t0), 1)}


def _row(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _folder(what: str, path: str | Path) -> Path:
    """``path`` as an absolute folder path (the scripts run from the checkout); ValueError when it is a file."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    return path


def run_all(out: str | Path, *, cache_dir: str | Path, json_path: str | Path | None = None, log=print) -> dict:
    """Every GPU row of the README/docs in one run (``attrface bench-gpu --all``): FlowEdit Large batch 8 compiled,
    the A²BFR training step at bf16/fp8/nf4 and restore with the condition cache, RoboFace's training step and
    restore, FaRL faces/s and the evaluation metrics; published architectures with random weights on CUDA, the
    tiny models (a few seconds each) on a CPU. The rows are fixed (they are the docs' rows, measured against their
    goals): no model, mode, batch or size is chosen here.

    Writes ``bench_gpu.json`` and ``bench_gpu.md`` in the folder ``out`` (and the JSON also at ``json_path`` if
    given); the tiny models are read from (or generated into) the model store ``cache_dir``: the configured
    ``paths.cache_dir``, never a folder of the checkout of its own accord. ValueError before any work when a path
    is unusable."""
    from datetime import datetime, timezone

    out, cache_dir = _folder("output folder", out), _folder("cache folder", cache_dir)
    json_path = check_output_file(json_path)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    parts: dict = {}
    log("FlowEdit")
    parts["flowedit"] = run_benchmark(["large"] if cuda else ["tiny"], ["compiled"] if cuda else ["eager"],
                                      [8] if cuda else [1], None, 512, 2 if cuda else 1, log=log,
                                      cache_dir=cache_dir)
    quick = [] if cuda else ["--steps", "2", "--repeats", "1", "--warmup", "0"]
    store = ["--cache-dir", str(cache_dir)]
    parts["a2bfr_bf16"] = _script("a2bfr_speed.py", [*(["--batch", "1", "8"] if cuda else ["--batch", "1", *quick]),
                                                     "--train-attends", "self", *store], out, log, 300)
    for base in ("fp8", "nf4"):
        parts[f"a2bfr_{base}"] = _script("a2bfr_speed.py", ["--base-dtype", base, "--parts", "train", "--batch", "1",
                                                            *(["8", "--train-attends", "self"] if cuda else quick),
                                                            *store], out, log, 240)
    parts["roboface"] = _script("roboface_speed.py", [*([] if cuda else ["--batch", "2", *quick]), *store], out, log,
                                240)
    log("FaRL")
    parts["farl"] = _farl_rate(device, torch.bfloat16 if cuda else torch.float32, 64 if cuda else 4,
                               10 if cuda else 1)
    parts["eval"] = _script("eval_metrics_speed.py", ["--images", "64", "--size", "512"] if cuda else
                            ["--images", "4", "--size", "128"], out, log, 180)
    summary = _summary(parts)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (tiny models: not the papers' costs)",
              "when": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
              "summary": summary, "notes": _missing_notes(summary, parts, cuda), "restore_s_per_face": {
                  k: summary.get(f"{k}_restore_cache_s_per_face" if k == "a2bfr" else f"{k}_restore_s_per_face")
                  for k in ("a2bfr", "roboface")} if cuda else {}, "parts": parts}
    from attrface_pipeline.storage import atomic_write_bytes

    write_json(out / "bench_gpu.json", result)
    atomic_write_bytes(out / "bench_gpu.md", (all_table(result) + "\n").encode())
    if json_path is not None:
        write_json(json_path, result)
    return result


def _missing_notes(summary: dict, parts: dict, cuda: bool) -> dict[str, str]:
    """Why each figure of the summary that has no value has none."""
    notes = {}
    for key, value in summary.items():
        if value is not None:
            continue
        if key == "flowedit_s_per_pair":
            notes[key] = (parts["flowedit"]["rows"][0].get("note") or "not measured")
        elif key.endswith("peak_gib") and not cuda:
            notes[key] = NO_CUDA_PEAK
        else:
            notes[key] = "not reported by its benchmark (see parts in bench_gpu.json)"
    return notes


def _summary(parts: dict) -> dict:
    s: dict = {}
    fe = parts["flowedit"]["rows"]
    if fe:
        s["flowedit_s_per_pair"] = fe[0]["s_per_pair"]
    for base in ("bf16", "fp8", "nf4"):
        rows = parts[f"a2bfr_{base}"].get("rows", [])
        for batch in (1, 8):
            r = _row(rows, part="train", variant="self", batch=batch)
            if r:
                s[f"a2bfr_{base}_b{batch}_s_per_sample"] = round(r["per_sample"], 4)
                s[f"a2bfr_{base}_b{batch}_peak_gib"] = r["peak_gib"]
    r = _row(parts["a2bfr_bf16"].get("rows", []), part="restore", variant="cache", batch=1)
    if r:
        s["a2bfr_restore_cache_s_per_face"] = round(r["seconds"], 4)
    rows = parts["roboface"].get("rows", [])
    r = next((r for r in rows if r["part"] == "train" and r["dca"] == "on"), None)
    if r:
        s["roboface_train_s_per_sample"], s["roboface_train_peak_gib"] = round(r["per_item"], 5), r["peak_gib"]
    r = next((r for r in rows if r["part"] == "restore" and r["dca"] == "on"), None)
    if r:
        s["roboface_restore_s_per_face"] = round(r["per_item"], 4)
    s["farl_faces_per_s"] = parts["farl"]["faces_per_s"]
    for name, m in (parts["eval"].get("metrics") or {}).items():
        s[f"eval {name} img/s"] = m["img_s"]
    return s


def all_table(result: dict) -> str:
    """The acceptance run as the docs' markdown table: each figure, its goal where one is set, and whether met."""
    s, parts, notes = result["summary"], result["parts"], result.get("notes") or {}
    lines = [f"{result['device']}, {result['when']}, {result['seconds']:.0f} s in all", "",
             "| figure | measured | goal |", "|---|---|---|"]
    gpu = not result["device"].startswith("cpu")
    for key, value in s.items():
        goal, ok = GOALS.get(key, ("", None))
        mark = "" if ok is None or value is None or not gpu else (" ✓" if ok(value) else " ✗")
        shown = f"— ({notes.get(key) or 'not measured'})" if value is None else f"{value}{mark}"
        lines.append(f"| {key} | {shown} | {goal} |")
    for name, part in parts.items():
        if isinstance(part, dict) and part.get("note"):
            lines.append(f"| {name} | {part['note'][:200]} | |")
    return "\n".join(lines)


def update_docs(result: dict, docs: Path) -> bool:
    """Replace the table between the bench-gpu markers of ``docs`` (docs/benchmarks.md); False if no markers."""
    text = docs.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        return False
    head, rest = text.split(DOCS_START, 1)
    docs.write_text(head + DOCS_START + "\n" + all_table(result) + "\n" + DOCS_END + rest.split(DOCS_END, 1)[1])
    return True
