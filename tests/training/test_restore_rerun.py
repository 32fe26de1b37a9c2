"""Re-runs of `attrface restore` decide by content: replaced inputs and new weights at the same path are noticed, the
log survives torn and damaged lines, settings.json is verified, and nothing is written outside the output folder."""

import json
import shutil

import cv2
import pytest

from attrface_pipeline.artifacts import INTEGRITY_KEY, KINDS, ArtifactError, file_sha256, read_jsonl
from attrface_pipeline.builders import align_spec, build_detector
from attrface_pipeline.config import PROJECT_ROOT, PipelineConfig
from attrface_pipeline.images import encode_image, read_rgb
from tests.training.test_restore_faces import MemoDetector
from training.restore_faces import (LOG_FILE, SETTINGS_FILE, RestoreOptions, append_record, list_inputs,
                                    output_path, read_log, read_settings, restore_folder, weights_fingerprint)

FACES = sorted((PROJECT_ROOT / "data/samples/aligned_hq").glob("ffhq_*.png"))


@pytest.fixture(scope="module")
def cfg():
    return PipelineConfig()


@pytest.fixture(scope="module")
def detector(cfg):
    return MemoDetector(build_detector(cfg))


class Counting:
    """An identity restorer that counts the crops it was given."""

    def __init__(self):
        self.crops = 0

    def __call__(self, crops):
        self.crops += len(crops)
        return [c.copy() for c in crops]


def face_png(index: int, size: int = 128) -> bytes:
    return encode_image(cv2.resize(read_rgb(FACES[index]), (size, size), interpolation=cv2.INTER_AREA), "png")


def setup(tmp_path, names=("a.png", "b.png")):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(names):
        (src / name).write_bytes(face_png(i))
    return src, tmp_path / "out"


def run(src, out, detector, cfg, *, settings=None, restorer=None, options=None, **kw):
    messages = kw.pop("messages", [])
    return restore_folder(list_inputs(src, out), out, restorer or Counting(), detector=detector,
                          align_spec=align_spec(cfg), settings=settings or {"model": "identity"},
                          options=options or RestoreOptions(input_kind="aligned"), progress=False,
                          log=messages.append, **kw)


def counts(summary):
    return summary["restored"], summary["skipped"], summary["failed"]


def last_records(out):
    records, problems = read_jsonl(out / LOG_FILE, "restore.log")
    return {r["name"]: r for r in records}, problems


def test_replaced_input_is_redone_by_content(tmp_path, detector, cfg):
    src, out = setup(tmp_path)
    assert counts(run(src, out, detector, cfg)) == (2, 0, 0)
    first, _ = last_records(out)
    assert first["a.png"]["input_sha256"] == file_sha256(src / "a.png")
    assert first["a.png"]["output_sha256"]["restored_faces/a_00.png"] == file_sha256(out / "restored_faces/a_00.png")
    (src / "a.png").write_bytes((src / "a.png").read_bytes())  # rewritten, same bytes: still done
    assert counts(run(src, out, detector, cfg)) == (0, 2, 0)
    before = file_sha256(out / "restored_faces/a_00.png")
    (src / "a.png").write_bytes(face_png(3))  # another face under the same name
    restorer = Counting()
    assert counts(run(src, out, detector, cfg, restorer=restorer)) == (1, 1, 0) and restorer.crops == 1
    records, problems = last_records(out)
    assert not problems and records["a.png"]["input_sha256"] == file_sha256(src / "a.png")
    assert file_sha256(out / "restored_faces/a_00.png") != before
    # an output changed or removed since it was written: that input is redone
    (out / "restored_faces/b_00.png").write_bytes(face_png(4))
    assert counts(run(src, out, detector, cfg)) == (1, 1, 0)
    (out / "cmp/a_00.png").unlink()
    assert counts(run(src, out, detector, cfg)) == (1, 1, 0)
    # records made with other settings (settings.json removed by hand, then another suffix) are not trusted
    (out / SETTINGS_FILE).unlink()
    assert counts(run(src, out, detector, cfg, options=RestoreOptions(input_kind="aligned", suffix="v2"))) == (2, 0, 0)


def test_same_face_under_two_suffixes_is_not_overwritten(tmp_path, detector, cfg):
    src, out = setup(tmp_path, ("a.png", "a.jpg"))
    summary = run(src, out, detector, cfg)
    assert counts(summary) == (1, 0, 1)
    assert dict(summary["failures"])["a.png"].startswith("ValueError: its outputs would take the names of those "
                                                         "of a.jpg")


def test_new_weights_at_the_same_path_are_refused(tmp_path, detector, cfg):
    src, out = setup(tmp_path)
    weights = tmp_path / "weights" / "lora.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"A" * 1000)
    settings = {"model": "identity", "weights": str(weights)}
    assert counts(run(src, out, detector, cfg, settings=settings)) == (2, 0, 0)
    assert read_settings(out / SETTINGS_FILE)["weights_sha256"] == weights_fingerprint(weights)
    assert counts(run(src, out, detector, cfg, settings=settings)) == (0, 2, 0)
    weights.write_bytes(b"B" * 1000)  # same path, same size, other content
    with pytest.raises(ValueError, match=r"other settings \(changed: weights_sha256; the weights at .*lora"
                                         r"\.safetensors changed.*--overwrite"):
        run(src, out, detector, cfg, settings=settings)
    assert counts(run(src, out, detector, cfg, settings=settings, overwrite=True)) == (2, 0, 0)
    assert read_settings(out / SETTINGS_FILE)["weights_sha256"] == weights_fingerprint(weights)
    assert counts(run(src, out, detector, cfg, settings=settings)) == (0, 2, 0)
    # a weights folder: any file's content counts, hidden files and the folder's own place do not
    folder = tmp_path / "run" / "final"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 64)
    (folder / "sub" / "config.json").write_text("{}")
    before = weights_fingerprint(folder)
    (folder / ".lock").write_text("")
    assert weights_fingerprint(folder) == before
    assert weights_fingerprint(shutil.copytree(folder, tmp_path / "moved")) == before
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    assert weights_fingerprint(folder) != before
    # a hub id (not a local path): no fingerprint, the name alone is compared
    hub = run(src, tmp_path / "out_hub", detector, cfg, settings={"model": "identity", "weights": "org/repo"})
    assert counts(hub) == (2, 0, 0) and "weights_sha256" not in read_settings(tmp_path / "out_hub" / SETTINGS_FILE)


def record(name):
    return {"name": name, "status": "ok", "outputs": [f"restored_imgs/{name}"], "seconds": 0.25}


def test_torn_log_line_then_a_new_record_both_parse(tmp_path):
    log = tmp_path / LOG_FILE
    append_record(log, record("a.png"))
    line = log.read_bytes()
    with open(log, "ab") as f:
        f.write(line[: len(line) // 2])  # a writer killed mid-line
    assert read_log(log) == [record("a.png")]  # the torn tail is dropped, silently
    append_record(log, record("b.png"))
    records, problems = read_jsonl(log, "restore.log")
    assert records == [record("a.png"), record("b.png")] and problems == ["line 2: not valid JSON"]
    with pytest.raises(ArtifactError, match="damaged line"):  # the strict read names it
        read_log(log)


def test_rerun_after_a_torn_or_damaged_log_line(tmp_path, detector, cfg):
    src, out = setup(tmp_path)
    assert counts(run(src, out, detector, cfg)) == (2, 0, 0)
    log = out / LOG_FILE
    lines = log.read_bytes().splitlines(keepends=True)
    a_line = next(x for x in lines if b'"a.png"' in x)
    with open(log, "ab") as f:
        f.write(a_line[:40])  # a redo of a.png killed while its record was written
    messages = []
    assert counts(run(src, out, detector, cfg, messages=messages)) == (0, 2, 0)  # a torn tail: dropped
    assert not messages
    # that torn line is now followed by a record: reported, a.png redone (its damaged record is the last)
    log.write_bytes(b"".join(lines) + a_line[:40] + b"\n")
    messages = []
    assert counts(run(src, out, detector, cfg, messages=messages)) == (1, 1, 0)
    assert messages == [f"restore: {log} line 3: not valid JSON; 'a.png' is redone"]
    messages = []
    assert counts(run(src, out, detector, cfg, messages=messages)) == (0, 2, 0)
    assert messages == [f"restore: {log} line 3: not valid JSON; a later record of 'a.png' stands"]
    # a flipped byte in b.png's record: its checksum fails, b.png is redone
    data = log.read_bytes()
    at = data.index(b'"b.png"')
    log.write_bytes(data[:at] + data[at:].replace(b'"status": "ok"', b'"status": "ok "', 1))
    messages = []
    assert counts(run(src, out, detector, cfg, messages=messages)) == (1, 1, 0)
    assert any("fails its checksum; 'b.png' is redone" in m for m in messages)
    records, _ = last_records(out)
    assert records["b.png"]["status"] == "ok"


@pytest.mark.parametrize("bad", ["/../../x", "a/b", "..", "x..y", "a\\b", "", "  ", "x\0y", "a\nb"])
def test_suffix_with_a_path_is_refused(bad):
    with pytest.raises(ValueError, match=r"^--suffix .* is not allowed: .*path separator") as err:
        RestoreOptions(suffix=bad)
    assert "\n" not in str(err.value)


def test_nothing_is_written_outside_the_output_folder(tmp_path, detector, cfg):
    for good in ("v1", "x.y", "-restored"):
        RestoreOptions(suffix=good)
    src, out = setup(tmp_path)
    options = RestoreOptions(input_kind="aligned")
    options.suffix = "/../../x"  # changed after the checks: refused again by restore_folder
    with pytest.raises(ValueError, match="--suffix"):
        run(src, out, detector, cfg, options=options)
    with pytest.raises(ValueError, match="outside the output folder"):
        output_path(out, "../x.png")
    with pytest.raises(ValueError, match="outside the output folder"):
        output_path(out, "/etc/x.png")
    # an input name that climbs out (a caller's list), a link planted in the folder: failed records, nothing written
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "cropped_faces").mkdir(parents=True)
    (out / "cropped_faces" / "sub").symlink_to(elsewhere)
    (src / "sub").mkdir()
    (src / "sub" / "c.png").write_bytes(face_png(2))
    inputs = [(src / "a.png", "../../escaped.png"), (src / "sub" / "c.png", "sub/c.png"), (src / "b.png", "b.png")]
    summary = restore_folder(inputs, out, Counting(), detector=detector, align_spec=align_spec(cfg),
                             settings={"model": "identity"}, options=RestoreOptions(input_kind="aligned"),
                             progress=False, log=lambda m: None)
    assert counts(summary) == (1, 0, 2)
    assert all("outside the output folder" in why for _, why in summary["failures"])
    assert not list(elsewhere.iterdir()) and not list(tmp_path.glob("*escaped*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "in", "out"]


def test_damaged_settings_are_named(tmp_path, detector, cfg):
    src, out = setup(tmp_path)
    assert counts(run(src, out, detector, cfg)) == (2, 0, 0)
    path = out / SETTINGS_FILE
    good = json.loads(path.read_text())
    old_schema = {**good, INTEGRITY_KEY: {**good[INTEGRITY_KEY], "schema": 0}}
    changed = {**good, "fingerprint": "0" * 16}
    cases = {"garbage": (b"\x00\xffnot json", "not valid JSON"),
             "truncated": (path.read_bytes()[:50], "not valid JSON"),
             "changed": (json.dumps(changed).encode(), "fails its checksum"),
             "older schema": (json.dumps(old_schema).encode(), "schema 0"),
             "older AttrFace": (json.dumps({"settings": good["settings"]}).encode(), "no integrity record")}
    for case, (data, why) in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError) as err:
            run(src, out, detector, cfg)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and why in message and "--overwrite" in message, (case, message)
        assert "-o" in message and "\n" not in message
        assert counts(run(src, out, detector, cfg, overwrite=True)) == (2, 0, 0), case
    path.unlink()
    path.mkdir()
    with pytest.raises(ArtifactError, match=f"^{path}: a folder where the restore settings file belongs; remove it"):
        run(src, out, detector, cfg, overwrite=True)


def test_registered_kinds_write_and_read_back(tmp_path):
    settings, log = KINDS["restore.settings"], KINDS["restore.log"]
    assert log.torn_tail_ok and not settings.torn_tail_ok
    [s] = settings.example(tmp_path / "s")
    assert settings.read(s)["options"]["suffix"] == "v1"
    data = s.read_bytes()
    s.write_bytes(data.replace(b'"v1"', b'"v2"'))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        settings.read(s)
    [lg] = log.example(tmp_path / "l")
    assert [r["name"] for r in log.read(lg)] == ["a.png", "sub/b.jpg"]
    data = lg.read_bytes()
    lg.write_bytes(data[:-10])  # torn tail: tolerated
    assert [r["name"] for r in log.read(lg)] == ["a.png"]
    lg.write_bytes(data.replace(b'"a.png"', b'"A.png"', 1))  # a damaged line: refused
    with pytest.raises(ArtifactError, match=f"^{lg}: the restore log has 1 damaged line"):
        log.read(lg)
