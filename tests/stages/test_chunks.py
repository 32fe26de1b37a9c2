"""The chunk registry: members fixed at registration, new files form new chunks, deletions reported, one winner."""

import json
import threading

import pytest

from attrface_pipeline.stages.chunks import ChunkConflict, ChunkRegistry
from attrface_pipeline.stages.ingest import chunk_sources


def _paths(names):
    return [f"/photos/{n}.jpg" for n in names]


def test_an_empty_registry_plans_the_listing_as_before(tmp_path):
    listing = _paths("abcdefghij")
    plan = ChunkRegistry(tmp_path).plan(listing, 4)
    assert plan.chunks == chunk_sources(listing, 4) and plan.new == list(plan.chunks) and plan.missing == {}
    assert not (tmp_path / "_chunks").exists()  # planning writes nothing


def test_registered_chunks_keep_their_members_when_photos_are_added_and_deleted(tmp_path):
    registry = ChunkRegistry(tmp_path)
    first = registry.plan(_paths("bdfh"), 3)
    for chunk, members in first.chunks.items():
        assert registry.commit(chunk, members)
    assert registry.registered() == {"chunk-00000": _paths("bdf"), "chunk-00001": _paths("h")}
    # "a", "c" sort before registered photos and "d" is deleted: no registered chunk moves; the partly filled last
    # chunk is closed; the new photos form new chunks in listing order.
    plan = registry.plan(_paths("abcefghij"), 3)
    assert plan.chunks == {"chunk-00000": _paths("bdf"), "chunk-00001": _paths("h"),
                           "chunk-00002": _paths("ace"), "chunk-00003": _paths("gij")}
    assert plan.new == ["chunk-00002", "chunk-00003"]
    assert plan.missing == {"chunk-00000": ["/photos/d.jpg"]}
    assert registry.commit("chunk-00000", _paths("bdf")) is False  # already there, same members: nothing written


def test_chunk_numbers_sort_numerically_past_five_digits(tmp_path):
    registry = ChunkRegistry(tmp_path)
    registry.commit("chunk-99999", _paths("a"))
    registry.commit("chunk-100000", _paths("b"))
    assert list(registry.registered()) == ["chunk-99999", "chunk-100000"]
    assert registry.plan(_paths("abc"), 2).new == ["chunk-100001"]


def test_a_chunk_planned_from_another_listing_conflicts_with_a_clear_message(tmp_path):
    registry = ChunkRegistry(tmp_path)
    registry.commit("chunk-00000", _paths("ab"))
    with pytest.raises(ChunkConflict, match="chunk-00000 is registered with 2 other members.*Reload"):
        registry.commit("chunk-00000", _paths("abc"))
    assert registry.registered() == {"chunk-00000": _paths("ab")}


def test_concurrent_registrations_of_one_chunk_have_one_winner(tmp_path):
    registry, outcomes = ChunkRegistry(tmp_path), []
    barrier = threading.Barrier(8)

    def register(i):
        barrier.wait()
        try:
            outcomes.append(("wrote" if registry.commit("chunk-00000", _paths(f"x{i}")) else "found", i))
        except ChunkConflict:
            outcomes.append(("conflict", i))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for what, i in outcomes if what == "wrote"]
    assert len(winners) == 1 and sorted(what for what, _ in outcomes).count("conflict") == 7
    assert registry.registered() == {"chunk-00000": _paths(f"x{winners[0]}")}
    assert [p.name for p in (tmp_path / "_chunks").iterdir()] == ["chunk-00000.json"]  # no temp files left


def test_an_unreadable_entry_is_named(tmp_path):
    registry = ChunkRegistry(tmp_path)
    registry.commit("chunk-00000", _paths("a"))
    (tmp_path / "_chunks" / "chunk-00000.json").write_text(json.dumps({"chunk": "chunk-00000"}))
    with pytest.raises(ChunkConflict, match=r"chunk-00000\.json is unreadable"):
        registry.plan(_paths("a"), 2)
