"""The evaluation report end to end on real sample faces: built benchmark sets, baselines, an external output folder,
an untrained model; every cell a number or "n/a" with its reason; outputs are written once and reused."""

import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from attrface_pipeline.config import PROJECT_ROOT, load_config
from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.storage import atomic_write_bytes
from training.degradation import PRESETS
from training.eval import benchmark_sets as bs
from training.eval import report as R

ALIGNED = sorted((PROJECT_ROOT / "data" / "samples" / "aligned_hq").glob("*.png"))
REAL = sorted((PROJECT_ROOT / "data" / "samples" / "lq_real").glob("*.png"))
LEVELS = {name: PRESETS[name] for name in ("train", "ood")}
SIZE = 96


def _small(img):
    return cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """attrface_test-like (targets + prompts), celeba_test_levels-like and real_lq-like sets, 4 faces each."""
    root = tmp_path_factory.mktemp("bench")
    faces = [_small(read_rgb(p)) for p in ALIGNED[:4]]
    attrs = [("Smiling", "add"), ("Eyeglasses", "add"), ("Smiling", "remove"), ("Bangs", "add")]
    pairs = [bs.BenchItem(key=f"face{i}", gt=f, tar=np.clip(f.astype(int) + 30, 0, 255).astype(np.uint8),
                          origin="test", source_prompt="a photo of a face", target_prompt=f"a photo of a face, {a}",
                          attribute=a, direction=d) for i, (f, (a, d)) in enumerate(zip(faces, attrs))]
    out = {}
    for name, items in (("attrface_test", pairs),
                        ("celeba_test_levels", [bs.BenchItem(key=f"hq{i}", gt=f, origin="test")
                                                for i, f in enumerate(faces)])):
        rows = bs.write_degraded_set(items, root / name, name=name, presets=LEVELS, seed=0, resolution=None,
                                     write=atomic_write_bytes)
        _manifest(root / name, rows)
    real = [(f"real{i}", _small(read_rgb(p)), p.name) for i, p in enumerate(REAL[:4])]
    _manifest(root / "real_lq", bs.write_real_set(real, root / "real_lq", name="real_lq", resolution=None,
                                                  write=atomic_write_bytes))
    for name in R.SETS:
        out[name] = R.load_set(root / name, name, max_faces=3)
    return out


def _manifest(folder, rows):
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=bs.SCHEMA), folder / "manifest.parquet")


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from attrface_pipeline.builders import build_eval_scorers

    cfg = load_config(overrides={"paths": {"cache_dir": str(tmp_path_factory.mktemp("cache"))}})
    return build_eval_scorers(cfg)


def _external(root, sets):
    """Another method's outputs, laid out as the README says: the LQ blurred; targets mirrored."""
    for bset in sets.values():
        for r in bset.rows:
            lq = read_rgb(bset.root / r["lq_path"])
            where = root / bset.name / r["level"]
            atomic_write_bytes(where / f"{r['key']}.png", encode_image(cv2.GaussianBlur(lq, (5, 5), 1), "png"))
            if bset.has_targets:
                atomic_write_bytes(where / "tar" / f"{r['key']}.png", encode_image(lq[:, ::-1], "png"))


def test_report_fills_every_cell_or_says_why(sets, scorers, tmp_path):
    _external(tmp_path / "codeformer", sets)
    (tmp_path / "codeformer" / "real_lq" / "real" / "real1.png").unlink()  # one output lost
    methods = R.baseline_methods(["bicubic", "identity"], bicubic_factor=4) + R.external_methods(
        {"codeformer": tmp_path / "codeformer"})
    methods.append(R.Method("a2bfr", "model", "tiny/flux + (untrained)", prompted=True,
                            unavailable="a2bfr_lora is not materialized yet"))
    order = [sets[n] for n in R.SETS]
    logs = []
    report = R.run_report(order, methods, scorers, tmp_path / "eval", metrics=list(R.METRICS), batch_size=2,
                          grid_faces=2, write=atomic_write_bytes, hq_reference=sets["celeba_test_levels"],
                          log=logs.append)
    paths = R.write_report(report, tmp_path / "eval", record={"test": True}, write=atomic_write_bytes)

    res = pq.read_table(paths["results"]).to_pylist()
    by = {(r["set"], r["level"], r["method"], r["table"], r["metric"]): r for r in res}
    # every value is a finite number (with a caveat note when an untrained network computed it), or NaN with a reason
    caveat = "not comparable with published numbers"
    assert all(bool(r["note"]) if not np.isfinite(r["value"]) else (not r["note"] or caveat in r["note"])
               for r in res if not np.isinf(r["value"]))
    assert any(caveat in r["note"] for r in res if r["metric"] == "lpips" and np.isfinite(r["value"]))
    # baselines: identity is the LQ itself, so its PSNR is the set's recorded LQ PSNR
    lq_psnr = np.mean([r["psnr"] for r in sets["celeba_test_levels"].level_rows("ood")])
    assert by[("celeba_test_levels", "ood", "identity", "restoration", "psnr")]["value"] == pytest.approx(lq_psnr,
                                                                                                         abs=1e-4)
    for metric in ("psnr", "ssim", "lpips", "ids", "fid"):
        cell = by[("attrface_test", "train", "bicubic", "restoration", metric)]
        assert np.isfinite(cell["value"]) and cell["n"] == 3, (metric, cell)
    # the real set has no GT: FID against the HQ set and the no-reference metrics only
    assert {m for (s, _, meth, _, m) in by if s == "real_lq" and meth == "identity"} == {"fid", *R.NR_METRICS}
    assert np.isfinite(by[("real_lq", "real", "identity", "restoration", "fid")]["value"])
    assert "1 of 3 outputs missing" in by[("real_lq", "real", "codeformer", "restoration", "fid")]["note"]
    # reasons: no pyiqa here, no judge configured, an untrained model, a baseline that takes no prompt
    assert "attrface[iqa]" in by[("celeba_test_levels", "train", "identity", "restoration", "musiq")]["note"]
    assert "no VLM judge configured" in by[("attrface_test", "ood", "codeformer", "attribute", "aa")]["note"]
    assert "not materialized" in by[("attrface_test", "ood", "a2bfr", "restoration", "lpips")]["note"]
    assert "takes no text prompt" in by[("attrface_test", "ood", "identity", "attribute", "cp_ids")]["note"]
    # the external method's targets: LPIPS to the target GT and CP-IDS between its two restorations
    for metric in ("lpips", "cp_ids"):
        assert np.isfinite(by[("attrface_test", "ood", "codeformer", "attribute", metric)]["value"])

    md = paths["markdown"].read_text()
    # the papers' own rows (configs/published_tables.yaml), as printed: Tab. 2 order IDS, FID, LPIPS, PSNR, SSIM, MUSIQ
    assert "| A²BFR (published) [1] | 0.3495 | 18.69 | 0.2679 | — | — | 76.04 | 0.6595 |" in md
    assert "| RoboFace (published) [1] | — | 56.53 | 0.52 | — | — | — | 0.57 | 0.70 |" in md  # CelebA-Test OOD level
    # RoboFace's rows where our sets stand for its sets: CelebA-Test FID=110.50 / 262.42 (train, ood), WIDER-Test
    assert md.count("RoboFace (published)") == 3 and "[1] RoboFace Tab. 2, CelebA-Test (FID=262.42)" in md
    assert "AA↑ | LPIPS↓ | CP-IDS↑ | SC↑" in md and "n/a [" in md
    html = paths["html"].read_text()
    assert html.count("<table>") == len(report.tables) and "data:image/png;base64," in html
    assert set(report.grids) == {"attrface_test/train", "attrface_test/ood", "celeba_test_levels/train",
                                 "celeba_test_levels/ood", "real_lq/real"}
    grid = report.grids["attrface_test/ood"]
    assert grid.shape[0] == 2 * 96 and report.grid_captions["attrface_test/ood"] == (
        "LQ | bicubic | identity | codeformer | a2bfr | codeformer → target | a2bfr → target | GT | target GT")
    assert json.loads(paths["record"].read_text())["methods"][3]["unavailable"] == "a2bfr_lora is not materialized yet"

    # a second run reads every written output back: nothing restored again, same numbers
    logs.clear()
    again = R.run_report(order, methods[:2], scorers, tmp_path / "eval", metrics=["psnr", "lpips"], batch_size=2,
                         grid_faces=0, write=atomic_write_bytes, log=logs.append)
    assert not [m for m in logs if "restored" in m]
    second = {(r["set"], r["level"], r["method"], r["metric"]): r["value"] for r in again.results}
    assert second[("attrface_test", "ood", "bicubic", "psnr")] == pytest.approx(
        by[("attrface_test", "ood", "bicubic", "restoration", "psnr")]["value"], rel=1e-12)


def test_evaluate_folders_pairs_by_name(sets, scorers, tmp_path):
    bset = sets["celeba_test_levels"]
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for r in bset.level_rows("train"):
        atomic_write_bytes(gt / f"{r['key']}.png", (bset.root / r["gt_path"]).read_bytes())
        atomic_write_bytes(pred / f"{r['key']}.jpg", encode_image(read_rgb(bset.root / r["gt_path"]), "jpg", 100))
    atomic_write_bytes(pred / "stray.png", encode_image(np.zeros((8, 8, 3), np.uint8), "png"))
    cells, unpaired, records = R.evaluate_folders(pred, gt, scorers, metrics=["psnr", "ssim", "lpips", "ids", "musiq"])
    assert {r["status"] for r in records} == {"ok"}
    assert unpaired == ["stray"] and cells["psnr"].n == 3
    assert cells["psnr"].value > 40 and cells["ssim"].value > 0.98 and cells["ids"].value > 0.99
    assert cells["lpips"].value < 0.05 and cells["musiq"].value is None
    with pytest.raises(ValueError, match="no image"):
        R.evaluate_folders(gt, tmp_path, scorers, metrics=["psnr"])  # tmp_path holds folders, no images
    # a folder against itself: PSNR is infinite (not nan); the offline LPIPS network is untrained, and says so
    same, _, _ = R.evaluate_folders(gt, gt, scorers, metrics=["psnr", "lpips"])
    assert same["psnr"].value == float("inf") and same["lpips"].value == pytest.approx(0, abs=1e-6)
    assert "untrained network (tiny/lpips): not comparable with published numbers" in same["lpips"].note
    table = R.Table("t", ["psnr", "lpips"], [("identity", same)]).markdown()
    assert "| ∞ [1] | 0.0000 [2] |" in table and "[1] identical images: PSNR is infinite" in table
    assert "[2] LPIPS from an untrained network" in table


def test_judged_cells_and_aa_per_attribute(sets, tmp_path):
    """SC and AA through the real VLMJudge client; an httpx.MockTransport plays the image-capable server (none can
    be served offline). It says yes to smiling and no to anything else, and scores every prompt 70."""
    import httpx

    from attrface_pipeline.stages.verbalize import RetryPolicy
    from training.eval.judge import VLMJudge

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "vl"}]})
        text = json.loads(request.content)["messages"][0]["content"][1]["text"]
        answer = "70" if "0 to 100" in text else ("yes" if "smiling" in text else "no")
        return httpx.Response(200, json={"choices": [{"message": {"content": answer}}]})

    judge = VLMJudge("http://judge/v1", transport=httpx.MockTransport(server), cache_dir=tmp_path / "cache",
                     retry=RetryPolicy(max_retries=0, sleep=lambda s: None))
    scorers = R.Scorers(lpips="off", fid="off", identity="off", iqa={}, judge=judge)
    _external(tmp_path / "ext", sets)
    methods = R.external_methods({"ext": tmp_path / "ext"})
    report = R.run_report([sets["attrface_test"]], methods, scorers, tmp_path / "eval", metrics=["sc", "aa"],
                          batch_size=2, grid_faces=0, write=atomic_write_bytes, log=lambda m: None)
    by = {(r["level"], r["table"], r["metric"]): r for r in report.results}
    # keys face0..face2: Smiling add (yes -> 1), Eyeglasses add (no -> 0), Smiling remove (yes -> 0)
    assert by[("ood", "attribute", "aa")]["value"] == pytest.approx(1 / 3) and by[("ood", "attribute", "aa")]["n"] == 3
    assert by[("ood", "aa_by_attribute", "Smiling")]["value"] == pytest.approx(0.5)
    assert by[("ood", "aa_by_attribute", "Eyeglasses")]["value"] == 0.0
    assert by[("ood", "attribute", "sc")]["value"] == 70.0 and by[("train", "restoration", "sc")]["value"] == 70.0
    md = "".join(t.markdown() for t in report.tables)
    assert "AA per attribute" in md and "| Eyeglasses | Smiling |" in md.replace("Method | ", "")


def test_evaluate_folders_identical_images_give_standard_json(sets, scorers, tmp_path):
    """Identical images: PSNR stays inf for the console (with the reason), and the JSON the CLI writes is standard
    JSON: the value is null and the note says why (no `Infinity` token)."""
    from attrface_pipeline.storage import atomic_write_json, json_bytes

    bset = sets["celeba_test_levels"]
    gt = tmp_path / "gt"
    for r in bset.level_rows("train"):
        atomic_write_bytes(gt / f"{r['key']}.png", (bset.root / r["gt_path"]).read_bytes())
    cells, _, _ = R.evaluate_folders(gt, gt, scorers, metrics=["psnr", "ssim"])
    assert cells["psnr"].value == float("inf")
    assert cells["psnr"].note == "identical images: PSNR is infinite (3 of 3 pairs identical)"
    assert f"{cells['psnr'].value:.4f}" == "inf" and cells["ssim"].note == ""
    out = R.cells_json(cells)
    assert out["psnr"] == {"value": None, "n": 3, "note": cells["psnr"].note}
    assert out["ssim"]["value"] == pytest.approx(1.0)
    # the project's JSON writer: standard JSON whatever it is given (non-finite numbers become null)
    path = tmp_path / "out" / "metrics.json"
    atomic_write_json(path, {"metrics": {m: {"value": c.value, "note": c.note} for m, c in cells.items()}})
    text = path.read_text()
    assert "Infinity" not in text and json.loads(text)["metrics"]["psnr"]["value"] is None
    assert json.loads(json_bytes({"a": float("nan"), "b": [float("-inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}


def test_evaluate_folders_mixed_sizes_and_hostile_arguments(sets, scorers, tmp_path):
    """Faces of several sizes in one folder are scored (a batch never mixes sizes); a file, a missing folder, an
    unknown or empty metric list and a folder named as the JSON output are refused with one line."""
    faces = [read_rgb(p) for p in ALIGNED[:3]]
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for i, face in enumerate(faces):
        size = 48 + 16 * i
        small = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
        atomic_write_bytes(gt / f"f{i}.png", encode_image(small, "png"))
        atomic_write_bytes(pred / f"f{i}.png", encode_image(cv2.GaussianBlur(small, (5, 5), 0), "png"))
    cells, _, _ = R.evaluate_folders(pred, gt, scorers, metrics=["psnr", "ssim", "lpips"])
    for metric in ("psnr", "ssim", "lpips"):
        assert cells[metric].value is not None and cells[metric].n == 3, (metric, cells[metric].note)
    assert 15 < cells["psnr"].value < 60
    afile = tmp_path / "file.png"
    afile.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        R.evaluate_folders(afile, gt, scorers, metrics=["psnr"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.evaluate_folders(pred, tmp_path / "missing", scorers, metrics=["psnr"])
    for bad in (["psnrx"], [], "psnr", ["sc"]):
        with pytest.raises(ValueError, match="metrics"):
            R.evaluate_folders(pred, gt, scorers, metrics=bad)
    with pytest.raises(ValueError, match="is a folder"):
        R.check_json_path(tmp_path)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        R.check_json_path(afile / "metrics.json")
    assert R.check_json_path(tmp_path / "new" / "metrics.json") == tmp_path / "new" / "metrics.json"


def test_metric_batches_never_mix_image_sizes():
    from training.eval import metrics as M

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (16, 16, 24, 16)]
    noisy = [np.clip(i.astype(int) + 5, 0, 255).astype(np.uint8) for i in imgs]
    together = M.psnr_batch(imgs, noisy, batch_size=8)
    assert np.allclose(together, [M.psnr(a, b) for a, b in zip(imgs, noisy)])
    with pytest.raises(ValueError, match="batch_size"):
        M.psnr_batch(imgs, noisy, batch_size=0)
