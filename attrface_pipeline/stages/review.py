"""Human review decisions in a local SQLite database: one row per pair, the latest decision wins.

The review app writes here; publishing reads it. SQLite in WAL mode, so the app and a Dagster run can use the file
at the same time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

ACCEPT, REJECT = "accept", "reject"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    pair_key   TEXT PRIMARY KEY,
    decision   TEXT NOT NULL CHECK (decision IN ('accept', 'reject')),
    reviewer   TEXT NOT NULL,
    decided_at TEXT NOT NULL,
    note       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS history (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_key   TEXT NOT NULL,
    decision   TEXT NOT NULL,
    reviewer   TEXT NOT NULL,
    decided_at TEXT NOT NULL
);
"""


class ReviewStore:
    """``decide(pair_key, accept|reject, reviewer)``; ``decisions()`` -> {pair_key: decision}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def decide(self, pair_key: str, decision: str, reviewer: str, note: str = "") -> dict:
        if decision not in (ACCEPT, REJECT):
            raise ValueError(f"decision must be {ACCEPT!r} or {REJECT!r}, got {decision!r}")
        if not reviewer.strip():
            raise ValueError("a reviewer name is required")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._connect() as db:  # one transaction: current decision and its history together
            db.execute(
                "INSERT INTO decisions (pair_key, decision, reviewer, decided_at, note) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(pair_key) DO UPDATE SET decision=excluded.decision, reviewer=excluded.reviewer, "
                "decided_at=excluded.decided_at, note=excluded.note",
                (pair_key, decision, reviewer.strip(), now, note),
            )
            db.execute("INSERT INTO history (pair_key, decision, reviewer, decided_at) VALUES (?, ?, ?, ?)",
                       (pair_key, decision, reviewer.strip(), now))
        return {"pair_key": pair_key, "decision": decision, "reviewer": reviewer.strip(), "decided_at": now}

    def decisions(self, pair_keys: Iterable[str] | None = None) -> dict[str, dict]:
        with self._connect() as db:
            rows = db.execute("SELECT pair_key, decision, reviewer, decided_at FROM decisions").fetchall()
        wanted = set(pair_keys) if pair_keys is not None else None
        return {k: {"decision": d, "reviewer": r, "decided_at": t} for k, d, r, t in rows
                if wanted is None or k in wanted}


def review_filter(mode: str, decisions: dict[str, dict]):
    """The publishing rule: required -> only accepted pairs; optional -> all but rejected; off -> all."""
    if mode == "off":
        return lambda key: True
    if mode == "required":
        return lambda key: decisions.get(key, {}).get("decision") == ACCEPT
    if mode == "optional":
        return lambda key: decisions.get(key, {}).get("decision") != REJECT
    raise ValueError(f"review mode must be required, optional or off, got {mode!r}")


def review_items(data_root: str | Path, include_failed: bool = False) -> list[dict]:
    """The pairs to review: QC rows joined with their edit rows, from every complete partition.

    Each item: pair_key, attribute, direction, prompts, QC scores, and the two image paths (absolute)."""
    import pyarrow.parquet as pq

    root = Path(data_root)
    items = []
    for qc_dir in sorted((root / "qc").glob("chunk-*")):
        edit_dir = root / "edits" / qc_dir.name
        if not (qc_dir / "_stats.json").exists() or not (edit_dir / "manifest.parquet").exists():
            continue
        edits = {r["pair_key"]: r for r in pq.read_table(edit_dir / "manifest.parquet").to_pylist()}
        for q in pq.read_table(qc_dir / "manifest.parquet").to_pylist():
            if not (q["passed"] or include_failed) or q["pair_key"] not in edits:
                continue
            e = edits[q["pair_key"]]
            items.append({
                "pair_key": q["pair_key"], "partition": qc_dir.name, "attribute": q["attribute"],
                "direction": q["direction"], "source_prompt": e["source_prompt"], "target_prompt": e["target_prompt"],
                "passed_qc": q["passed"], "identity_similarity": q["identity_similarity"],
                "identity_distance": q["identity_distance"], "ssim": q["ssim"],
                "landmark_displacement": q["landmark_displacement"], "p_before": q["p_before"],
                "p_after": q["p_after"], "source_path": str(root / e["source_path"]),
                "edit_path": str(edit_dir / e["edit_path"]),
            })
    return items
