"""The papers' tables from the experiments' evaluations: one table per paper table, experiment rows beside the
published rows, deltas to each table's reference experiment, and the complexity table.

Inputs are plain records, no Dagster: for each experiment, its ``results.parquet`` rows (``training.eval.report``'s
schema) or the reason there are none; the baselines' rows; the run record of each experiment (fingerprint, base
model, steps). :func:`paper_tables` lays them out as :class:`training.eval.report.Table` objects, so the report's
markdown/HTML rendering, footnotes and caveat marks are the evaluation report's.

- A row is an experiment whose ``tables`` name the table. An experiment that was not evaluated is a row of n/a
  cells saying why; one with the fingerprint of an evaluated experiment shows that experiment's numbers ("same run
  as ...") -- it trained once.
- Ablation tables carry, in every cell, the difference to the table's reference experiment (the papers' reading of
  an ablation: what removing or adding a part changes).
- Cells of models trained on a tiny random base, or not trained at all, are marked as such in the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from training.eval.report import ATTRIBUTE, LABELS, NR_METRICS, PUBLISHED, Cell, Table

RESTORATION = "restoration"
ATTRIBUTE_TABLE = "attribute"


@dataclass(frozen=True)
class PaperTable:
    """One table of a paper: which set and levels, which (table, metric) columns, which rows."""

    id: str
    title: str
    model: str  # a2bfr | roboface: whose experiments are its rows
    set: str
    columns: tuple[tuple[str, str], ...]  # (report table, metric)
    levels: tuple[str, ...] | None = None  # None: every level of the set (one column group per level)
    reference: str | None = None  # the experiment deltas are taken against (ablation tables)
    baselines: tuple[str, ...] = ()  # baseline methods shown as rows (plus external folders when baselines is set)
    published: tuple[str, ...] = ()  # Published.method names whose rows of this set/table kind are shown


R_GT = tuple((RESTORATION, m) for m in ("ids", "fid", "lpips", "psnr", "ssim", *NR_METRICS))
ABLATION_A2BFR = ((RESTORATION, "ids"), (RESTORATION, "lpips"), (ATTRIBUTE_TABLE, "aa"), (ATTRIBUTE_TABLE, "lpips"),
                  (ATTRIBUTE_TABLE, "cp_ids"))
ABLATION_ROBOFACE = ((RESTORATION, "fid"), (RESTORATION, "lpips"), (RESTORATION, "maniqa"),
                     (RESTORATION, "clipiqa"))

PAPER_TABLES: tuple[PaperTable, ...] = (
    # A²BFR evaluates its test split under its training degradation: the set's "train" level
    PaperTable("a2bfr_tab2", "A²BFR Tab. 2 · restoration on the AttrFace test split", "a2bfr", "attrface_test",
               R_GT, levels=("train",), baselines=("bicubic", "identity"), published=("A²BFR",)),
    PaperTable("a2bfr_tab3", "A²BFR Tab. 3 · attribute-controlled restoration (target prompts)", "a2bfr",
               "attrface_test", tuple((ATTRIBUTE_TABLE, m) for m in ATTRIBUTE), levels=("train",),
               baselines=("restore_then_edit",), published=("A²BFR",)),
    PaperTable("a2bfr_tab4", "A²BFR Tab. 4 · ablation of the attribute-aware loss and semantic dual-training",
               "a2bfr", "attrface_test", ABLATION_A2BFR, levels=("train",), reference="baseline"),
    PaperTable("a2bfr_tab5", "A²BFR Tab. 5 · training data: real HQ faces only against the AttrFace pairs", "a2bfr",
               "attrface_test", ABLATION_A2BFR, levels=("train",), reference="ffhq_only"),
    PaperTable("roboface_tab2", "RoboFace Tab. 2 · CelebA-Test at three degradation levels", "roboface",
               "celeba_test_levels", ABLATION_ROBOFACE, baselines=("bicubic", "identity"), published=("RoboFace",)),
    PaperTable("roboface_tab3", "RoboFace Tab. 3 · real low-quality faces", "roboface", "real_lq",
               ((RESTORATION, "fid"), (RESTORATION, "clipiqa"), (RESTORATION, "maniqa")),
               baselines=("bicubic", "identity")),
    PaperTable("roboface_tab5", "RoboFace Tab. 5 · explicit and implicit text", "roboface", "celeba_test_levels",
               ABLATION_ROBOFACE[:2], reference="full"),
    PaperTable("roboface_tab6", "RoboFace Tab. 6 · order of the decoupled cross-attention", "roboface",
               "celeba_test_levels", ABLATION_ROBOFACE[:2], reference="full"),
    PaperTable("roboface_tab7", "RoboFace Tab. 7 · captioner", "roboface", "celeba_test_levels",
               ABLATION_ROBOFACE[:2], reference="full"),
    PaperTable("roboface_tab8", "RoboFace Tab. 8 · the Remover", "roboface", "celeba_test_levels",
               ABLATION_ROBOFACE[:2], reference="full"),
    PaperTable("roboface_tab9", "RoboFace Tab. 9 · number of implicit tokens N", "roboface", "celeba_test_levels",
               ABLATION_ROBOFACE[:2], reference="full"),
)
BUILT_IN_BASELINES = ("bicubic", "identity", "restore_then_edit")


@dataclass
class ExperimentResult:
    """What one experiment's evaluation left: its result rows, or why there are none."""

    name: str
    fingerprint: str | None
    rows: list[dict] = field(default_factory=list)
    missing: str = ""  # why there are no rows (not selected, not trained, not evaluated)
    caveat: str = ""  # why its numbers are not comparable with the papers' (tiny base, untrained)


def _index(rows: Sequence[dict]) -> dict[tuple[str, str, str, str, str], dict]:
    return {(r["set"], r["level"], r["method"], r["table"], r["metric"]): r for r in rows}


def _cell(index: dict, key: tuple) -> Cell:
    row = index.get(key)
    if row is None:
        return Cell(None, note="not measured in this evaluation (metric or set not configured)")
    value = row["value"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell(None, note=row.get("note") or "no value")
    return Cell(float(value), int(row.get("n") or 0), row.get("note") or "")


def _levels(table: PaperTable, results: Sequence[ExperimentResult], baseline_rows: Sequence[dict]) -> list[str]:
    if table.levels:
        return list(table.levels)
    found = [r["level"] for res in results for r in res.rows if r["set"] == table.set]
    found += [r["level"] for r in baseline_rows if r["set"] == table.set]
    return list(dict.fromkeys(found)) or ["(not built)"]


def _column_key(kind: str, metric: str, level: str, multi: bool) -> str:
    return f"{kind}:{metric}" + (f"@{level}" if multi else "")


def _label(kind: str, metric: str, level: str, multi: bool) -> str:
    label = LABELS.get(metric, metric)
    if kind == ATTRIBUTE_TABLE and metric in ("lpips", "sc"):
        label += " (target)"
    return label + (f" · {level}" if multi else "")


def paper_tables(experiments: Sequence, results: dict[str, ExperimentResult], baseline_rows: Sequence[dict],
                 baseline_notes: dict[str, str] | None = None, model: str | None = None) -> list[Table]:
    """One :class:`Table` per paper table of ``model`` (both papers when None).

    ``experiments``: the defined :class:`training.experiments.Experiment` objects; ``results``: each experiment's
    evaluation by name (an experiment absent from it is "not run"); ``baseline_rows``: result rows of the baseline
    methods; ``baseline_notes``: method -> caveat."""
    tables = []
    baseline_index = _index(baseline_rows)
    for spec in PAPER_TABLES:
        if model is not None and spec.model != model:
            continue
        rows_exps = [e for e in experiments if e.model == spec.model and spec.id in e.tables]
        by_fingerprint = {r.fingerprint: r for r in results.values() if r.rows and r.fingerprint}
        resolved: dict[str, tuple[str, ExperimentResult | None]] = {}
        for exp in rows_exps:
            res, label = results.get(exp.name), exp.name
            if res is not None and not res.rows and res.fingerprint in by_fingerprint:
                same = by_fingerprint[res.fingerprint]  # trained once under another name: its numbers
                res = ExperimentResult(exp.name, res.fingerprint, same.rows, caveat=same.caveat)
                label = f"{exp.name} (= {same.name}: same run)"
            resolved[exp.name] = (label, res)
        levels = _levels(spec, [res for _, res in resolved.values() if res is not None], baseline_rows)
        multi = len(levels) > 1
        columns, labels = [], {}
        for level in levels:
            for kind, metric in spec.columns:
                key = _column_key(kind, metric, level, multi)
                columns.append(key)
                labels[key] = _label(kind, metric, level, multi)
        table = Table(spec.title, columns, [], labels=labels)
        for p in PUBLISHED:
            if p.method in spec.published and p.set == spec.set:
                cells = {}
                for level in levels:
                    if p.level not in (None, level):
                        continue
                    for kind, metric in spec.columns:
                        if p.table == kind and metric in p.values:
                            cells[_column_key(kind, metric, level, multi)] = Cell(p.values[metric])
                if cells:
                    table.rows.append((f"{p.method}, {p.table} (published)", cells))  # styled as published
        reference_cells: dict[str, Cell] = {}
        exp_rows = []
        for exp in rows_exps:
            label, res = resolved[exp.name]
            cells = {}
            for level in levels:
                for kind, metric in spec.columns:
                    key = _column_key(kind, metric, level, multi)
                    if res is None:
                        cells[key] = Cell(None, note=f"experiment {exp.model}/{exp.name} was not run")
                    elif not res.rows:
                        cells[key] = Cell(None, note=res.missing or "no results")
                    else:
                        cells[key] = _cell(_index(res.rows), (spec.set, level, spec.model, kind, metric))
            exp_rows.append((label, cells, res))
            if exp.name == spec.reference:
                reference_cells = cells
        for label, cells, res in exp_rows:
            if spec.reference and reference_cells and cells is not reference_cells:
                for key, cell in cells.items():
                    ref = reference_cells.get(key)
                    if cell.value is not None and ref is not None and ref.value is not None:
                        cell.delta = cell.value - ref.value
            table.rows.append((label, cells))
            if res is not None and res.caveat:
                table.row_notes[label] = res.caveat
        externals = sorted({r["method"] for r in baseline_rows} - set(BUILT_IN_BASELINES)) if spec.baselines else []
        for name in [*spec.baselines, *externals]:
            cells = {}
            for level in levels:
                for kind, metric in spec.columns:
                    key = _column_key(kind, metric, level, multi)
                    cells[key] = (_cell(baseline_index, (spec.set, level, name, kind, metric)) if baseline_rows else
                                  Cell(None, note="baselines not evaluated (materialize baseline_eval)"))
            label = name if name in spec.baselines else f"{name} (external)"
            table.rows.append((label, cells))
            if (baseline_notes or {}).get(name):
                table.row_notes[label] = baseline_notes[name]
        if spec.reference:
            table.title += f" · deltas to {spec.reference}"
        tables.append(table)
    return tables
