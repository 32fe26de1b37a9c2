"""Hostile files of every kind fed to the restore CLI, the training loaders and the evaluator: nothing raises past
the per-file record. The files are generated from real faces by a list of corruptions (cut, scrambled, emptied,
degenerate sizes, other formats, other kinds of file), so a new kind is one line."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from attrface_pipeline.cli import app
from attrface_pipeline.config import PROJECT_ROOT
from training.data import LoaderConfig, make_loader

FACE = PROJECT_ROOT / "data" / "samples" / "lq_real" / "0240.png"  # a real, aligned LQ face


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def hostile_images(good: bytes) -> dict[str, bytes | None]:
    """{file name: bytes} of broken or odd images made from ``good`` (None: a special file, made by the caller)."""
    rgb = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"))
    rng = np.random.default_rng(0)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG", quality=90)
    jpeg = jpeg.getvalue()
    cases = {f"cut_png_{int(f * 100)}.png": good[: int(len(good) * f)] for f in (0.01, 0.3, 0.9)}
    cases |= {f"cut_jpg_{int(f * 100)}.jpg": jpeg[: int(len(jpeg) * f)] for f in (0.02, 0.5)}
    cases |= {
        "empty.png": b"",
        "scrambled.png": good[:64] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "noise_named.jpg": rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "text_named.png": b"this is not an image\n" * 10,
        "one_pixel.png": _png(rgb[:1, :1]),
        "strip_2000x16.png": _png(np.ascontiguousarray(np.resize(rgb, (16, 2000, 3)))),
        "strip_16x2000.png": _png(np.ascontiguousarray(np.resize(rgb, (2000, 16, 3)))),
        "grey_16bit.png": _png16(rgb),
        "rgba.png": _rgba(rgb),
        "a_folder.png": None,
        "dangling_link.jpg": None,
    }
    return cases


def _png16(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf, "PNG")
    return buf.getvalue()


def _rgba(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(buf, "PNG")
    return buf.getvalue()


def write_hostile(folder: Path, good: bytes) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, data in hostile_images(good).items():
        path = folder / name
        if name == "a_folder.png":
            path.mkdir()
        elif name == "dangling_link.jpg":
            os.symlink(folder / "nowhere.jpg", path)
        else:
            path.write_bytes(data)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def release_lora(tmp_path_factory, training_zoo):
    """A random LoRA in the release layout for the tiny Flux (rank 4)."""
    from diffusers import FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from training.a2bfr.model import add_condition_lora

    transformer = FluxTransformer2DModel.from_pretrained(training_zoo / "flux", subfolder="transformer")
    add_condition_lora(transformer, rank=4)
    path = tmp_path_factory.mktemp("lora") / "default.safetensors"
    save_file({f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(transformer).items()},
              str(path))
    return path


def _restore(args):
    out = CliRunner().invoke(app, ["restore", *args])
    assert not isinstance(out.exception, Exception) or isinstance(out.exception, SystemExit), out.output
    return out


def test_restore_cli_records_every_hostile_input(tmp_path, training_zoo, release_lora):
    inputs = tmp_path / "inputs"
    names = write_hostile(inputs, FACE.read_bytes())
    shutil.copy(FACE, inputs / "good.png")
    common = ["--weights", str(release_lora), "--base", str(training_zoo / "flux"), "--steps", "1",
              "--width", "64", "--height", "64"]
    out = _restore(["-i", str(inputs), "-o", str(tmp_path / "out"), *common])
    assert out.exit_code == 3, out.output  # some inputs failed, the run itself did not
    records = {r["name"]: r for r in map(json.loads, (tmp_path / "out" / "restore_log.jsonl").read_text().splitlines())}
    listed = set(records)
    assert "good.png" in listed and records["good.png"]["status"] == "ok" and records["good.png"]["faces"] == 1
    assert listed == {*names, "good.png"}  # special files too: each has its record
    for record in records.values():
        assert record["status"] in ("ok", "failed") and (record["status"] == "ok" or record["reason"]), record
    for odd in ("grey_16bit.png", "rgba.png"):  # other pixel formats are images too
        assert records[odd]["status"] == "ok", records[odd]
    assert (tmp_path / "out" / "restored_faces" / "good_00.png").is_file()


def test_restore_cli_says_what_is_wrong_with_hostile_weights_and_outputs(tmp_path, training_zoo, release_lora):
    base = ["--base", str(training_zoo / "flux"), "--steps", "1", "-i", str(FACE)]
    data = release_lora.read_bytes()
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "cut.safetensors").write_bytes(data[: len(data) // 3])
    (weights / "noise.safetensors").write_bytes(os.urandom(512))
    (weights / "empty.safetensors").write_bytes(b"")
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(3072, 4)}, str(weights / "flux_dev.safetensors"))
    save_file({"mapper.proj.weight": torch.zeros(4, 4)}, str(weights / "other_model.safetensors"))
    roboface = weights / "roboface_run"
    roboface.mkdir()
    (roboface / "roboface.json").write_text("{}")
    expected = {"cut.safetensors": "not a readable safetensors file", "noise.safetensors": "not a readable",
                "empty.safetensors": "not a readable", "flux_dev.safetensors": "another base model",
                "other_model.safetensors": "not a Flux LoRA", "roboface_run": "--model roboface"}
    for name, message in expected.items():
        out = _restore([*base, "-o", str(tmp_path / f"out_{name}"), "--weights", str(weights / name)])
        assert out.exit_code == 1 and message in out.output and str(weights / name) in out.output, out.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = _restore([*base, "-o", str(blocker / "results"), "--weights", str(release_lora)])  # refused when parsed
    assert out.exit_code == 2 and "'-o' / '--output'" in out.output and f"{blocker} is a file" in out.output, \
        out.output
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = _restore([*base, "-o", str(locked / "results"), "--weights", str(release_lora)])
        assert out.exit_code == 2 and "not writable" in out.output, out.output


def test_loaders_skip_every_hostile_sample(tmp_path, shard_dir):
    import webdataset as wds

    train = tmp_path / "shards" / "train"
    shutil.copytree(shard_dir / "train", train)
    shards = sorted(train.glob("*.tar"))
    samples = list(wds.WebDataset(str(shards[0]), shardshuffle=False))
    hostile = hostile_images(FACE.read_bytes())
    with wds.TarWriter(str(shards[0]), encoder=False) as writer:  # every image kind as the src member
        for i, data in enumerate(d for d in hostile.values() if d is not None):
            base = {k: v for k, v in samples[i % len(samples)].items() if not k.startswith("__")}
            writer.write({**base, "__key__": f"hostile_{i:02d}", "src.jpg": data})
        writer.write({**{k: v for k, v in samples[0].items() if not k.startswith("__")}, "__key__": "bad_json",
                      "json": b"{"})
    shards[1].write_bytes(shards[1].read_bytes()[:700])  # cut inside a member
    shards[2].write_bytes(b"")  # empty
    for mode in ("single", "dual"):
        cfg = LoaderConfig(shards=str(train), mode=mode, resolution=32, batch_size=4, num_workers=0,
                           shuffle_buffer=0)
        batches = list(make_loader(cfg))  # nothing raises
        records = [r for b in batches for r in b["bad_samples"]]
        assert {shards[1].name, shards[2].name} <= {r["shard"] for r in records}
        keys = [k for b in batches for k in b.get("key", [])]
        assert keys and all(r["reason"] for r in records)
    assert any(r["key"] == "bad_json" for r in records)  # dual mode reads the json


def test_evaluate_scores_what_it_can_and_records_the_rest(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    names = write_hostile(pred, FACE.read_bytes())
    gt.mkdir()
    for name in [*names, "good.png"]:
        shutil.copy(FACE, gt / (Path(name).stem + ".png"))
    shutil.copy(FACE, pred / "good.png")
    out = CliRunner().invoke(app, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--metric", "psnr",
                                   "--metric", "ssim", "--json", str(tmp_path / "report" / "metrics.json")])
    assert out.exit_code == 3, out.output
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    # the one readable pair is identical: PSNR is infinite, written as null with the reason (standard JSON)
    assert report["metrics"]["psnr"]["value"] is None and "identical" in report["metrics"]["psnr"]["note"]
    assert report["metrics"]["ssim"]["value"] is not None and report["failed"]
    assert all(f["reason"] and f["status"] == "failed" for f in report["failed"])


def test_every_command_answers_as_a_module():
    """``python -m attrface_pipeline.cli`` registers every command before it runs (restore, evaluate included)."""
    import subprocess
    import sys

    for command in ("restore", "evaluate", "bench-gpu"):
        done = subprocess.run([sys.executable, "-m", "attrface_pipeline.cli", command, "--help"], capture_output=True,
                              text=True, timeout=120, cwd=PROJECT_ROOT)
        assert done.returncode == 0 and "usage" in (done.stdout + done.stderr).lower(), (command, done.stderr[-2000:])
