"""A data root at an fsspec URL: whole files, ``_stats.json`` committed last, exclusive chunk registration, clear
storage errors; tested on the in-memory and local fsspec filesystems, and a chunk built on one "machine" (working
copy) and published from another."""

import errno
import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from attrface_pipeline.config import PROJECT_ROOT, load_config
from attrface_pipeline.remote import RemoteRoot
from attrface_pipeline.stages.chunks import ChunkConflict, ChunkRegistry
from attrface_pipeline.storage import StorageError, atomic_write_bytes, atomic_write_json


class _FlakyMemory(MemoryFileSystem):
    """The in-memory filesystem, failing the n-th upload with ``errno`` (a full bucket, a network cut)."""

    protocol = "flakymem"
    fail_at: int | None = None
    code = errno.ENOSPC
    uploads = 0

    def pipe_file(self, path, value, **kwargs):
        type(self).uploads += 1
        if self.fail_at is not None and type(self).uploads >= self.fail_at:
            raise OSError(self.code, "simulated failure")
        return super().pipe_file(path, value, **kwargs)


fsspec.register_implementation("flakymem", _FlakyMemory, clobber=True)


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://attrface-test-{uuid.uuid4().hex[:8]}/root"
    return (tmp_path / "remote").as_uri()


def _partition(root: Path, rel: str, files: dict[str, bytes], stats: dict) -> None:
    for name, data in files.items():
        atomic_write_bytes(root / rel / name, data)
    atomic_write_json(root / rel / "_stats.json", stats)


def _remote_files(remote: RemoteRoot, rel: str) -> dict[str, bytes]:
    return {f: remote.fs.cat_file(remote._remote(f)) for f in remote._files(rel)}


def test_push_then_pull_on_another_working_copy_gives_the_same_files(url, tmp_path):
    a, b = RemoteRoot(url, tmp_path / "a"), RemoteRoot(url, tmp_path / "b")
    _partition(a.local, "faces/chunk-00000", {"manifest.parquet": b"m1", "aligned/x.png": b"png"}, {"n": 1})
    assert a.push("faces/chunk-00000") == 3
    assert a.is_committed("faces/chunk-00000") and not b.is_committed("faces/chunk-00000")
    assert b.pull_partition("chunk-00000") == ["faces"]
    assert (b.local / "faces/chunk-00000/aligned/x.png").read_bytes() == b"png"
    assert json.loads((b.local / "faces/chunk-00000/_stats.json").read_text()) == {"n": 1}
    assert b.pull_partition("chunk-00000") == []  # same marker: nothing to copy
    # a newer version on A replaces B's copy whole, old files included
    (a.local / "faces/chunk-00000/aligned/x.png").unlink()
    _partition(a.local, "faces/chunk-00000", {"manifest.parquet": b"m2", "aligned/y.png": b"y"}, {"n": 2})
    a.push("faces/chunk-00000")
    assert sorted(_remote_files(a, "faces/chunk-00000")) == [
        "faces/chunk-00000/_stats.json", "faces/chunk-00000/aligned/y.png", "faces/chunk-00000/manifest.parquet"]
    assert b.pull("faces/chunk-00000")
    assert sorted(p.name for p in (b.local / "faces/chunk-00000").rglob("*") if p.is_file()) == [
        "_stats.json", "manifest.parquet", "y.png"]


def test_an_interrupted_push_reads_as_incomplete_and_the_next_push_completes(tmp_path):
    url = f"flakymem://attrface-test-{uuid.uuid4().hex[:8]}/root"
    remote = RemoteRoot(url, tmp_path / "a")
    _partition(remote.local, "edits/chunk-00000", {f"images/{i}.png": bytes([i]) * 10 for i in range(4)}, {"v": 1})
    remote.push("edits/chunk-00000")
    _partition(remote.local, "edits/chunk-00000", {"images/0.png": b"new"}, {"v": 2})
    _FlakyMemory.uploads, _FlakyMemory.fail_at = 0, 3
    try:
        with pytest.raises(StorageError, match=f"cannot write {url}/edits/chunk-00000/images/"):
            remote.push("edits/chunk-00000")
    finally:
        _FlakyMemory.fail_at = None
    # the old marker went first: no reader takes the half-updated partition for the old or the new version
    assert remote._read("edits/chunk-00000/_stats.json") is None
    assert not RemoteRoot(url, tmp_path / "b").pull("edits/chunk-00000")
    remote.push("edits/chunk-00000")
    assert json.loads(remote._read("edits/chunk-00000/_stats.json")) == {"v": 2}
    assert _remote_files(remote, "edits/chunk-00000")["edits/chunk-00000/images/0.png"] == b"new"


def test_only_committed_work_is_pulled(url, tmp_path):
    a, b = RemoteRoot(url, tmp_path / "a"), RemoteRoot(url, tmp_path / "b")
    a.put_bytes("qc/chunk-00000/manifest.parquet", b"partial")  # an upload without its marker
    assert not b.pull("qc/chunk-00000") and not (b.local / "qc").exists()


def test_renames_only_where_the_filesystem_has_them(url, tmp_path):
    remote = RemoteRoot(url, tmp_path / "a")
    assert remote.renames == url.startswith("file://")
    remote.put_bytes("x/y.bin", b"abc")
    assert remote._read("x/y.bin") == b"abc" and remote._files("x") == ["x/y.bin"]  # no temp file left


def test_create_once_has_exactly_one_winner(url, tmp_path):
    remote = RemoteRoot(url, tmp_path / "a")
    assert remote.create_once("_chunks/chunk-00000.json", b"first")
    assert not remote.create_once("_chunks/chunk-00000.json", b"second")
    assert remote._read("_chunks/chunk-00000.json") == b"first"


def test_a_full_remote_is_a_clear_error_naming_the_url(tmp_path):
    url = f"flakymem://attrface-test-{uuid.uuid4().hex[:8]}/root"
    remote = RemoteRoot(url, tmp_path / "a")
    _partition(remote.local, "faces/chunk-00000", {"manifest.parquet": b"m"}, {"n": 1})
    _FlakyMemory.uploads, _FlakyMemory.fail_at = 0, 1
    try:
        with pytest.raises(StorageError) as err:
            remote.push("faces/chunk-00000")
    finally:
        _FlakyMemory.fail_at = None
    assert err.value.errno == errno.ENOSPC
    assert f"cannot write {url}/faces/chunk-00000/manifest.parquet: the filesystem is full" in str(err.value)
    assert remote._read("faces/chunk-00000/_stats.json") is None


def test_the_chunk_registry_lives_at_the_url(tmp_path):
    url = f"memory://attrface-test-{uuid.uuid4().hex[:8]}/root"
    a, b = RemoteRoot(url, tmp_path / "a"), RemoteRoot(url, tmp_path / "b")
    listing = [f"/photos/{n}.jpg" for n in "abc"]
    reg_a, reg_b = ChunkRegistry(a.local, a), ChunkRegistry(b.local, b)
    plan = reg_a.plan(listing, 2)
    assert all(reg_a.commit(c, m) for c, m in plan.chunks.items())
    # machine B, with its own empty working copy, sees A's chunks and plans a new photo after them
    assert reg_b.plan([*listing, "/photos/d.jpg"], 2).chunks == {**plan.chunks, "chunk-00002": ["/photos/d.jpg"]}
    assert reg_b.commit("chunk-00000", plan.chunks["chunk-00000"]) is False
    with pytest.raises(ChunkConflict, match="chunk-00001 is registered with 1 other members"):
        reg_b.commit("chunk-00001", ["/photos/c.jpg", "/photos/d.jpg"])


def test_a_url_data_root_gets_a_local_working_copy():
    cfg = load_config(overrides={"paths": {"data_root": "s3://bucket/attrface/"}})
    assert cfg.paths.data_url == "s3://bucket/attrface"
    assert cfg.paths.data_root.parent == PROJECT_ROOT / "data" / "work"
    cfg = load_config(overrides={"paths": {"data_root": "memory://b/x", "work_dir": "/tmp/wc"}})
    assert cfg.paths.data_root == Path("/tmp/wc") and cfg.paths.data_url == "memory://b/x"
    assert load_config(overrides={"paths": {"data_root": "/data/x"}}).paths.data_url is None


# -- end to end: one chunk built through the Dagster assets on one working copy, published from another -----------

CHUNK_ASSETS = ("raw_images", "faces", "face_attributes", "edit_prompts", "edits", "qc", "face_identities")


def _materialize(settings: dict, names, partition: str | None = "chunk-00000") -> None:
    import dagster as dg

    from attrface_pipeline.assets.resources import AttrFaceConfig
    from attrface_pipeline.definitions import defs

    assets = [a for a in defs.assets if a.key.path[-1] in names]
    result = dg.materialize(assets, partition_key=partition, resources={"attrface": AttrFaceConfig(settings=settings)},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()
            if k.endswith((".tar", ".parquet", ".json")) and not k.endswith("_stats.json")}


@pytest.mark.slow
def test_a_chunk_built_on_one_machine_publishes_from_another(tmp_path):
    photos = PROJECT_ROOT / "data" / "samples" / "faces" / "hq"
    source = {"paths": [str(photos / "obama.jpg"), str(photos / "ffhq_00000.png")]}
    cache = str(PROJECT_ROOT / "data" / "cache")  # the shared tiny zoo, as in the other end-to-end tests
    url = f"memory://attrface-test-{uuid.uuid4().hex[:8]}/root"

    def settings(**paths):
        return {"paths": {"cache_dir": cache, **paths}, "source": source}

    local = tmp_path / "local"
    _materialize(settings(data_root=str(local)), CHUNK_ASSETS)
    _materialize(settings(data_root=str(local)), ("attrface_shards",), None)
    _materialize(settings(data_root=url, work_dir=str(tmp_path / "machine_a")), CHUNK_ASSETS)
    _materialize(settings(data_root=url, work_dir=str(tmp_path / "machine_b")), ("attrface_shards",), None)

    remote = RemoteRoot(url, tmp_path / "reader")
    assert sorted(remote._files("_chunks")) == ["_chunks/chunk-00000.json"]
    for asset in CHUNK_ASSETS:  # every partition committed, marker included
        assert remote._read(f"{asset}/chunk-00000/_stats.json") is not None
    published = _remote_files(remote, "attrface_shards")
    local_files = {f"attrface_shards/{p.relative_to(local / 'attrface_shards').as_posix()}": p.read_bytes()
                   for p in (local / "attrface_shards").rglob("*") if p.is_file()}
    assert any(k.endswith(".tar") for k in published)
    assert _digests(published) == _digests(local_files)  # the same shards as a build on a local data root
