"""Identity-disjoint split: one person never appears on both sides of the train/test split.

Faces are joined (union-find) when the QC identity backend calls them the same person -- dlib: descriptor distance
at most ``dlib_max_distance``; ArcFace: cosine at least ``arcface_min_similarity`` -- and when they come from the
same source photo (so a photo never straddles the split either). Each group is split as a whole by the stable hash
of its smallest image key. Embeddings are compared in blocks, so memory stays bounded (O(block x N)).

Design decision: the match is transitive (single linkage), so a chain of near matches joins into one group. That is
the safe side for a split -- a group may be larger than one person, never a person smaller than a group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

EMBEDDING_SCHEMA = pa.schema([
    ("face_key", pa.string()),
    ("image_key", pa.string()),
    ("backend", pa.string()),
    ("embedding", pa.list_(pa.float32())),
])


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def same_person_rule(backend: str, *, dlib_max_distance: float, arcface_min_similarity: float) -> tuple[str, float]:
    """(metric, threshold) of an identity backend: dlib compares distances, ArcFace cosines."""
    if backend == "dlib":
        return "distance", dlib_max_distance
    if backend == "arcface":
        return "similarity", arcface_min_similarity
    raise ValueError(f"unknown identity backend {backend!r}; choose dlib or arcface")


def identity_edges(embeddings: np.ndarray, *, metric: str, threshold: float,
                   block: int = 2048) -> list[tuple[int, int]]:
    """Index pairs (i < j) of the same person under (metric, threshold), from an (N, D) embedding matrix."""
    x = np.asarray(embeddings, np.float64)
    if metric == "similarity":
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    elif metric != "distance":
        raise ValueError(f"metric must be 'distance' or 'similarity', got {metric!r}")
    sq = np.einsum("ij,ij->i", x, x)
    edges = []
    for start in range(0, len(x), block):
        rows = x[start:start + block]
        dots = rows @ x.T
        if metric == "similarity":
            hit = dots >= threshold
        else:  # squared distances from the dot products; clipped at 0 against rounding
            hit = np.maximum(sq[start:start + block, None] + sq[None, :] - 2 * dots, 0) <= threshold * threshold
        for i, j in zip(*np.nonzero(hit)):
            if start + i < j:
                edges.append((int(start + i), int(j)))
    return edges


@dataclass(frozen=True)
class SplitGroups:
    group_of: dict[str, str]  # face_key -> group key (the smallest image key of its group)
    identity_clusters: int  # components under identity alone (how many people the faces show, at this threshold)
    groups: int  # components under identity and same-photo links (the units the split assigns)
    edges: tuple[tuple[int, int], ...]  # identity matches between face indices


def group_faces(face_keys: Sequence[str], image_keys: Sequence[str], embeddings: np.ndarray, *, metric: str,
                threshold: float, order: Sequence[int] | None = None) -> SplitGroups:
    """Group faces by identity and source photo; see the module docstring.

    A group is named after its first photo: the smallest ``(order, image key)``, ``order`` being the face's chunk
    position. Chunks are append-only, so photos added later never rename a group they join, and its split stays
    (only a new photo that links two existing groups merges them, and one of them then follows the other)."""
    n = len(face_keys)
    if not (len(image_keys) == n == len(embeddings)):
        raise ValueError(f"{n} face keys, {len(image_keys)} image keys and {len(embeddings)} embeddings differ")
    edges = identity_edges(embeddings, metric=metric, threshold=threshold) if n else []
    groups = UnionFind(n)
    for i, j in edges:
        groups.union(i, j)
    identity_clusters = len({groups.find(i) for i in range(n)})  # before photo links join different people
    first_of_image: dict[str, int] = {}
    for i, image in enumerate(image_keys):
        groups.union(i, first_of_image.setdefault(image, i))
    rank = [(order[i] if order is not None else 0, image) for i, image in enumerate(image_keys)]
    first: dict[int, tuple[int, str]] = {}
    for i in range(n):
        root = groups.find(i)
        first[root] = min(first.get(root, rank[i]), rank[i])
    smallest = {root: image for root, (_, image) in first.items()}
    return SplitGroups(
        group_of={face_keys[i]: smallest[groups.find(i)] for i in range(n)},
        identity_clusters=identity_clusters,
        groups=len(smallest),
        edges=tuple(edges),
    )


def cross_split_matches(face_keys: Sequence[str], edges: Sequence[tuple[int, int]],
                        split_of_face: Callable[[str], str]) -> int:
    """Identity matches whose two faces landed in different splits (0 for an identity-disjoint split)."""
    return sum(split_of_face(face_keys[i]) != split_of_face(face_keys[j]) for i, j in edges)


def identity_split(rows: Sequence[dict], *, metric: str, threshold: float,
                   split_of_group: Callable[[str], str],
                   order: Sequence[int] | None = None) -> tuple[dict[str, str], dict]:
    """Group embedding rows (face_key, image_key, embedding) and split them; returns (face_key -> group key, report).
    ``order``: each row's chunk position (see :func:`group_faces`).

    The report is what the dataset card states: faces, identity clusters, split groups, identity matches, and the
    matches that cross the split (0 by construction; measured, not assumed).
    """
    keys = [r["face_key"] for r in rows]
    emb = np.asarray([r["embedding"] for r in rows], np.float64).reshape(len(rows), -1) if rows else np.zeros((0, 0))
    groups = group_faces(keys, [r["image_key"] for r in rows], emb, metric=metric, threshold=threshold, order=order)
    split = {k: split_of_group(groups.group_of[k]) for k in keys}
    report = {"faces": len(keys), "identity_clusters": groups.identity_clusters, "split_groups": groups.groups,
              "identity_matches": len(groups.edges), "metric": metric, "threshold": threshold,
              "cross_split_identity_matches": cross_split_matches(keys, groups.edges, split.__getitem__)}
    return groups.group_of, report
