import pytest

from attrface_pipeline.config import PROJECT_ROOT, ConfigError, load_config


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
    with pytest.raises(FileNotFoundError, match="does not exist"):
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
