"""What a build produced, read back from the data root: the summary ``attrface demo`` prints at the end."""

from __future__ import annotations

import json
from pathlib import Path


def next_steps() -> tuple[tuple[str, str], ...]:
    """(command, what it does) after a build: make targets in a checkout, the commands they run elsewhere."""
    from attrface_pipeline.config import IN_CHECKOUT, SAMPLES_DIR

    if IN_CHECKOUT:
        ui, train, evaluate = "make ui", "make train-a2bfr", "make evaluate"
        lq = "data/samples/lq_real"
    else:
        job = "dagster job execute -m attrface_pipeline.definitions -j"
        ui, train, evaluate = "dagster dev -m attrface_pipeline.definitions", f"{job} train_a2bfr", f"{job} evaluate"
        lq = str(SAMPLES_DIR / "lq_real")
    return ((ui, "browse every asset, its metadata and previews in the Dagster UI"),
            (train, "train A²BFR on these shards (offline: the tiny Flux, a few steps)"),
            (f"attrface restore -i {lq} -o results --weights latest", "restore real LQ faces with it"),
            (evaluate, "benchmark sets and the evaluation report"))


def _stats(folder: Path) -> dict:
    try:
        return json.loads((folder / "_stats.json").read_text())
    except (OSError, ValueError):
        return {}


def build_summary(data_root: str | Path) -> dict:
    """Counts of one build: source photos, faces, edit pairs, QC, published samples per split, shards."""
    root = Path(data_root)
    chunks = sorted(p.name for p in (root / "raw_images").glob("chunk-*") if (p / "_stats.json").is_file())

    def total(asset: str, key: str) -> int:
        return sum(int(_stats(root / asset / c).get(key, 0) or 0) for c in chunks)

    shards = _stats(root / "attrface_shards")
    splits = {name: int(s.get("samples", 0)) for name, s in (shards.get("splits") or {}).items()}
    return {"chunks": len(chunks), "photos": total("raw_images", "sources"),
            "quarantined": total("raw_images", "quarantined"), "faces": total("faces", "faces_ok"),
            "pairs": total("edits", "pairs"), "qc_passed": int(shards.get("qc_passed", 0) or 0),
            "qc_pairs": int(shards.get("qc_pairs", 0) or 0), "splits": splits,
            "shards": sum(len(s.get("shards", [])) for s in (shards.get("splits") or {}).values()),
            "megabytes": round(int(shards.get("bytes", 0) or 0) / 2**20, 2), "published": root / "attrface_shards"}


def format_summary(summary: dict, seconds: float | None = None) -> str:
    splits = ", ".join(f"{n} {name}" for name, n in summary["splits"].items()) or "none"
    lines = [
        "",
        f"AttrFace built{f' in {seconds / 60:.1f} min' if seconds is not None else ''}:",
        f"  {summary['photos']} photos in {summary['chunks']} chunk(s) ({summary['quarantined']} quarantined) -> "
        f"{summary['faces']} aligned faces -> {summary['pairs']} edit pairs",
        f"  QC kept {summary['qc_passed']} of {summary['qc_pairs']} pairs; published samples: {splits}",
        f"  {summary['shards']} WebDataset shard(s), {summary['megabytes']} MB, in {summary['published']}",
        "",
        "Next:",
    ]
    for command, what in next_steps():
        lines += [f"  {command}", f"      {what}"]
    return "\n".join(lines)
