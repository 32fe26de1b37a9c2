"""FlowEdit cost on this machine: seconds per pair for the tiny random SD3 on CPU at 64² and 128², batch 1 vs 4.

Baseline: batch size 1 at the same resolution in the same run (the ratio is the claim). Also reports the number
that sets GPU cost -- transformer evaluations per pair -- for the offline and the full profile's parameters,
against the bound 4·(n_max − n_min)·n_avg + 2·n_min (the official code spends 4 per step on the n_min steps too).
The tiny model's speed says nothing about SD3.5's; the evaluation count carries over.

    .venv/bin/python benchmarks/flowedit_speed.py [--pairs 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from attrface_pipeline.bench_gpu import SRC, TAR, sample_faces
from attrface_pipeline.builders import build_editor, flowedit_params
from attrface_pipeline.config import load_config
from attrface_pipeline.stages.edits import pair_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    # The pipeline's own builder, pinned to the tiny SD3 on CPU whatever $ATTRFACE_CONFIG says.
    cfg = load_config(overrides={"models": {"sd3": "tiny/sd3"}, "edit": {"device": "cpu"}})
    editor = build_editor(cfg)
    params = flowedit_params(cfg.edit)
    rows = []
    for size in (64, 128):
        faces = sample_faces(size, args.pairs)
        editor.edit(faces[:1], [SRC], [TAR], params, [0])  # warm-up: allocator, prompt embeddings
        for batch in (1, 4):
            calls0, t0 = editor.transformer_calls, time.perf_counter()
            for start in range(0, args.pairs, batch):
                n = len(faces[start:start + batch])
                editor.edit(faces[start:start + batch], [SRC] * n, [TAR] * n, params,
                            [pair_seed(0, str(start + j)) for j in range(n)])
            seconds = time.perf_counter() - t0
            rows.append({"resolution": size, "batch": batch, "pairs": args.pairs,
                         "seconds_per_pair": round(seconds / args.pairs, 4),
                         "transformer_calls": editor.transformer_calls - calls0})
    print(f"tiny SD3 on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"T={params.steps} n_max={params.n_max} n_min={params.n_min} n_avg={params.n_avg}")
    print(f"{'size':>5s} {'batch':>5s} {'s/pair':>8s} {'calls':>6s} {'vs batch 1':>10s}")
    for r in rows:
        base = next(b for b in rows if b["resolution"] == r["resolution"] and b["batch"] == 1)
        r["speedup_vs_batch1"] = round(base["seconds_per_pair"] / r["seconds_per_pair"], 2)
        print(f"{r['resolution']:5d} {r['batch']:5d} {r['seconds_per_pair']:8.4f} {r['transformer_calls']:6d} "
              f"{r['speedup_vs_batch1']:9.2f}x")
    budget = {}
    for profile in ("offline", "full"):
        p = load_config(profile).edit
        fp = flowedit_params(p)
        official = 4 * min(p.n_max, p.steps) * p.n_avg
        budget[profile] = {"batched_calls_per_batch": fp.transformer_calls(),
                           "evaluations_per_pair": fp.sample_evaluations(), "official_code": official}
        print(f"{profile:8s} profile: {fp.transformer_calls()} batched transformer calls per batch, "
              f"{fp.sample_evaluations()} latent evaluations per pair (official code: {official})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "budget": budget}, indent=2))


if __name__ == "__main__":
    main()
