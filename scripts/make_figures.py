"""The README's pictures, remade from a build's own outputs (run after `make demo`, and for the restore grid after
`make train-a2bfr` + `attrface restore -i data/samples/lq_real -o results --weights latest`):

    docs/images/dag.png       the asset graph of the Dagster definitions, one column per depth
    docs/images/pairs.jpg     source | edit pairs from the published shards (one per face), with the flipped attribute
    docs/images/restored.jpg  LQ | restored faces from a restore results folder (its cmp/ images)

    .venv/bin/python scripts/make_figures.py [--data-root data/build] [--results results] [--out docs/images]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np

from attrface_pipeline.config import PROJECT_ROOT
from attrface_pipeline.images import encode_image, read_rgb

TILE = 128
GROUP_COLOURS = {"dataset": "#cfe2f3", "benchmarks": "#d9ead3", "models": "#fce5cd", "evaluation": "#ead1dc"}


def dag_png() -> bytes:
    """Boxes for the assets, arrows for their dependencies, laid out left to right by depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attrface_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    parents = {k: [p for p in graph.get(k).parent_keys if p in keys] for k in keys}
    depth: dict = {}

    def level(key) -> int:
        if key not in depth:
            depth[key] = 1 + max((level(p) for p in parents[key]), default=-1)
        return depth[key]

    columns: dict[int, list] = {}
    for key in keys:
        columns.setdefault(level(key), []).append(key)
    pos = {key: (col, -row + (len(members) - 1) / 2) for col, members in columns.items()
           for row, key in enumerate(members)}
    height = max(len(m) for m in columns.values())
    fig, ax = plt.subplots(figsize=(2.1 * len(columns), 0.75 * height + 0.6), dpi=110)
    for key, (x, y) in pos.items():
        for parent in parents[key]:
            px, py = pos[parent]
            ax.annotate("", xy=(x - 0.42, y), xytext=(px + 0.42, py),
                        arrowprops={"arrowstyle": "->", "color": "#666", "lw": 0.8})
    for key, (x, y) in pos.items():
        group = graph.get(key).group_name or "default"
        ax.text(x, y, key.to_user_string(), ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round,pad=0.35", "fc": GROUP_COLOURS.get(group, "#eeeeee"), "ec": "#555"})
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(-height / 2 - 0.2, height / 2 + 0.2)
    ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    out = tile.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 16), (0, 0, 0), -1)
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _tile(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(rgb, (TILE, TILE), interpolation=cv2.INTER_AREA)


def _grid(rows: list[list[np.ndarray]], columns: int = 2) -> np.ndarray:
    """Rows of tiles, arranged ``columns`` rows side by side with a white gap."""
    gap = 6
    strips = [np.concatenate(r, axis=1) for r in rows]
    width = strips[0].shape[1]
    blocks = []
    for i in range(0, len(strips), columns):
        group = strips[i:i + columns] + [np.full_like(strips[0], 255)] * (columns - len(strips[i:i + columns]))
        blocks.append(np.concatenate([np.pad(s, ((0, gap), (0, gap), (0, 0)), constant_values=255) for s in group],
                                     axis=1))
    assert all(b.shape[1] == (width + gap) * columns for b in blocks)
    return np.concatenate(blocks, axis=0)


def pairs_png(data_root: Path, count: int = 8) -> bytes:
    """source | edit of the first published pairs, one flipped attribute per row."""
    rows: list[list[np.ndarray]] = []
    seen: set[str] = set()
    for shard in sorted((data_root / "attrface_shards").glob("*/attrface-*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for members in samples.values():
            meta = json.loads(members["json"])
            flip = f"{meta['edit']['direction']} {meta['edit']['attribute']}".replace("_", " ")
            if meta["face_key"] in seen:  # one pair per face: as many faces as the rows allow
                continue
            seen.add(meta["face_key"])
            src = next(v for k, v in members.items() if k.startswith("src.") and not k.endswith("txt"))
            tar_img = next(v for k, v in members.items() if k.startswith("tar.") and not k.endswith("txt"))
            decode = lambda b: cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),  # noqa: E731
                                            cv2.COLOR_BGR2RGB)
            rows.append([_label(_tile(decode(src)), "source"), _label(_tile(decode(tar_img)), flip)])
            if len(rows) == count:
                return encode_image(_grid(rows), "jpg", quality=90)
    if not rows:
        raise SystemExit(f"no published shards under {data_root / 'attrface_shards'}: run `make demo` first")
    return encode_image(_grid(rows), "jpg", quality=90)


def restored_png(results: Path, count: int = 8) -> bytes:
    """LQ | restored from a restore results folder's cmp/ images (each is crop | restored side by side)."""
    rows = []
    for path in sorted((results / "cmp").rglob("*.png"))[:count]:
        both = read_rgb(path)
        half = both.shape[1] // 2
        rows.append([_label(_tile(both[:, :half]), "LQ"), _label(_tile(both[:, half:]), "restored")])
    if not rows:
        raise SystemExit(f"no restore results in {results / 'cmp'}: run `attrface restore ... -o {results}` first")
    return encode_image(_grid(rows), "jpg", quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=PROJECT_ROOT / "data" / "build")
    parser.add_argument("--results", type=Path, default=PROJECT_ROOT / "results")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"dag.png": dag_png, "pairs.jpg": lambda: pairs_png(args.data_root)}
    if (args.results / "cmp").is_dir():
        figures["restored.jpg"] = lambda: restored_png(args.results)
    for name, make in figures.items():
        (args.out / name).write_bytes(make())
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
