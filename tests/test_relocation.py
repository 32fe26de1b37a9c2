"""A build is relocatable: the chunk registry, the raw_images manifests and every fingerprint name photos by source
id (``<root label>/<relative path>``), so a build moved to another path, or photos mounted elsewhere, re-run with
nothing recomputed, nothing quarantined, shards byte-identical; registries of absolute paths are migrated."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.stages.chunks import ChunkRegistry
from attrface_pipeline.stages.ingest import migrate_member, source_listing

PHOTOS = PROJECT_ROOT / "data" / "samples" / "faces" / "hq"
CHUNK_ASSETS = ("raw_images", "faces", "face_attributes", "edit_prompts", "edits", "qc", "face_identities")


def test_source_ids_name_photos_by_their_root_and_relative_path(tmp_path):
    for site in ("a", "b"):
        (tmp_path / site / "photos" / "sub").mkdir(parents=True)
        shutil.copy(PHOTOS / "obama.jpg", tmp_path / site / "photos" / "sub" / "x.jpg")
    (tmp_path / "a" / "list.txt").write_text("photos/sub/x.jpg\n")
    listing = source_listing([str(tmp_path / "a" / "photos")], [".jpg"])
    assert list(listing.values()) == ["photos/sub/x.jpg"]
    assert list(source_listing([str(tmp_path / "b" / "photos")], [".jpg"]).values()) == ["photos/sub/x.jpg"]
    assert list(source_listing([str(tmp_path / "a" / "photos" / "**" / "*.jpg")], [".jpg"]).values()) == [
        "photos/sub/x.jpg"]
    assert list(source_listing([str(tmp_path / "a" / "list.txt")], [".jpg"]).values()) == ["a/photos/sub/x.jpg"]
    # two roots with one name: each label grows until it is unique
    both = source_listing([str(tmp_path / "a" / "photos"), str(tmp_path / "b" / "photos")], [".jpg"])
    assert list(both.values()) == ["a/photos/sub/x.jpg", "b/photos/sub/x.jpg"]
    # an absolute member of an old registry becomes the listed id it ends with
    ids = {"photos/sub/x.jpg"}
    assert migrate_member("/old/checkout/data/photos/sub/x.jpg", ids) == "photos/sub/x.jpg"
    assert migrate_member("/old/photos/sub/gone.jpg", ids) == "/old/photos/sub/gone.jpg"
    assert migrate_member("photos/sub/x.jpg", ids) == "photos/sub/x.jpg"


def test_an_old_registry_of_absolute_paths_is_migrated_not_rebuilt(tmp_path):
    root = tmp_path / "build"
    (root / "_chunks").mkdir(parents=True)
    old = {"chunk": "chunk-00000", "members": ["/old/place/photos/a.jpg", "/old/place/photos/b.jpg"]}
    (root / "_chunks" / "chunk-00000.json").write_text(json.dumps(old))
    registry = ChunkRegistry(root)
    plan = registry.plan(["photos/a.jpg", "photos/b.jpg", "photos/c.jpg"], 2)
    assert plan.chunks == {"chunk-00000": ["photos/a.jpg", "photos/b.jpg"], "chunk-00001": ["photos/c.jpg"]}
    assert plan.new == ["chunk-00001"] and plan.missing == {}
    assert registry.commit("chunk-00000", plan.chunks["chunk-00000"], listed=set(plan.chunks["chunk-00000"])) is False


def _materialize(settings: dict, names, partition: str | None = "chunk-00000") -> None:
    import dagster as dg

    from attrface_pipeline.assets.resources import AttrFaceConfig
    from attrface_pipeline.definitions import defs

    assets = [a for a in defs.assets if a.key.path[-1] in names]
    result = dg.materialize(assets, partition_key=partition, resources={"attrface": AttrFaceConfig(settings=settings)},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success


def _state(build: Path) -> dict[str, bytes]:
    """Every completion marker and every published file: a recomputed partition rewrites its marker."""
    files = [p for p in build.rglob("_stats.json")] + [p for p in (build / "attrface_shards").rglob("*")
                                                       if p.is_file() and p.name != "_stats.json"]
    return {p.relative_to(build).as_posix(): p.read_bytes() for p in files}


@pytest.mark.slow
def test_a_moved_build_recomputes_nothing(tmp_path):
    cache = str(PROJECT_ROOT / "data" / "cache")  # the shared tiny zoo, as in the other end-to-end tests
    site = tmp_path / "site_a"
    (site / "photos").mkdir(parents=True)
    for name in ("obama.jpg", "ffhq_00000.png"):
        shutil.copy(PHOTOS / name, site / "photos" / name)

    def build(photos: Path, data_root: Path) -> dict[str, bytes]:
        settings = {"paths": {"cache_dir": cache, "data_root": str(data_root)}, "source": {"paths": [str(photos)]}}
        _materialize(settings, CHUNK_ASSETS)
        _materialize(settings, ("attrface_shards",), None)
        return _state(data_root)

    before = build(site / "photos", site / "build")
    assert any(k.endswith(".tar") for k in before)
    registry = json.loads((site / "build" / "_chunks" / "chunk-00000.json").read_text())
    assert registry["members"] == ["photos/ffhq_00000.png", "photos/obama.jpg"]  # no absolute path
    moved = tmp_path / "elsewhere" / "site_b"
    moved.parent.mkdir()
    shutil.move(site, moved)  # the checkout renamed: photos and data root move together
    assert build(moved / "photos", moved / "build") == before  # nothing recomputed, shards byte-identical
    mount = tmp_path / "mnt" / "photos"  # the photos mounted at another path than the build
    mount.parent.mkdir()
    shutil.move(moved / "photos", mount)
    assert build(mount, moved / "build") == before
    assert sorted(p.name for p in (moved / "build" / "_chunks").iterdir()) == ["chunk-00000.json"]
    manifest = pq.read_table(moved / "build" / "raw_images" / "chunk-00000" / "manifest.parquet").to_pylist()
    assert {r["status"] for r in manifest} == {"ok"}
