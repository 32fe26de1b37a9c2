"""The papers' tables from the experiments' evaluations: every published row of both papers' numeric tables, our
experiments beside the paper row each stands for, deltas to each ablation's reference experiment and to the published
number, and what each experiment's training changed.

Inputs are plain records, no Dagster: for each experiment, its ``results.parquet`` rows (``training.eval.report``'s
schema) or the reason there are none, its trained weights' folder and loss rows; the baselines' rows.
:func:`paper_tables` lays them out as :class:`training.eval.report.Table` objects, so the report's markdown/HTML
rendering, footnotes and caveat marks are the evaluation report's.

- The published rows come from ``configs/published_tables.yaml`` alone (:func:`load_published`): A²BFR Tab. 1-5
  and RoboFace Tab. 1-10 as printed, every method, set and level; its ``# check`` remarks (cells where a paper
  looks inconsistent) become footnotes. A paper table over several test sets or degradation levels is one table per
  set. Where a set of ours stands for the paper's (``PaperTable.groups``: attrface_test for AttrFace-90K-Test,
  celeba_test_levels' train / partial_ood / ood levels for RoboFace's three CelebA-Test levels, real_lq for the
  real-photo sets), our rows are beside the published ones; a table no experiment of ours is a row of is shown
  as published.
- A row of ours is an experiment whose ``tables`` name the table. Its ``paper_row`` (``configs/experiments.yaml``)
  names the published row it stands for: it is placed below that row, and each cell where both have a number also
  shows ours minus the published one. An experiment that was not evaluated is a row of n/a cells saying why; one
  with the fingerprint of an evaluated experiment shows that experiment's numbers ("same run as ...").
- Ablation tables carry, in every cell of ours, the difference to the table's reference experiment (the papers'
  reading of an ablation: what removing or adding a part changes).
- Cells of models trained on a tiny random base, or not trained at all, are marked as such in the table.
- :func:`training_table`: per model, each experiment's final loss and trained weights against the reference
  experiment's: whether an ablation switch changed the training at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.eval.report import LABELS, Cell, Table

RESTORATION = "restoration"
ATTRIBUTE_TABLE = "attribute"
PAPERS = {"a2bfr": "A²BFR", "roboface": "RoboFace"}  # paper id -> its own method's row label in the paper's tables
# the papers' metric names -> ours, per table of our evaluation; a paper metric absent here is not measured by us
PAPER_METRICS: dict[str, dict[str, str]] = {
    RESTORATION: {"IDS": "ids", "FID": "fid", "LPIPS": "lpips", "HyperIQA": "hyperiqa", "TopIQ": "topiq",
                  "MANIQA": "maniqa", "MUSIQ": "musiq", "CLIPIQA": "clipiqa", "SC": "sc"},
    ATTRIBUTE_TABLE: {"SC": "sc", "AA": "aa", "LPIPS": "lpips", "CP-IDS": "cp_ids"},
}
GT_METRICS = ("psnr", "ssim", "lpips", "ids")  # need a ground truth: not measured on real low-quality photos
NO_GT_SETS = ("real_lq",)
ARROWS = {"up": "↑", "down": "↓", None: ""}
LABEL_KEYS = ("method", "dataset")  # what names a published row (RoboFace Tab. 1's rows are named by their set)
RENDERED_ELSEWHERE = ("roboface_tab10",)  # the complexity table (attrface_pipeline.assets.reproduce)


# --- the published tables ------------------------------------------------------------------------------------------
class PublishedTablesError(ValueError):
    """The published tables' file cannot be used: one line naming the file and what is wrong."""


@dataclass(frozen=True)
class PublishedRow:
    label: str  # the method (or dataset) as the paper names it
    set: str | None  # the test set / degradation level as the paper names it; None: the table has no sets
    values: dict[str, float]  # metric -> number
    printed: dict[str, str]  # metric or other column -> the cell as printed (trailing zeros kept, [a, b] as a-b)
    check: str = ""  # the file's `# check` remark on this row: where the paper looks inconsistent


@dataclass(frozen=True)
class PublishedTable:
    id: str
    paper: str
    number: int
    caption: str
    metrics: dict[str, str | None]  # metric -> up | down | None (no direction printed)
    rows: tuple[PublishedRow, ...]
    fields: tuple[str, ...] = ()  # the other columns (text), in order of appearance
    checks: tuple[str, ...] = ()  # `# check` remarks on the whole table

    @property
    def name(self) -> str:
        return f"{PAPERS.get(self.paper, self.paper)} Tab. {self.number}"

    @property
    def sets(self) -> list[str | None]:
        return list(dict.fromkeys(r.set for r in self.rows))


def published_file() -> Path:
    """``configs/published_tables.yaml`` (shipped with the package: ``attrface_pipeline.config.CONFIGS_DIR``)."""
    from attrface_pipeline.config import CONFIGS_DIR

    return CONFIGS_DIR / "published_tables.yaml"


class _Bad(ValueError):
    pass


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_remark(text: str) -> str:
    comment = text.split("#", 1)[1].strip() if "#" in text else ""
    return comment[len("check"):].lstrip(" :") if comment.startswith("check") else ""


def _shown(value: Any, node: Any) -> str:
    """A published cell as printed: numbers as written in the file (the YAML node's text), [a, b] as a-b."""
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, list):
        return "–".join(getattr(n, "value", str(v)) for v, n in zip(value, getattr(node, "value", value)))
    if isinstance(value, dict):
        return ", ".join(f"{k} {'✓' if v is True else '✗' if v is False else v}" for k, v in value.items())
    return str(getattr(node, "value", value)) if _number(value) else str(value)


def _row(data: Any, node: Any, metrics: dict, where: str, lines: list[str]) -> PublishedRow:
    if not isinstance(data, dict):
        raise _Bad(f"{where}: must be a mapping (method, set and the metrics' values)")
    label = next((data[k] for k in LABEL_KEYS if k in data), None)
    row_set = data.get("set")
    named_by_set = label is None
    if named_by_set:
        label, row_set = row_set, None
    if not isinstance(label, str) or not label:
        raise _Bad(f"{where}: needs a method (or dataset) name as text")
    if row_set is not None and not isinstance(row_set, str):
        raise _Bad(f"{where}: set: must be text, got {row_set!r}")
    nodes = {k.value: v for k, v in getattr(node, "value", [])}
    values: dict[str, float] = {}
    printed: dict[str, str] = {}
    for key, value in data.items():
        if key in LABEL_KEYS or key == "set":
            continue
        if key in metrics:
            is_range = isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)
            if not _number(value) and not is_range:
                raise _Bad(f"{where}: {key}: must be a number (or a [min, max] range), got {value!r}")
            if not is_range:
                values[key] = float(value)
        elif not isinstance(value, (str, int, float, bool, dict)):
            raise _Bad(f"{where}: {key}: must be text, a number, true/false or a mapping, got {value!r}")
        printed[key] = _shown(value, nodes.get(key))
    if not any(k in metrics for k in printed):
        raise _Bad(f"{where}: no value of the table's metrics ({', '.join(metrics)})")
    end = getattr(node, "end_mark", None)
    check = _check_remark(lines[end.line][end.column:]) if end is not None and end.line < len(lines) else ""
    return PublishedRow(label, row_set, values, printed, check)


def _table(data: Any, node: Any, papers: dict, where: str, lines: list[str]) -> PublishedTable:
    if not isinstance(data, dict):
        raise _Bad(f"{where}: must be a mapping (id, paper, number, caption, metrics, rows)")
    table_id = data.get("id")
    if not isinstance(table_id, str) or not table_id:
        raise _Bad(f"{where}: id: must be text")
    where = f"{where} ({table_id})"
    if data.get("paper") not in papers:
        raise _Bad(f"{where}: paper: {data.get('paper')!r} is not one of papers ({', '.join(map(str, papers))})")
    if not _number(data.get("number")) or not isinstance(data["number"], int):
        raise _Bad(f"{where}: number: must be the table's number, got {data.get('number')!r}")
    if not isinstance(data.get("caption"), str):
        raise _Bad(f"{where}: caption: must be text")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics or any(
            not isinstance(k, str) or v not in ARROWS for k, v in metrics.items()):
        raise _Bad(f"{where}: metrics: must map each metric to up, down or null")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise _Bad(f"{where}: rows: must be a non-empty list")
    nodes = {k.value: v for k, v in node.value}
    parsed: list[PublishedRow] = []
    for i, (row, row_node) in enumerate(zip(rows, nodes["rows"].value)):
        parsed.append(_row(row, row_node, metrics, f"{where} rows[{i}]", lines))
        named_by = next((k for k in (*LABEL_KEYS, "set") if k in row), None)
        first = next((k for k in (*LABEL_KEYS, "set") if k in rows[0]), None)
        if named_by != first:
            raise _Bad(f"{where} rows[{i}]: named by {named_by!r}, the table's first row by {first!r}")
        if any((p.label, p.set) == (parsed[-1].label, parsed[-1].set) for p in parsed[:-1]):
            raise _Bad(f"{where} rows[{i}]: {parsed[-1].label!r}" + (f" on {parsed[-1].set!r}" if parsed[-1].set
                                                                     else "") + " is given twice")
    checks: list[str] = []  # a `# check` comment and the comment lines right after it
    in_check = False
    for line in lines[node.start_mark.line:nodes["rows"].start_mark.line]:
        comment = line.strip().startswith("#")
        if line.strip().startswith("# check"):
            checks.append(_check_remark(line))
        elif in_check and comment:
            checks[-1] += " " + line.strip().lstrip("#").strip()
        in_check = comment and bool(checks)
    fields = tuple(dict.fromkeys(k for r in parsed for k in r.printed if k not in metrics))
    return PublishedTable(table_id, data["paper"], data["number"], data["caption"], dict(metrics), tuple(parsed),
                          fields, tuple(checks))


_LOADED: dict[tuple, dict[str, PublishedTable]] = {}  # (file, mtime, size) -> its tables: read once per version


def load_published(path: str | Path | None = None) -> dict[str, PublishedTable]:
    """The papers' tables by id, from ``path`` (default :func:`published_file`), validated: a file that cannot be
    used raises :class:`PublishedTablesError`, one line naming the file and the table, row and key at fault."""
    import yaml

    from attrface_pipeline.config import YAMLFileError, read_yaml

    path = Path(path) if path is not None else published_file()
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key in _LOADED:
        return _LOADED[key]
    try:
        data = read_yaml(path)
    except YAMLFileError as err:
        raise PublishedTablesError(f"{err} (the papers' published tables)") from None
    try:
        if not isinstance(data, dict) or not isinstance(data.get("tables"), list) or not data["tables"]:
            raise _Bad("must be a mapping with `papers` and a non-empty list `tables`")
        papers = data.get("papers")
        if not isinstance(papers, dict) or not papers:
            raise _Bad("papers: must map each paper id to its title")
        text = path.read_text(encoding="utf-8-sig")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        lines = text.splitlines()
        table_nodes = {k.value: v for k, v in root.value}["tables"].value
        out: dict[str, PublishedTable] = {}
        for i, (table, node) in enumerate(zip(data["tables"], table_nodes)):
            parsed = _table(table, node, papers, f"tables[{i}]", lines)
            if parsed.id in out:
                raise _Bad(f"tables[{i}] ({parsed.id}): id given twice")
            out[parsed.id] = parsed
    except _Bad as err:
        raise PublishedTablesError(f"{path}: {err}") from None
    if key is not None:
        _LOADED[key] = out
    return out


# --- our rows beside them ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperTable:
    """How one paper table gets rows of ours: which of our benchmark sets stands for which of the paper's sets,
    which of our evaluation tables its metrics are read from, the columns of ours it adds, its reference."""

    id: str
    title: str
    model: str  # a2bfr | roboface: whose experiments are its rows
    kind: str  # restoration | attribute: the table of our evaluation its metrics are read from
    groups: tuple[tuple[str, str, str], ...]  # (the paper's set, our set, our level standing for it)
    extra: tuple[tuple[str, str], ...] = ()  # (report table, metric) we measure and the paper does not report
    reference: str | None = None  # the experiment deltas are taken against (ablation tables)
    baselines: tuple[str, ...] = ()  # baseline methods shown as rows (plus external folders when baselines is set)


CELEBA_LEVELS = (("CelebA-Test (FID=110.50)", "celeba_test_levels", "train"),
                 ("CelebA-Test (FID=199.68)", "celeba_test_levels", "partial_ood"),
                 ("CelebA-Test (FID=262.42)", "celeba_test_levels", "ood"))
WIDER = ("WIDER-Test", "real_lq", "real")
ATTRFACE = (("AttrFace-90K-Test", "attrface_test", "train"),)  # A²BFR: its test split under its training degradation
R_EXTRA = ((RESTORATION, "ids"), (RESTORATION, "lpips"), (ATTRIBUTE_TABLE, "cp_ids"))

PAPER_TABLES: tuple[PaperTable, ...] = (
    PaperTable("a2bfr_tab2", "A²BFR Tab. 2 · restoration", "a2bfr", RESTORATION,
               (*ATTRFACE, ("CelebRef-HQ-Test", "celeba_test_levels", "train"), ("Wider-Test", "real_lq", "real")),
               extra=((RESTORATION, "psnr"), (RESTORATION, "ssim"), (RESTORATION, "fid"), (RESTORATION, "clipiqa")),
               baselines=("bicubic", "identity")),
    PaperTable("a2bfr_tab3", "A²BFR Tab. 3 · attribute-controlled restoration (target prompts)", "a2bfr",
               ATTRIBUTE_TABLE, ATTRFACE, baselines=("restore_then_edit",)),
    PaperTable("a2bfr_tab4", "A²BFR Tab. 4 · ablation of the attribute-aware loss and semantic dual-training",
               "a2bfr", ATTRIBUTE_TABLE, ATTRFACE, R_EXTRA, reference="baseline"),
    PaperTable("a2bfr_tab5", "A²BFR Tab. 5 · training data: real HQ faces only against the AttrFace pairs", "a2bfr",
               ATTRIBUTE_TABLE, ATTRFACE, R_EXTRA, reference="ffhq_only"),
    PaperTable("roboface_tab2", "RoboFace Tab. 2 · CelebA-Test at three degradation levels", "roboface", RESTORATION,
               CELEBA_LEVELS, ((RESTORATION, "psnr"), (RESTORATION, "ssim"), (RESTORATION, "ids")),
               baselines=("bicubic", "identity")),
    PaperTable("roboface_tab3", "RoboFace Tab. 3 · real low-quality faces", "roboface", RESTORATION, (WIDER,),
               ((RESTORATION, "maniqa"),), baselines=("bicubic", "identity")),
    PaperTable("roboface_tab5", "RoboFace Tab. 5 · explicit and implicit text", "roboface", RESTORATION,
               (*CELEBA_LEVELS, WIDER), reference="full"),
    PaperTable("roboface_tab6", "RoboFace Tab. 6 · order of the decoupled cross-attention", "roboface", RESTORATION,
               (*CELEBA_LEVELS, WIDER), reference="full"),
    PaperTable("roboface_tab7", "RoboFace Tab. 7 · captioner", "roboface", RESTORATION, (*CELEBA_LEVELS, WIDER),
               reference="full"),
    PaperTable("roboface_tab8", "RoboFace Tab. 8 · the Remover", "roboface", RESTORATION, (*CELEBA_LEVELS, WIDER),
               reference="full"),
    PaperTable("roboface_tab9", "RoboFace Tab. 9 · number of implicit tokens N", "roboface", RESTORATION,
               (*CELEBA_LEVELS, WIDER), reference="full"),
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
    weights: str | None = None  # the folder of its trained weights (the checkpoint it was evaluated with)
    losses: list[dict] = field(default_factory=list)  # its losses.jsonl rows


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


def _label(kind: str, metric: str) -> str:
    label = LABELS.get(metric, metric)
    return label + " (target)" if kind == ATTRIBUTE_TABLE and metric in ("lpips", "sc") else label


def _columns(published: PublishedTable, spec: PaperTable | None, paper_set: str | None, ours: tuple | None
             ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(column keys, labels, column -> the paper's metric or field) of one set of a paper table: the paper's
    metrics printed for that set (ours where we measure them), the columns of ours it adds, the paper's text
    columns."""
    rows = [r for r in published.rows if r.set == paper_set]
    columns: list[str] = []
    labels: dict[str, str] = {}
    source: dict[str, str] = {}
    for name, direction in published.metrics.items():
        if not any(name in r.printed for r in rows):
            continue
        ours_metric = PAPER_METRICS.get(spec.kind, {}).get(name) if spec else None
        key = f"{spec.kind}:{ours_metric}" if ours_metric else f"paper:{name}"
        columns.append(key)
        labels[key] = _label(spec.kind, ours_metric) if ours_metric else name + ARROWS[direction]
        source[key] = name
    for kind, metric in (spec.extra if spec and ours else ()):
        key = f"{kind}:{metric}"
        if key not in columns and not (ours[0] in NO_GT_SETS and metric in GT_METRICS):
            columns.append(key)
            labels[key] = _label(kind, metric)
    for name in published.fields:
        if any(name in r.printed for r in rows):
            columns.append(f"field:{name}")
            labels[f"field:{name}"] = name
            source[f"field:{name}"] = name
    return columns, labels, source


def _published_cells(row: PublishedRow, source: dict[str, str]) -> dict[str, Cell]:
    cells = {}
    for key, name in source.items():
        if name in row.values:
            cells[key] = Cell(row.values[name], text=row.printed[name])
        elif name in row.printed:
            cells[key] = Cell(None, text=row.printed[name])
    return cells


def _paper_rows(experiment: Any) -> dict[str, str]:
    return dict(getattr(experiment, "paper_row", None) or {})


def _resolve(rows_exps: Sequence, results: dict[str, ExperimentResult]
             ) -> dict[str, tuple[str, ExperimentResult | None]]:
    """Each experiment's row label and evaluation; a name with the fingerprint of an evaluated experiment borrows
    its numbers (it trained once)."""
    by_fingerprint = {r.fingerprint: r for r in results.values() if r.rows and r.fingerprint}
    resolved: dict[str, tuple[str, ExperimentResult | None]] = {}
    for exp in rows_exps:
        res, label = results.get(exp.name), exp.name
        if res is not None and not res.rows and res.fingerprint in by_fingerprint:
            same = by_fingerprint[res.fingerprint]
            res = ExperimentResult(exp.name, res.fingerprint, same.rows, caveat=same.caveat, weights=same.weights,
                                   losses=same.losses)
            label = f"{exp.name} (= {same.name}: same run)"
        resolved[exp.name] = (label, res)
    return resolved


def _our_cells(spec: PaperTable, columns: list[str], source: dict[str, str], ours: tuple[str, str],
               exp: Any, res: ExperimentResult | None) -> dict[str, Cell]:
    index = _index(res.rows) if res is not None and res.rows else {}
    cells = {}
    for key in columns:
        kind, metric = key.split(":", 1)
        if kind == "field":
            continue
        if res is None:
            cells[key] = Cell(None, note=f"experiment {exp.model}/{exp.name} was not run")
        elif not res.rows:
            cells[key] = Cell(None, note=res.missing or "no results")
        elif kind == "paper":
            where = " under the target prompts" if spec.kind == ATTRIBUTE_TABLE else ""
            cells[key] = Cell(None, note=f"{source[key]}: not measured by this project's evaluation{where}")
        else:
            cells[key] = _cell(index, (ours[0], ours[1], spec.model, kind, metric))
    return cells


def _group(spec: PaperTable | None, published: PublishedTable, paper_set: str | None, rows_exps: Sequence,
           resolved: dict, baseline_rows: Sequence[dict], baseline_notes: dict[str, str]) -> Table:
    ours = next(((s, lv) for p, s, lv in spec.groups if p == paper_set), None) if spec else None
    columns, labels, source = _columns(published, spec, paper_set, ours)
    title = (spec.title if spec else f"{published.name} · {published.caption}") + (
        f" · {paper_set}" if paper_set else "") + (f" · deltas to {spec.reference}" if spec and spec.reference
                                                   and ours else "")
    table = Table(title, columns, [], labels=labels)
    published_rows = [r for r in published.rows if r.set == paper_set]
    names = {r.label for r in published_rows}
    our_rows: dict[str, list[tuple[str, dict[str, Cell], ExperimentResult | None]]] = {}
    reference_cells: dict[str, Cell] = {}
    for exp in rows_exps if ours else ():
        label, res = resolved[exp.name]
        cells = _our_cells(spec, columns, source, ours, exp, res)
        paper_row = _paper_rows(exp).get(spec.id)
        our_rows.setdefault(paper_row if paper_row in names else "", []).append((label, cells, res))
        if paper_row and paper_row not in names:
            table.row_notes[label] = (f"its paper_row {paper_row!r} is not a row of {published.name} on "
                                      f"{paper_set or 'its set'} (rows: {', '.join(sorted(names))})")
        if exp.name == spec.reference:
            reference_cells = cells
    for mine in our_rows.values():
        for _, cells, _ in mine:
            if spec.reference and reference_cells and cells is not reference_cells:
                for key, cell in cells.items():
                    ref = reference_cells.get(key)
                    if cell.value is not None and ref is not None and ref.value is not None:
                        cell.delta = cell.value - ref.value

    def add_ours(group: str, row: PublishedRow | None) -> None:
        for label, cells, res in our_rows.get(group, []):
            if row is not None:
                for key, cell in cells.items():
                    value = row.values.get(source.get(key, ""))
                    if cell.value is not None and value is not None:
                        cell.vs_published = cell.value - value
            table.rows.append((label, cells))
            if res is not None and res.caveat:
                table.row_notes[label] = "; ".join(filter(None, (table.row_notes.get(label), res.caveat)))

    # an ablation's published rows carry the difference to the published row its reference experiment stands for
    reference_exp = next((e for e in rows_exps if spec and e.name == spec.reference), None)
    reference_row = next((r for r in published_rows if reference_exp is not None
                          and r.label == _paper_rows(reference_exp).get(spec.id)), None)
    for row in published_rows:
        label = f"{row.label} (published)"
        cells = _published_cells(row, source)
        if reference_row is not None and row is not reference_row:
            for key, cell in cells.items():
                value = reference_row.values.get(source.get(key, ""))
                if cell.value is not None and value is not None:
                    cell.delta = cell.value - value
        table.rows.append((label, cells))
        if row.check:
            table.row_notes[label] = f"as printed; the paper looks inconsistent here: {row.check}"
        add_ours(row.label, row)
    add_ours("", None)
    if ours and spec.baselines:
        baseline_index = _index(baseline_rows)
        externals = sorted({r["method"] for r in baseline_rows} - set(BUILT_IN_BASELINES))
        for name in [*spec.baselines, *externals]:
            cells = {key: (_cell(baseline_index, (ours[0], ours[1], name, *key.split(":", 1))) if baseline_rows else
                           Cell(None, note="baselines not evaluated (materialize baseline_eval)"))
                     for key in columns if key.split(":", 1)[0] in (RESTORATION, ATTRIBUTE_TABLE)}
            label = name if name in spec.baselines else f"{name} (external)"
            table.rows.append((label, cells))
            if baseline_notes.get(name):
                table.row_notes[label] = baseline_notes[name]
    if ours:
        table.notes.append(f"Rows of ours: measured on our {ours[0]} set at level {ours[1]}, standing for the "
                           f"paper's {paper_set or 'set'}.")
    elif spec:
        table.notes.append(f"No set of ours stands for {paper_set}: the published rows only.")
    else:
        table.notes.append("Published only: no experiment of ours is a row of this table.")
    table.notes += [f"As printed; the paper looks inconsistent here: {c}" for c in published.checks]
    return table


def paper_tables(experiments: Sequence, results: dict[str, ExperimentResult], baseline_rows: Sequence[dict],
                 baseline_notes: dict[str, str] | None = None, model: str | None = None,
                 published: dict[str, PublishedTable] | None = None) -> list[Table]:
    """The tables of ``model``'s paper (both papers when None), in the paper's order, one per test set of each: every
    published row, and where a set of ours stands for the paper's, the rows of ours (see the module docstring).

    ``experiments``: the defined :class:`training.experiments.Experiment` objects; ``results``: each experiment's
    evaluation by name (an experiment absent from it is "not run"); ``baseline_rows``: result rows of the baseline
    methods; ``baseline_notes``: method -> caveat; ``published``: :func:`load_published`'s tables (default: the
    shipped file). RoboFace Tab. 10 is the complexity table's (:func:`add_published_complexity`)."""
    published = load_published() if published is None else published
    specs = {s.id: s for s in PAPER_TABLES}
    tables = []
    for table_id, pub in published.items():
        if (model is not None and pub.paper != model) or table_id in RENDERED_ELSEWHERE:
            continue
        spec = specs.get(table_id)
        rows_exps = [e for e in experiments if spec and e.model == spec.model and spec.id in e.tables]
        resolved = _resolve(rows_exps, results)
        for paper_set in pub.sets:
            tables.append(_group(spec, pub, paper_set, rows_exps, resolved, baseline_rows, baseline_notes or {}))
    return tables


def published_cells(set_name: str, level: str, kind: str, published: dict[str, PublishedTable] | None = None
                    ) -> list[tuple[str, dict[str, Cell], str]]:
    """The papers' own published rows (A²BFR's, RoboFace's) of the comparison tables whose set ``set_name`` at
    ``level`` stands for, keyed by our metric names: (row label, cells, the paper table and set) -- the evaluation
    report's published rows."""
    published = load_published() if published is None else published
    out = []
    for spec in PAPER_TABLES:
        pub = published.get(spec.id)
        if spec.reference or spec.kind != kind or pub is None:
            continue
        for paper_set, ours_set, ours_level in spec.groups:
            if (ours_set, ours_level) != (set_name, level):
                continue
            for row in pub.rows:
                if row.set == paper_set and row.label == PAPERS[pub.paper]:
                    cells = {PAPER_METRICS[kind][m]: Cell(v, text=row.printed[m]) for m, v in row.values.items()
                             if m in PAPER_METRICS[kind]}
                    out.append((f"{row.label} (published)", cells, f"{pub.name}, {paper_set}"))
    return out


# --- the complexity table ------------------------------------------------------------------------------------------
COMPLEXITY = {"Params_M": ("params", 1e-3), "FLOPs_G": ("flops_g", 1.0), "InferenceTime_s": ("s_per_face", 1.0)}


def add_published_complexity(table: Table, published: dict[str, PublishedTable] | None = None) -> Table:
    """RoboFace Tab. 10's published rows added to the complexity table (parameters converted from millions to
    billions, the paper's inference time in the s/face column, FLOPs as a column of their own); a row of ours named
    ``<published method> (<base model>)`` also shows its difference to the published number."""
    published = load_published() if published is None else published
    pub = published["roboface_tab10"]
    if "flops_g" not in table.columns:
        table.columns.append("flops_g")
        table.labels["flops_g"] = "FLOPs (G)"
    rows: list[tuple[str, dict[str, Cell]]] = []
    for row in pub.rows:
        cells = {col: Cell(row.values[name] * scale, text=row.printed[name] if scale == 1 else "")
                 for name, (col, scale) in COMPLEXITY.items() if name in row.values}
        rows.append((f"{row.label} (published)", cells))
    by_method = {row.label: row for row in pub.rows}
    for label, cells in table.rows:
        row = by_method.get(label.split(" (")[0])
        cells.setdefault("flops_g", Cell(None, note="FLOPs are not measured by this project"))
        if row is None or "this profile" in label:
            continue
        for name, (col, scale) in COMPLEXITY.items():
            cell = cells.get(col)
            if cell is not None and cell.value is not None and name in row.values:
                cell.vs_published = cell.value - row.values[name] * scale
    table.rows[:0] = rows
    table.notes.append(f"Rows marked (published): {pub.name}, as printed but for the parameters (printed in "
                       f"millions); its inference time is the paper's per-image runtime (no hardware, resolution or "
                       f"set given).")
    return table


# --- what training changed -----------------------------------------------------------------------------------------
def final_loss(losses: Sequence[dict]) -> float | None:
    """The mean loss over the last tenth of the logged steps (at least one): the end of the curve, less noisy than
    its last point."""
    values = [float(r["loss"]) for r in losses if isinstance(r.get("loss"), (int, float))
              and math.isfinite(r["loss"])]
    if not values:
        return None
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


def _tensors(folder: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            out[f"{path.relative_to(folder)}:{name}"] = tensor
    return out


def weights_distance(a: str | Path, b: str | Path) -> tuple[float, float, int, int]:
    """(L2 distance, largest absolute difference, tensors compared, tensors only one side has) between the trained
    weights of two folders (every ``*.safetensors`` in them, tensors matched by file and name)."""
    import torch

    ta, tb = _tensors(a), _tensors(b)
    common = [k for k in ta if k in tb and ta[k].shape == tb[k].shape]
    squares, largest = 0.0, 0.0
    for key in common:
        diff = ta[key].double() - tb[key].double()
        squares += float(torch.sum(diff * diff))
        largest = max(largest, float(diff.abs().max())) if diff.numel() else largest
    return math.sqrt(squares), largest, len(common), len(set(ta) ^ set(tb))


def training_table(model: str, experiments: Sequence, results: dict[str, ExperimentResult],
                   reference: str = "full") -> Table:
    """Each of ``model``'s experiments against ``reference``: trained steps, final loss and its difference, and the
    L2 distance and largest difference of its trained weights from the reference's (0 for the same run): an
    ablation switch that changes nothing shows 0."""
    columns = ["steps", "final_loss", "loss_delta", "weights_l2", "weights_max"]
    labels = {"steps": "steps", "final_loss": "final loss", "loss_delta": f"Δ final loss vs {reference}",
              "weights_l2": f"weights: L2 distance to {reference}",
              "weights_max": f"weights: largest element difference to {reference}"}
    table = Table(f"{PAPERS[model]} · training: final loss and trained weights against {reference}", columns, [],
                  labels=labels)
    rows_exps = [e for e in experiments if e.model == model]
    resolved = _resolve(rows_exps, results)
    ref = resolved.get(reference, (reference, None))[1]
    ref_loss = final_loss(ref.losses) if ref is not None else None
    for exp in rows_exps:
        label, res = resolved[exp.name]
        if res is None or not res.rows:
            why = (res.missing or "no results") if res is not None else f"experiment {exp.key} was not run"
            table.rows.append((label, {c: Cell(None, note=why) for c in columns}))
            continue
        loss = final_loss(res.losses)
        no_loss = Cell(None, note="no losses.jsonl on record")
        cells = {"steps": Cell(float(res.losses[-1]["step"]), text=str(res.losses[-1]["step"])) if res.losses
                 else no_loss,
                 "final_loss": Cell(loss, text=f"{loss:.6g}") if loss is not None else no_loss}
        if exp.name == reference:
            cells.update({c: Cell(None, text="(reference)") for c in columns[2:]})
        else:
            cells["loss_delta"] = (Cell(loss - ref_loss, text=f"{loss - ref_loss:+.4g}".replace("-", "−"))
                                   if loss is not None and ref_loss is not None else
                                   Cell(None, note=f"no final loss of {exp.name} or {reference}"))
            if res.weights and ref is not None and ref.weights and Path(res.weights).is_dir() \
                    and Path(ref.weights).is_dir():
                l2, largest, compared, unmatched = weights_distance(res.weights, ref.weights)
                note = (f"over the tensors both have; {unmatched} tensor(s) only one of them has" if unmatched
                        else "")
                cells["weights_l2"] = Cell(l2, text=f"{l2:.4g}", note=note) if compared else Cell(
                    None, note="no trained tensors in common")
                cells["weights_max"] = Cell(largest, text=f"{largest:.4g}") if compared else cells["weights_l2"]
            else:
                why = f"trained weights of {exp.name} or {reference} not found"
                cells["weights_l2"] = cells["weights_max"] = Cell(None, note=why)
        table.rows.append((label, cells))
        if res.caveat:
            table.row_notes[label] = res.caveat
    table.notes.append("Final loss: the mean of the last tenth of the logged steps. Weights: every trained tensor "
                       "(the LoRA; RoboFace's trained modules) against the reference's; the loss terms differ "
                       "between experiments that switch a loss on or off.")
    return table
