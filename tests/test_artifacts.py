"""Every kind of file the project writes and later trusts, enumerated from the one registry
(``attrface_pipeline.artifacts.all_kinds``): a real example written by the project's own writer, then each of its
files truncated, bit-flipped, replaced by garbage, replaced by a folder, or (the file with the integrity record)
stamped with an older schema. The project's own reader must refuse each with an ArtifactError naming that file --
nothing is trained on or reported from it. A new kind is covered the day it is registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attrface_pipeline import artifacts
from attrface_pipeline.artifacts import INTEGRITY_KEY, ArtifactError, all_kinds

KINDS = all_kinds()
EXAMPLES = sorted(name for name, kind in KINDS.items() if kind.example is not None)


def test_every_kind_can_be_tried():
    assert {"restore.settings", "restore.log", "checkpoint.state"} <= set(KINDS)
    assert any(name.startswith("embedding_cache") for name in KINDS)
    missing = sorted(name for name, kind in KINDS.items() if kind.example is None or kind.read is None)
    assert not missing, f"kinds without an example writer or a reader (the corruption test cannot try them): {missing}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    import random

    size = max(64, path.stat().st_size)
    path.write_bytes(random.Random(0).randbytes(size))


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


DAMAGE = {"truncated": _truncate, "bit-flipped": _flip, "garbage": _garbage, "a folder": _folder}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    """One pristine example of each kind (written once; each case works on a copy)."""
    out = {}
    for name in EXAMPLES:
        folder = tmp_path_factory.mktemp(name.replace(".", "_"))
        files = KINDS[name].example(folder)
        assert files and all(Path(f).is_file() for f in files), f"{name}: the example wrote no files"
        KINDS[name].read(Path(files[0]))  # the pristine example reads back
        out[name] = (folder, [Path(f) for f in files])
    return out


def _copy(examples, name: str, tmp_path: Path) -> list[Path]:
    folder, files = examples[name]
    target = tmp_path / "copy"
    shutil.copytree(folder, target, symlinks=True)
    return [target / f.relative_to(folder) for f in files]


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_files_are_refused_and_named(examples, tmp_path, name, damage):
    kind = KINDS[name]
    n_files = len(examples[name][1])
    for index in range(n_files):
        files = _copy(examples, name, tmp_path / str(index))
        target = files[index]
        DAMAGE[damage](target)
        try:
            kind.read(files[0])
        except ArtifactError as err:
            assert str(target) in str(err) or str(target.parent) in str(err), (name, damage, target.name, str(err))
            assert "\n" not in str(err), str(err)
        else:
            # an appended log drops a torn last line by design: truncation is tolerated, everything else is not
            assert kind.torn_tail_ok and damage == "truncated", f"{name}: {damage} {target.name} was read as valid"


@pytest.mark.parametrize("name", [n for n in EXAMPLES if not KINDS[n].torn_tail_ok])
def test_an_older_schema_is_refused(examples, tmp_path, name):
    files = _copy(examples, name, tmp_path)
    data = json.loads(files[0].read_text())
    data[INTEGRITY_KEY]["schema"] = KINDS[name].schema - 1
    files[0].write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema"):
        KINDS[name].read(files[0])


@pytest.mark.parametrize("name", [n for n in EXAMPLES if not KINDS[n].torn_tail_ok])
def test_a_file_without_integrity_record_is_refused(examples, tmp_path, name):
    """What an older AttrFace wrote (plain JSON, no record) is not trusted either."""
    files = _copy(examples, name, tmp_path)
    data = json.loads(files[0].read_text())
    data.pop(INTEGRITY_KEY)
    files[0].write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="integrity record"):
        KINDS[name].read(files[0])


# The mechanism itself


KIND = artifacts.register(artifacts.ArtifactKind("test.kind", 3, "test file", "rebuild it"))
LOG = artifacts.register(artifacts.ArtifactKind("test.log", 1, "test log", "", torn_tail_ok=True))


def test_json_round_trip_and_standard_json(tmp_path):
    path = tmp_path / "a.json"
    artifacts.write_json(path, KIND, {"x": 1.5, "inf": float("inf"), "path": Path("/a"), "nested": {"n": [1, 2]}})
    assert artifacts.read_json(path, "test.kind") == {"x": 1.5, "inf": None, "path": "/a", "nested": {"n": [1, 2]}}
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    with pytest.raises(artifacts.ArtifactMissingError, match="missing"):
        artifacts.read_json(tmp_path / "none.json", KIND)
    other = artifacts.register(artifacts.ArtifactKind("test.other", 1, "other file", ""))
    with pytest.raises(ArtifactError, match="'test.kind' file where the other file"):
        artifacts.read_json(path, other)


def test_a_torn_log_line_does_not_swallow_the_next_record(tmp_path):
    log = tmp_path / "log.jsonl"
    artifacts.append_jsonl(log, {"n": 1})
    artifacts.append_jsonl(log, {"n": 2})
    with open(log, "ab") as f:  # a writer killed mid-line
        f.write(b'{"n": 3, "half')
    assert artifacts.read_jsonl(log, LOG) == ([{"n": 1}, {"n": 2}], [])
    artifacts.append_jsonl(log, {"n": 4})
    records, problems = artifacts.read_jsonl(log, LOG)
    assert records == [{"n": 1}, {"n": 2}, {"n": 4}]
    assert problems == ["line 3: not valid JSON"]  # the torn line, no longer last, is named


def test_file_records_detect_same_size_replacement(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    record = artifacts.file_record(f)
    artifacts.verify_file(f, record, KIND)
    f.write_bytes(b"b" * 100)
    with pytest.raises(ArtifactError, match="checksum"):
        artifacts.verify_file(f, record, KIND)
