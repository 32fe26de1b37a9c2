import pytest

from attrface_pipeline.models.store import ModelNotAvailableError, ModelStore
from attrface_pipeline.models.tiny import DONE_MARKER


def test_offline_hub_id_fails_with_actionable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = ModelStore(tmp_path, allow_download=False)
    with pytest.raises(ModelNotAvailableError) as err:
        store.resolve("stabilityai/stable-diffusion-3.5-large@main")
    msg = str(err.value)
    assert "stabilityai/stable-diffusion-3.5-large" in msg and "revision main" in msg
    assert str(tmp_path / "hub") in msg and "hf download" in msg and "licence" in msg


def test_missing_insightface_pack_explains_where_to_put_it(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"buffalo_l.*unzip"):
        ModelStore(tmp_path).resolve("buffalo_l")


def test_local_paths_resolve_or_fail_clearly(tmp_path):
    (tmp_path / "m").mkdir()
    assert ModelStore(tmp_path).resolve(str(tmp_path / "m")) == tmp_path / "m"
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        ModelStore(tmp_path).resolve(str(tmp_path / "absent"))


def test_tiny_spec_is_generated_once_into_the_cache(tmp_path):
    store = ModelStore(tmp_path)
    path = store.resolve("tiny/farl")
    assert path == tmp_path / "tiny" / "farl" and (path / DONE_MARKER).exists()
    mtime = (path / DONE_MARKER).stat().st_mtime_ns
    assert store.resolve("tiny/farl") == path and (path / DONE_MARKER).stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(ModelNotAvailableError, match="unknown tiny model"):
        store.resolve("tiny/nope")
