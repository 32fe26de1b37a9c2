"""FlowEdit at the full profile's parameters on this machine's GPU: SD3.5 Large / Medium built from their published
configs with random weights (no download), eager / torch.compile / float8, batch 1/4/8 at 512²: s/pair, TFLOP/s,
peak memory, GPU-hours per 10K pairs. On a CPU: the tiny random SD3, and it says so.

    .venv/bin/python benchmarks/flowedit_gpu.py [--model large medium] [--mode eager compiled fp8] [--batch 1 4 8]
        [--max-sequence-length 77 256] [--json out.json]

The same as ``attrface bench-gpu``; the code is attrface_pipeline/bench_gpu.py.
"""

from attrface_pipeline.bench_gpu import main

if __name__ == "__main__":
    main()
