"""A test-only training entry point: what a trainer does under Dagster Pipes (log, write a PNG, report metadata).

Run by tests/training/test_pipes.py as ``python -m accelerate.commands.launch ... -m tests.training.pipes_probe
--config <output_dir>/launch_config.json``.
"""

import argparse
import json
import os
from pathlib import Path

from attrface_pipeline.plots import loss_curve_png
from training.pipes import pipes_session


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = json.loads(Path(parser.parse_args(argv).config).read_text())
    out = Path(config["output_dir"])
    with pipes_session() as session:
        rank = os.environ.get("RANK", "-")
        session.log(f"pipes_probe: {config['name']} on rank {rank}")
        if config.get("fail"):
            raise RuntimeError("pipes_probe was asked to fail")
        rows = [{"step": s, "loss": 1.0 / s} for s in range(1, config["steps"] + 1)]
        curve = out / "loss_curve.png"
        if session.active:  # only the main process writes
            curve.write_bytes(loss_curve_png(rows, title=config["name"]))
        session.report({
            "steps": config["steps"],
            "final_loss": rows[-1]["loss"],
            "loss_curve": curve,
            "output_dir": out,
            "losses": rows[-2:],
            "env": {k: os.environ.get(k) for k in ("ACCELERATE_MIXED_PRECISION", "HF_HUB_OFFLINE",
                                                   "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "PROBE_EXTRA", "RANK")},
        })


if __name__ == "__main__":
    main()
