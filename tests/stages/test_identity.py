"""Identity-disjoint split on real photos: the same person in two photos never straddles train/test."""

import numpy as np
import pytest

from attrface_pipeline.stages.align import align_face
from attrface_pipeline.stages.identity import (cross_split_matches, group_faces, identity_edges, identity_split,
                                               same_person_rule)
from attrface_pipeline.stages.ingest import load_rgb
from attrface_pipeline.stages.shards import split_of

# Obama alone and beside Biden; Rose Leslie alone and beside Kit Harington: two people photographed twice.
PHOTOS = ["hq/obama.jpg", "whole/obama_and_biden.jpg", "hq/rose_leslie2.jpg", "hq/kit_with_rose.jpg",
          "hq/lin-manuel-miranda.png"]


@pytest.fixture(scope="module")
def faces(samples, dlib_detector):
    from attrface_pipeline.stages.checks import DlibScorer

    keys, images, crops = [], [], []
    for name in PHOTOS:
        rgb, digest = load_rgb(samples / name, min_side=64, max_pixels=80_000_000)
        for i, face in enumerate(sorted(dlib_detector.detect(rgb), key=lambda f: f.bbox[0])):
            if face.size < 48:
                continue
            crop, _ = align_face(rgb, face.landmarks5, size=256)
            keys.append(f"{digest[:16]}_{i}")
            images.append(digest[:16])
            crops.append(crop)
    return keys, images, DlibScorer().embed(crops)


def test_same_person_in_two_photos_forms_one_group(faces):
    keys, images, emb = faces
    metric, threshold = same_person_rule("dlib", dlib_max_distance=0.6, arcface_min_similarity=0.4)
    groups = group_faces(keys, images, emb, metric=metric, threshold=threshold)
    assert len(set(images)) == 5 and len(keys) == 8  # obama_and_biden has 3 faces, kit_with_rose 2
    # Obama (2 photos) and Rose Leslie (2 photos) each match across photos: those 4 photos collapse into 2 groups
    photo_groups = {groups.group_of[k] for k in keys}
    assert groups.groups == len(photo_groups) == 3, photo_groups
    assert groups.identity_clusters == len(keys) - 2
    assert len(groups.edges) == 2


def test_a_group_keeps_its_name_when_a_later_chunk_adds_a_photo_of_the_same_person(faces):
    keys, images, emb = faces
    obama = [i for i, img in enumerate(images) if img == images[0]]  # hq/obama.jpg, alone
    others = [i for i in range(len(keys)) if images[i] != images[0]]
    before = group_faces([keys[i] for i in others], [images[i] for i in others], emb[others], metric="distance",
                         threshold=0.6, order=[0] * len(others))
    # obama.jpg arrives in a later chunk; its image key sorts first, yet no existing group is renamed
    assert images[0] < images[others[0]]
    every = others + obama
    after = group_faces([keys[i] for i in every], [images[i] for i in every], emb[every], metric="distance",
                        threshold=0.6, order=[0] * len(others) + [1] * len(obama))
    assert all(after.group_of[keys[i]] == before.group_of[keys[i]] for i in others)
    assert after.group_of[keys[obama[0]]] == before.group_of[keys[others[0]]]  # joined the Obama-and-Biden group
    # without the chunk order, the smallest image key names the group
    unordered = group_faces([keys[i] for i in every], [images[i] for i in every], emb[every], metric="distance",
                            threshold=0.6)
    assert unordered.group_of[keys[obama[0]]] == min(images[0], images[others[0]])


def test_identity_split_never_straddles_where_the_photo_split_does(faces):
    keys, images, emb = faces
    groups = group_faces(keys, images, emb, metric="distance", threshold=0.6)
    straddled_by_photo = 0
    for salt in range(60):
        by_group = {k: split_of(groups.group_of[k], 0.5, f"salt{salt}") for k in keys}
        assert cross_split_matches(keys, groups.edges, by_group.__getitem__) == 0
        image_of = dict(zip(keys, images))
        by_photo = {k: split_of(image_of[k], 0.5, f"salt{salt}") for k in keys}
        straddled_by_photo += cross_split_matches(keys, groups.edges, by_photo.__getitem__) > 0
    assert straddled_by_photo > 10  # the old per-photo split separates one person for many salts


def test_edges_match_brute_force_in_blocks():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8))
    emb[10] = emb[3] + 0.01
    for metric, threshold in (("distance", 2.5), ("similarity", 0.6)):
        x = emb / np.linalg.norm(emb, axis=1, keepdims=True) if metric == "similarity" else emb
        brute = {(i, j) for i in range(50) for j in range(i + 1, 50)
                 if (np.dot(x[i], x[j]) >= threshold if metric == "similarity"
                     else np.linalg.norm(x[i] - x[j]) <= threshold)}
        assert set(identity_edges(emb, metric=metric, threshold=threshold, block=7)) == brute
        assert (3, 10) in brute
    with pytest.raises(ValueError, match="differ"):
        group_faces(["a"], [], emb[:1], metric="distance", threshold=0.6)


def test_identity_split_of_nothing_is_an_empty_report():
    """publish on a build with no faces yet (CI's concurrent first runs): an empty split, not a reshape error."""
    group_of, report = identity_split([], metric="distance", threshold=0.6, split_of_group=lambda g: "train")
    assert group_of == {} and report["faces"] == 0 and report["cross_split_identity_matches"] == 0
