import pytest
from pydantic import ValidationError

from attrface_pipeline.config import PROJECT_ROOT, load_config


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
    with pytest.raises(ValidationError):
        load_config(overrides={"detect": {"backend": "mtcnn"}})
    with pytest.raises(ValidationError):
        load_config(overrides={"detect": {"min_scor": 0.5}})  # typo: unknown keys are errors, not ignored
    with pytest.raises(ValueError, match="unknown profile"):
        load_config("huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(files=[tmp_path / "nope.yaml"])


def test_fingerprint_tracks_only_the_named_sections():
    a, b = load_config(), load_config(overrides={"align": {"size": 256}})
    assert a.fingerprint("detect") == b.fingerprint("detect")
    assert a.fingerprint("align") != b.fingerprint("align")
