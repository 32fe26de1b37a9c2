"""A full disk, a file-size limit and a read-only data root: one clear error naming the path, nothing half-written.

Real filesystems where the machine allows it (a size-limited tmpfs, a read-only bind mount: root in a container);
a real process under RLIMIT_FSIZE otherwise, which needs no privilege.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.storage import StorageError, atomic_write_bytes

SAMPLES = PROJECT_ROOT / "data" / "samples" / "faces" / "hq"


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs, or a skip where mounting is not allowed (the RLIMIT_FSIZE test covers that case)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)):
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def read_only_root(tmp_path):
    """An empty folder nobody may write to: a read-only bind mount as root, a 0555 folder otherwise."""
    root = tmp_path / "ro"
    root.mkdir()
    if os.geteuid() != 0:
        root.chmod(0o555)
        yield root
        root.chmod(0o755)
        return
    if not (_mount("--bind", str(root), str(root)) and _mount("-o", "remount,bind,ro", str(root))):
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
        pytest.skip("cannot make a read-only bind mount here")
    yield root
    subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_file_size_limit_is_a_clear_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "shard.tar"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # then the write fails with EFBIG instead of a kill
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "from pathlib import Path\n"
        "from attrface_pipeline.storage import atomic_write_bytes\n"
        "try:\n"
        "    atomic_write_bytes(Path(sys.argv[1]), b'x' * 200_000)\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         timeout=120).stdout
    assert out.startswith(f"StorageError [Errno 27] cannot write {target}: the file exceeds the size limit"), out
    assert _leftovers(tmp_path / "out") == []


def test_a_full_filesystem_is_a_clear_error_and_leaves_nothing(small_fs):
    with pytest.raises(StorageError, match=f"cannot write {small_fs}/a/b.bin: the filesystem is full"):
        atomic_write_bytes(small_fs / "a" / "b.bin", os.urandom(400_000))
    assert _leftovers(small_fs) == []
    atomic_write_bytes(small_fs / "a" / "c.bin", b"fits")  # the filesystem itself is fine
    assert _leftovers(small_fs) == ["a/c.bin"]


def _materialize(assets, settings):
    import dagster as dg

    from attrface_pipeline.assets.resources import AttrFaceConfig

    return dg.materialize(assets, partition_key="chunk-00000", instance=dg.DagsterInstance.ephemeral(),
                          resources={"attrface": AttrFaceConfig(settings=settings)}, raise_on_error=False)


def _failure(result) -> str:
    """The step's error messages, outermost first (Dagster wraps the asset's exception)."""
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run did not fail"
    error, messages = failures[0].step_failure_data.error, []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def _settings(tmp_path, data_root):
    src = tmp_path / "photos"
    src.mkdir(exist_ok=True)
    for name in ("obama.jpg", "rose_leslie2.jpg", "kit_with_rose.jpg"):
        shutil.copy(SAMPLES / name, src / name)
    return {"source": {"paths": [str(src)], "chunk_size": 8},
            "paths": {"data_root": str(data_root), "cache_dir": str(tmp_path / "cache")}}


@pytest.mark.slow
def test_disk_full_mid_partition_fails_clearly_then_resumes(tmp_path, small_fs):
    from attrface_pipeline.assets.ingest import faces, raw_images

    settings = _settings(tmp_path, small_fs / "data")
    result = _materialize([raw_images, faces], settings)
    message = _failure(result)
    assert f"cannot write {small_fs}/data/faces/chunk-00000/" in message and "the filesystem is full" in message
    done = small_fs / "data" / "faces" / "chunk-00000"
    assert not (done / "_stats.json").exists() and not any(".tmp" in f for f in _leftovers(small_fs))
    assert (small_fs / "data" / "raw_images" / "chunk-00000" / "_stats.json").exists()  # the step before finished
    kept = [f for f in _leftovers(done) if f.startswith("aligned/")]

    assert _mount("-o", "remount,size=64m", str(small_fs))  # space freed: the re-run finishes, keeping its crops
    result = _materialize([raw_images, faces], settings)
    assert result.success
    assert (done / "_stats.json").exists() and set(kept) <= set(_leftovers(done))


def test_a_read_only_data_root_fails_with_the_path(tmp_path, read_only_root):
    from attrface_pipeline.assets.ingest import raw_images

    result = _materialize([raw_images], _settings(tmp_path, read_only_root))
    message = _failure(result)
    assert f"cannot write {read_only_root}/" in message
    assert "the filesystem is read-only" in message or "permission denied" in message
    assert _leftovers(read_only_root) == []
