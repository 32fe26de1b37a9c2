import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from attrface_pipeline import config as config_module
from attrface_pipeline.config import (PROJECT_ROOT, A2BFRConfig, ConfigError, RoboFaceSection, check_home,
                                      load_config, validation_lines)


def test_offline_is_the_default_and_uses_the_tiny_zoo(monkeypatch):
    monkeypatch.delenv("ATTRFACE_CONFIG", raising=False)
    monkeypatch.delenv("ATTRFACE_PROFILE", raising=False)
    cfg = load_config()
    assert cfg.profile == "offline" and cfg.detect.backend == "dlib"
    assert all(getattr(cfg.models, m).startswith("tiny/") for m in ("sd3", "flux", "qwen3", "farl"))
    assert cfg.models.allow_download is False


def test_full_profile_switches_models_and_detector():
    cfg = load_config("full")
    assert cfg.detect.backend == "insightface" and cfg.detect.min_score == 0.97
    assert cfg.models.sd3.startswith("stabilityai/") and cfg.models.qwen3 == "Qwen/Qwen3-8B"


def test_dagster_run_config_yaml_and_overrides_layer_in_order(tmp_path):
    cfg = load_config(files=[PROJECT_ROOT / "configs" / "full.yaml"], overrides={"detect": {"min_score": 0.9}})
    assert cfg.profile == "full" and cfg.source.chunk_size == 1000 and cfg.detect.min_score == 0.9
    plain = tmp_path / "plain.yaml"
    plain.write_text("align: {size: 256, image_format: jpg}\n")
    cfg = load_config(files=[plain])
    assert cfg.profile == "offline" and cfg.align.size == 256 and cfg.align.image_format == "jpg"


def test_env_config_is_read(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("source: {chunk_size: 3}\n")
    monkeypatch.setenv("ATTRFACE_CONFIG", str(f))
    assert load_config().source.chunk_size == 3


def test_invalid_settings_are_rejected_at_the_edge(tmp_path):
    with pytest.raises(ConfigError):
        load_config(overrides={"detect": {"backend": "mtcnn"}})
    with pytest.raises(ConfigError):
        load_config(overrides={"detect": {"min_scor": 0.5}})  # typo: unknown keys are errors, not ignored
    with pytest.raises(ValueError, match="unknown profile"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(files=[tmp_path / "nope.yaml"])


def test_fingerprint_tracks_only_the_named_sections():
    a, b = load_config(), load_config(overrides={"align": {"size": 256}})
    assert a.fingerprint("detect") == b.fingerprint("detect")
    assert a.fingerprint("align") != b.fingerprint("align")


def test_each_problem_is_one_line_naming_file_and_key(tmp_path):
    base, run = tmp_path / "base.yaml", tmp_path / "run.yaml"
    base.write_text("align: {sise: 3}\nqc: {gate: [identity]}\n")
    run.write_text("resources: {attrface: {config: {profile: offline, settings: {qc: {gate: [identiy]}, "
                   "edit: {steps: 4, n_max: 9}}}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(files=[base, run], overrides={"source": {"chunk_sise": 2}})
    assert sorted(err.value.problems) == sorted([
        f"{base}: align.sise: unknown key; did you mean 'size'?",
        f"{run}: qc.gate.0: Input should be 'attribute', 'identity' or 'similarity' (got 'identiy')",
        f"{run}: edit: edit.n_max 9 exceeds edit.steps 4",
        "run config (resources.attrface.config.settings): source.chunk_sise: unknown key; did you mean 'chunk_size'?",
    ])


@pytest.mark.parametrize("text, key", [
    ("resources: {attrface: {config: {settngs: {edit: {steps: 3}}}}}", "resources.attrface.config.settngs"),
    ("resources: {attrface: {confg: {settings: {}}}}", "resources.attrface.confg"),
    ("resources: {atrface: {config: {}}}", "resources.atrface"),
    ("resources: {attrface: {config: {}}}\nexecutoin: {}", "executoin"),
])
def test_misspelt_run_config_wrapper_keys_are_errors(tmp_path, text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"{path}: {key}: unknown key"):
        load_config(files=[path])


def test_run_config_wrapper_reads_config_files_and_dagster_keys(tmp_path):
    inner = tmp_path / "inner.yaml"
    inner.write_text("align: {size: 256}\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"execution: {{config: {{max_concurrent: 2}}}}\nresources: {{attrface: {{config: "
                    f"{{config_files: ['{inner}'], settings: {{detect: {{min_score: 0.7}}}}}}}}}}\n")
    cfg = load_config(files=[path])
    assert cfg.align.size == 256 and cfg.detect.min_score == 0.7


def test_full_profile_lists_every_missing_model_with_its_key(tmp_path, monkeypatch):
    from attrface_pipeline.models.store import ModelsMissingError, check_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("full", overrides={"paths": {"cache_dir": str(tmp_path)}})
    with pytest.raises(ModelsMissingError) as err:
        check_models(cfg, ["raw_images", "faces", "face_attributes", "edit_prompts", "edits", "qc"])
    lines = str(err.value).splitlines()
    assert lines[0] == "3 model(s) missing for this run (profile full):"
    assert [ln.split(" = ")[0].strip() for ln in lines[1:]] == ["- models.insightface_pack", "- models.farl",
                                                              "- models.sd3"]
    assert "FacePerceiver/facer" in lines[2] and "hf download stabilityai/stable-diffusion-3.5-large" in lines[3]
    check_models(cfg, ["raw_images"])  # ingest alone needs no model
    check_models(load_config(), ["faces", "face_attributes", "edits", "qc"])  # tiny models are always available


def _problems(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(*args, **kwargs)
    return err.value.problems


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "{p}: does not exist (a config file, from -c or ATTRFACE_CONFIG)"),
    (lambda p: p.mkdir(), "{p}: is a folder, not a YAML file (a config file, from -c or ATTRFACE_CONFIG)"),
    (lambda p: p.write_bytes(b"align:\n  size: \xff\xfe\n"), "{p}: not UTF-8 text (byte 0xff on line 2); save the "
                                                              "file as UTF-8"),
    (lambda p: p.write_text("- align\n- qc\n"), "{p}: must hold a mapping of settings (section: {{key: value}}) or "
                                                 "Dagster run config, got a list"),
    (lambda p: p.write_text("align: {size: 256}\nqc: {}\nalign: {size: 128}\n"),
     "{p}: not valid YAML: line 3, column 1: duplicate key 'align' (first given on line 1); each key may appear once"),
    (lambda p: p.write_text("align: {size: 256\n"), "{p}: not valid YAML: line 2, column 1: expected ',' or '}}', but "
                                                     "got '<stream end>' (while parsing a flow mapping)"),
])
def test_an_unreadable_config_file_is_one_line_naming_it(tmp_path, make, expected):
    path = tmp_path / "cfg.yaml"
    make(path)
    assert _problems(files=[path]) == [expected.format(p=path)]


def test_every_unreadable_file_is_reported_at_once_and_config_files_name_their_origin(tmp_path):
    listed, run = tmp_path / "list.yaml", tmp_path / "run.yaml"
    listed.write_text("[1, 2]\n")
    run.write_text(f"resources: {{attrface: {{config: {{config_files: {tmp_path / 'gone.yaml'}}}}}}}\n")
    assert _problems(files=[listed, tmp_path, run]) == [
        f"{listed}: must hold a mapping of settings (section: {{key: value}}) or Dagster run config, got a list",
        f"{tmp_path}: is a folder, not a YAML file (a config file, from -c or ATTRFACE_CONFIG)",
        f"{tmp_path / 'gone.yaml'}: does not exist (a config file, from {run}: resources.attrface.config.config_files)",
    ]
    run.write_text("resources: {attrface: {config: {config_files: {a: 1}}}}\n")
    assert _problems(files=[run]) == [
        f"{run}: resources.attrface.config.config_files: must be a list of YAML paths, got {{'a': 1}}"]


def test_values_outside_a_settings_domain_are_one_line_each(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("a2bfr: {batch_size: 0, lr: .inf, lora_alpha: 0, resolution: 72, max_sequence_length: 600}\n"
                    "roboface: {stage1_lr: .nan, resolution: 60}\nedit: {steps: 0, src_guidance: -1}\n")
    assert sorted(_problems(files=[path])) == sorted(f"{path}: {line}" for line in [
        "a2bfr.batch_size: Input should be greater than or equal to 1 (got 0)",
        "a2bfr.lr: Input should be a finite number (got inf)",
        "a2bfr.lora_alpha: Input should be greater than 0 (got 0)",
        "a2bfr.resolution: Input should be a multiple of 16 (got 72)",
        "a2bfr.max_sequence_length: Input should be less than or equal to 512 (got 600)",
        "roboface.stage1_lr: Input should be a finite number (got nan)",
        "roboface.resolution: Input should be a multiple of 8 (got 60)",
        "edit.steps: Input should be greater than or equal to 1 (got 0)",
        "edit.src_guidance: Input should be greater than or equal to 0 (got -1)",
    ])


@pytest.mark.parametrize("section", [A2BFRConfig, RoboFaceSection])
def test_training_sections_declare_a_domain_for_every_number(section):
    """The CLI derives its options' domains from these fields: every int/float setting has a bound."""
    for name, field in section.model_fields.items():
        if field.annotation in (int, float, int | None, float | None):
            bounds = [m for m in field.metadata if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")]
            assert bounds, f"{section.__name__}.{name} has no bound"


def test_validation_lines_name_the_key_the_value_and_the_rule():
    with pytest.raises(ValidationError) as err:
        A2BFRConfig.model_validate({"batch_size": 0, "mode": "triple", "lr_x": 1, "max_steps": float("nan")})
    assert sorted(validation_lines(err.value, "a2bfr.", model=A2BFRConfig)) == sorted([
        "a2bfr.batch_size = 0: Input should be greater than or equal to 1",
        "a2bfr.mode = 'triple': Input should be 'single' or 'dual'",
        "a2bfr.lr_x: unknown key; did you mean 'lr'?",
        "a2bfr.max_steps = nan: Input should be a finite number",
    ])
    lines = validation_lines(err.value, where="attrface train-a2bfr", labels={"batch_size": "--batch-size"})
    assert "attrface train-a2bfr: --batch-size = 0: Input should be greater than or equal to 1" in lines
    assert all("\n" not in line for line in lines)


def test_attrface_home_must_be_a_writable_folder(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    need = "AttrFace writes data/ and dagster_home/ there; set it to a folder you can write to"
    monkeypatch.setenv("ATTRFACE_HOME", str(afile))
    assert _problems() == [f"ATTRFACE_HOME={afile}: is a file, not a folder; {need}"]
    with pytest.raises(ConfigError, match=f"does not exist and cannot be made \\({afile} is a file\\)"):
        check_home(afile / "sub")
    assert check_home(tmp_path / "new" / "home") == tmp_path / "new" / "home"  # made when first written
    monkeypatch.setenv("ATTRFACE_HOME", str(tmp_path))
    assert check_home() == tmp_path and load_config().profile == "offline"
    real_access = os.access
    monkeypatch.setattr(config_module.os, "access", lambda p, mode: False if Path(p) == tmp_path else
                        real_access(p, mode))  # a read-only folder (the tests may run as root, who may write anyway)
    assert _problems() == [f"ATTRFACE_HOME={tmp_path}: the folder is read-only for this user; {need}"]
    with pytest.raises(ConfigError, match=r"does not exist and cannot be made \(.* is read-only\)"):
        check_home(tmp_path / "sub")
    monkeypatch.delenv("ATTRFACE_HOME")
    assert check_home() == config_module.HOME  # unset: the checkout or the current folder, not checked
