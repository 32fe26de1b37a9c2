"""The evaluation report: every configured method on every benchmark set, the papers' metrics, and tables shaped like
A²BFR Tab. 2/3 and RoboFace Tab. 2/3 with the published numbers beside ours. No Dagster here: the ``eval_report``
asset and ``attrface evaluate`` are thin wrappers.

- A set is a built benchmark folder (``training.eval.benchmark_sets``): ``manifest.parquet`` + ``gt/``, ``tar/``,
  ``lq/<level>/``. Its first ``max_faces`` keys (sorted) are evaluated at every level.
- A method turns LQ crops (+ optional prompts) into restored crops: a trained model (A²BFR, RoboFace), a weight-free
  baseline (``identity``: the LQ as given; ``bicubic``: the LQ brought to its nominal low resolution and bicubic-
  upsampled back) or an external method's output folder (``<folder>/<set>/<level>/<key>.png``; attribute outputs in
  ``<folder>/<set>/<level>/tar/<key>.png``). Outputs are written once under ``<out>/preds/<method tag>/`` (the tag
  hashes the model id and settings), so a re-run only computes what is missing.
- Restoration tables (per set and level): IDS, FID, LPIPS, PSNR, SSIM against the GT, the no-reference IQA metrics
  and SC (source prompt) where the set has prompts; sets without GT (real LQ) get FID against the HQ folder set's GT
  and the no-reference metrics. Attribute tables (AttrFace test): each prompted method restores every LQ again under
  the target prompt: AA (judged), LPIPS to the edited target GT, CP-IDS between the two restorations, SC (target
  prompt), and AA per attribute.
- A cell that cannot be computed says ``n/a`` with the reason (a missing extra, no judge, an untrained model, a
  method that takes no prompt); nothing is silently left out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.eval import metrics as M

MODELS = ("a2bfr", "roboface")
BASELINES = ("bicubic", "identity")
SETS = ("attrface_test", "celeba_test_levels", "real_lq")
NR_METRICS = ("musiq", "maniqa", "clipiqa", "hyperiqa", "topiq")
METRICS = ("psnr", "ssim", "lpips", "ids", "fid", *NR_METRICS, "sc", "aa", "cp_ids")
LABELS = {"psnr": "PSNR↑", "ssim": "SSIM↑", "lpips": "LPIPS↓", "ids": "IDS↑", "fid": "FID↓", "musiq": "MUSIQ↑",
          "maniqa": "MANIQA↑", "clipiqa": "CLIP-IQA↑", "hyperiqa": "HyperIQA↑", "topiq": "TopIQ↑", "sc": "SC↑",
          "aa": "AA↑", "cp_ids": "CP-IDS↑"}
RESTORATION_GT = ("ids", "fid", "lpips", "psnr", "ssim", *NR_METRICS, "sc")  # A²BFR Tab. 2 / RoboFace Tab. 2 order
RESTORATION_REAL = ("fid", *NR_METRICS)  # RoboFace Tab. 3
ATTRIBUTE = ("aa", "lpips", "cp_ids", "sc")  # A²BFR Tab. 3

RESULT_SCHEMA = pa.schema([
    ("set", pa.string()), ("level", pa.string()), ("method", pa.string()), ("table", pa.string()),
    ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64()), ("note", pa.string()),
])


# The papers' published numbers: configs/published_tables.yaml, read and laid out by training.eval.paper (the one
# source of published rows for this report and the paper tables).

# --- sets ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSet:
    name: str
    root: Path
    rows: list[dict]  # manifest rows of the evaluated keys, every level
    levels: list[str]

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(r["key"] for r in self.rows))

    @property
    def has_gt(self) -> bool:
        return bool(self.rows) and bool(self.rows[0]["gt_path"])

    @property
    def has_targets(self) -> bool:
        return bool(self.rows) and bool(self.rows[0]["tar_path"])

    def level_rows(self, level: str) -> list[dict]:
        return [r for r in self.rows if r["level"] == level]


def load_set(root: str | Path, name: str, *, max_faces: int | None = None) -> BenchSet:
    """A built benchmark set; ``max_faces`` keeps its first keys (sorted), at every level."""
    root = Path(root)
    manifest = root / "manifest.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"benchmark set {name} is not built ({manifest} missing): run job build_benchmarks")
    rows = pq.read_table(manifest).to_pylist()
    keys = sorted({r["key"] for r in rows})[:max_faces]
    chosen = set(keys)
    rows = sorted((r for r in rows if r["key"] in chosen), key=lambda r: r["key"])
    return BenchSet(name, root, rows, list(dict.fromkeys(r["level"] for r in pq.read_table(manifest).to_pylist())))


# --- methods -------------------------------------------------------------------------------------------------------
RestoreFn = Callable[[list[np.ndarray], "list[str] | None"], list[np.ndarray]]


def identity_restore(lqs: list[np.ndarray], prompts: list[str] | None = None) -> list[np.ndarray]:
    return [np.array(lq) for lq in lqs]


def bicubic_restore(factor: int) -> RestoreFn:
    """The LQ brought down to 1/``factor`` (area) and bicubic-upsampled back: what the LQ is "upsampled" from."""

    def restore(lqs: list[np.ndarray], prompts: list[str] | None = None) -> list[np.ndarray]:
        out = []
        for lq in lqs:
            h, w = lq.shape[:2]
            small = cv2.resize(lq, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
            out.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
        return out

    return restore


def restore_then_edit(restore: RestoreFn, editor, params, *, prompt: str, resolution: int,
                      seed: int = 0) -> Callable[..., list[np.ndarray]]:
    """A²BFR Tab. 3's two-stage protocol from the project's own parts: ``restore`` each LQ with the prompt-agnostic
    ``prompt``, then edit the restoration with ``editor`` (:class:`attrface_pipeline.stages.flowedit.FlowEditor`)
    from the source prompt to the requested one, at the editor's ``resolution`` and back to the LQ's size.

    Called with ``source_prompts`` equal to ``prompts`` (the plain restoration) there is nothing to edit and the
    restoration is returned as it is; FlowEdit with equal prompts moves nothing but the VAE round trip."""

    def run(lqs: list[np.ndarray], prompts: list[str] | None = None,
            source_prompts: list[str] | None = None) -> list[np.ndarray]:
        restored = restore(lqs, [prompt] * len(lqs))
        if prompts is None or source_prompts is None or list(prompts) == list(source_prompts):
            return restored
        small = [cv2.resize(r, (resolution, resolution), interpolation=cv2.INTER_AREA) for r in restored]
        edited, _ = editor.edit(small, list(source_prompts), list(prompts), params, [seed] * len(small))
        return [cv2.resize(e, (r.shape[1], r.shape[0]), interpolation=cv2.INTER_CUBIC)
                for e, r in zip(edited, restored)]

    return run


@dataclass
class Method:
    """One column source of the report. ``load`` builds the restore function when needed (models load lazily and
    one at a time); ``folder`` serves an external method's outputs; ``unavailable`` is why there are none."""

    name: str
    kind: str  # model | baseline | external
    model_id: str
    prompted: bool = False  # takes a text prompt: restores AttrFace LQ again under the target prompt
    load: Callable[[], RestoreFn] | None = None
    folder: Path | None = None
    unavailable: str = ""
    caveat: str = ""  # why its numbers are not comparable with the papers' (a tiny model), shown in every table
    source_prompts: bool = False  # its restore function also takes the source prompts (restore-then-edit)

    @property
    def tag(self) -> str:
        return f"{self.name}-{hashlib.sha256(self.model_id.encode()).hexdigest()[:10]}"


def baseline_methods(names: Iterable[str], *, bicubic_factor: int) -> list[Method]:
    out = []
    for name in names:
        if name == "identity":
            out.append(Method("identity", "baseline", "identity", load=lambda: identity_restore))
        elif name == "bicubic":
            out.append(Method("bicubic", "baseline", f"bicubic-x{bicubic_factor}",
                              load=lambda: bicubic_restore(bicubic_factor)))
        else:
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    return out


def external_methods(folders: dict[str, str | Path]) -> list[Method]:
    out = []
    for name, folder in folders.items():
        folder = Path(folder)
        missing = "" if folder.is_dir() else f"output folder {folder} does not exist"
        out.append(Method(name, "external", f"folder:{folder.resolve()}", prompted=True, folder=folder,
                          unavailable=missing))
    return out


# --- predictions ---------------------------------------------------------------------------------------------------
def _read(path: Path) -> np.ndarray:
    from attrface_pipeline.images import read_rgb

    return read_rgb(path)


def _fit(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A prediction brought to the GT's size (external methods may output another size)."""
    if img.shape[:2] == shape[:2]:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > shape[0] else cv2.INTER_CUBIC
    return cv2.resize(img, (shape[1], shape[0]), interpolation=interp)


def _find(folder: Path, key: str) -> Path | None:
    return next((p for ext in (".png", ".jpg", ".jpeg", ".webp") if (p := folder / f"{key}{ext}").is_file()), None)


@dataclass
class Predictions:
    """Restored images of one method on one set, per (level, branch); branch ``src`` = the plain / source-prompt
    restoration, ``tar`` = under the target prompt. A missing branch maps to the reason."""

    images: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    missing: dict[tuple[str, str], str] = field(default_factory=dict)
    seconds: float = 0.0
    computed: int = 0


def predict(method: Method, bset: BenchSet, out_dir: Path, *, batch_size: int, restore: RestoreFn | None,
            write: Callable[[Path, bytes], None], log: Callable[[str], None] = print) -> Predictions:
    """Every level's outputs of ``method`` on ``bset``: read back when already written, else computed with
    ``restore`` (None: the method is external or unavailable) and written atomically."""
    from attrface_pipeline.images import encode_image

    pred = Predictions()
    branches = ["src"] + (["tar"] if bset.has_targets and method.prompted else [])
    t0 = time.perf_counter()
    for level in bset.levels:
        rows = bset.level_rows(level)
        for branch in branches:
            if method.unavailable:
                pred.missing[(level, branch)] = method.unavailable
                continue
            if method.folder is not None:
                where = method.folder / bset.name / level / ("tar" if branch == "tar" else "")
                found = {r["key"]: _find(where, r["key"]) for r in rows}
                lost = [k for k, p in found.items() if p is None]
                if lost:
                    pred.missing[(level, branch)] = (f"{len(lost)} of {len(rows)} outputs missing in {where} "
                                                     f"(e.g. {lost[0]})")
                else:
                    pred.images[(level, branch)] = {k: _read(p) for k, p in found.items()}
                continue
            folder = out_dir / "preds" / method.tag / bset.name / level / branch
            todo = [r for r in rows if not (folder / f"{r['key']}.png").is_file()]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                lqs = [_read(bset.root / r["lq_path"]) for r in chunk]
                prompts = None
                if bset.has_targets and method.prompted:
                    prompts = [r["target_prompt" if branch == "tar" else "source_prompt"] for r in chunk]
                assert restore is not None, f"{method.name}: outputs missing and no restore function"
                extra = ({"source_prompts": [r["source_prompt"] for r in chunk] if prompts is not None else None}
                         if method.source_prompts else {})
                for r, img in zip(chunk, restore(lqs, prompts, **extra)):
                    write(folder / f"{r['key']}.png", encode_image(img, "png"))
                pred.computed += len(chunk)
            if todo:
                log(f"{method.name} on {bset.name}/{level}/{branch}: restored {len(todo)} face(s)")
            pred.images[(level, branch)] = {r["key"]: _read(folder / f"{r['key']}.png") for r in rows}
    pred.seconds = time.perf_counter() - t0
    return pred


# --- scoring -------------------------------------------------------------------------------------------------------
@dataclass
class Scorers:
    """What the metrics run with; a string in place of a scorer is the reason it is not available."""

    lpips: object | str
    fid: object | str
    identity: object | str
    iqa: dict[str, object | str]
    judge: object | str
    batch_size: int = 8
    # metric -> why its values are not comparable with published numbers (untrained or tiny networks)
    caveats: dict[str, str] = field(default_factory=dict)


@dataclass
class Cell:
    value: float | None
    n: int = 0
    note: str = ""
    delta: float | None = None  # the difference to a reference row (ablation tables), shown beside the value
    vs_published: float | None = None  # this number minus the published one of the paper row it stands for
    text: str = ""  # shown instead of the formatted value: a published number as printed, or a text field


def _mean(values: np.ndarray) -> float:
    """Mean over the pairs that have a value (NaN: none); +inf (PSNR of identical images) stays inf."""
    known = values[~np.isnan(values)]
    return float(known.mean()) if len(known) else float("nan")


def _with_caveats(cells: dict[str, Cell], scorers: Scorers) -> dict[str, Cell]:
    """Valued cells of a metric computed by an untrained or tiny network carry the caveat as their note."""
    for metric, cell in cells.items():
        if cell.value is not None and metric in scorers.caveats:
            cell.note = scorers.caveats[metric]
    return cells


def _scored(fn: Callable[[], tuple[float, int]]) -> Cell:
    """Run one metric; a missing extra or any failure becomes an n/a cell with the reason, never a crashed report."""
    try:
        value, n = fn()
    except M.MetricUnavailable as err:
        return Cell(None, note=str(err))
    except Exception as err:  # noqa: BLE001 - one failed metric must not lose the rest of the report
        return Cell(None, note=f"failed: {type(err).__name__}: {err}"[:300])
    return Cell(value, n)


def _judged(judgements: Sequence) -> tuple[float, int]:
    from training.eval.judge import summarize

    s = summarize(judgements)
    if s["mean"] is None:
        raise RuntimeError(f"the judge answered none of {len(judgements)} question(s)")
    return float(s["mean"]), int(s["n"])


def score_restoration(metrics: Sequence[str], scorers: Scorers, preds: list[np.ndarray],
                      gts: list[np.ndarray] | None, *, prompts: list[str] | None,
                      fid_reference: Callable[[], np.ndarray] | str) -> dict[str, Cell]:
    """Restoration-table cells of one (method, set, level). ``fid_reference`` gives the FID reference set's
    features (computed once per set: :func:`reference_features`), or is the reason there is none."""
    out: dict[str, Cell] = {}
    bs = scorers.batch_size
    for metric in metrics:
        if metric in ("psnr", "ssim", "lpips", "ids") and gts is None:
            continue
        scorer = {"lpips": scorers.lpips, "ids": scorers.identity, "fid": scorers.fid, "sc": scorers.judge,
                  **scorers.iqa}.get(metric)
        if isinstance(scorer, str):
            out[metric] = Cell(None, note=scorer)
            continue
        if metric == "psnr":
            out[metric] = _scored(lambda: (_mean(M.psnr_batch(preds, gts, batch_size=bs)), len(preds)))
        elif metric == "ssim":
            out[metric] = _scored(lambda: (_mean(M.ssim_batch(preds, gts, batch_size=bs)), len(preds)))
        elif metric == "lpips":
            out[metric] = _scored(lambda s=scorer: (_mean(M.lpips_batch(s, preds, gts, batch_size=bs)), len(preds)))
        elif metric == "ids":
            out[metric] = _scored(lambda s=scorer: (_mean(M.identity_cosines(s, preds, gts)), len(preds)))
        elif metric == "fid":
            if isinstance(fid_reference, str):
                out[metric] = Cell(None, note=fid_reference)
            else:
                out[metric] = _scored(lambda s=scorer: (M.frechet_distance(
                    M.image_features(s, preds, batch_size=bs), fid_reference()), len(preds)))
        elif metric in NR_METRICS:
            out[metric] = _scored(lambda s=scorer: (_mean(s(preds)), len(preds)))
        elif metric == "sc" and prompts is not None:
            out[metric] = _scored(lambda s=scorer: _judged(s.consistency(preds, prompts)))
    return _with_caveats(out, scorers)


def reference_features(scorers: Scorers, images: list[np.ndarray]) -> Callable[[], np.ndarray]:
    """The FID extractor's features of a reference set, computed on first use and then reused."""
    return functools.cache(lambda: M.image_features(scorers.fid, images, batch_size=scorers.batch_size))


def score_attribute(metrics: Sequence[str], scorers: Scorers, src_preds: list[np.ndarray],
                    tar_preds: list[np.ndarray], tar_gts: list[np.ndarray], rows: list[dict]
                    ) -> tuple[dict[str, Cell], dict[str, Cell]]:
    """Attribute-table cells of one (method, level) and AA per attribute."""
    out: dict[str, Cell] = {}
    per_attribute: dict[str, Cell] = {}
    for metric in (m for m in ATTRIBUTE if m in metrics):
        scorer = {"aa": scorers.judge, "sc": scorers.judge, "lpips": scorers.lpips, "cp_ids": scorers.identity}[metric]
        if isinstance(scorer, str):
            out[metric] = Cell(None, note=scorer)
        elif metric == "lpips":
            out[metric] = _scored(lambda s=scorer: (_mean(M.lpips_batch(s, tar_preds, tar_gts)), len(tar_preds)))
        elif metric == "cp_ids":
            out[metric] = _scored(lambda s=scorer: (_mean(M.identity_cosines(s, src_preds, tar_preds)),
                                                    len(tar_preds)))
        elif metric == "sc":
            out[metric] = _scored(lambda s=scorer: _judged(s.consistency(tar_preds, [r["target_prompt"]
                                                                                       for r in rows])))
        elif metric == "aa":
            try:
                answers = scorer.attribute_present(tar_preds, [r["attribute"] for r in rows],
                                                   [r["direction"] for r in rows])
            except Exception as err:  # noqa: BLE001 - a judge that fails outright is an n/a cell, not a crash
                out[metric] = Cell(None, note=f"failed: {type(err).__name__}: {err}"[:300])
                continue
            out[metric] = _scored(lambda a=answers: _judged(a))
            for attribute in sorted({r["attribute"] for r in rows}):
                picked = [a for a, r in zip(answers, rows) if r["attribute"] == attribute]
                per_attribute[attribute] = _scored(lambda p=picked: _judged(p))
    return _with_caveats(out, scorers), per_attribute


# --- tables --------------------------------------------------------------------------------------------------------
def _fmt(metric: str, value: float) -> str:
    if math.isinf(value):
        return "∞"
    return f"{value:.2f}" if metric in ("psnr", "fid", "sc", "musiq") else f"{value:.4f}"


@dataclass
class Table:
    title: str
    columns: list[str]  # metric names (or attribute names for the AA breakdown)
    rows: list[tuple[str, dict[str, Cell]]]
    labels: dict[str, str] = field(default_factory=dict)
    row_notes: dict[str, str] = field(default_factory=dict)  # row label -> caveat, a footnote beside the label
    notes: list[str] = field(default_factory=list)  # remarks on the whole table, printed below it

    def _cells(self) -> tuple[list[list[str]], list[str]]:
        notes: list[str] = []
        body = []
        for label, cells in self.rows:
            line = [label]
            if self.row_notes.get(label):
                if self.row_notes[label] not in notes:
                    notes.append(self.row_notes[label])
                line = [f"{label} [{notes.index(self.row_notes[label]) + 1}]"]
            for col in self.columns:
                cell = cells.get(col)
                if cell is None:
                    line.append("—")
                elif cell.value is None and cell.text:  # a text field (a published table's non-numeric column)
                    line.append(cell.text)
                elif cell.value is None or (isinstance(cell.value, float) and math.isnan(cell.value)):
                    note = cell.note or "no value"
                    if note not in notes:
                        notes.append(note)
                    line.append(f"n/a [{notes.index(note) + 1}]")
                else:
                    metric = col.split(":")[-1].split("@")[0]
                    text = cell.text or _fmt(metric, cell.value)
                    if cell.delta is not None and math.isfinite(cell.delta):
                        text += f" ({'+' if cell.delta >= 0 else '−'}{_fmt(metric, abs(cell.delta))})"
                    if cell.vs_published is not None and math.isfinite(cell.vs_published):
                        sign = "+" if cell.vs_published >= 0 else "−"
                        text += f" (vs published {sign}{_fmt(metric, abs(cell.vs_published))})"
                    if cell.note:  # a value with a caveat (an untrained network): said in the table itself
                        if cell.note not in notes:
                            notes.append(cell.note)
                        text += f" [{notes.index(cell.note) + 1}]"
                    line.append(text)
            body.append(line)
        return body, notes

    def markdown(self) -> str:
        body, notes = self._cells()
        head = ["Method"] + [self.labels.get(c, LABELS.get(c, c)) for c in self.columns]
        lines = [f"#### {self.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        if notes:
            lines += [""] + [f"[{i}] {n}  " for i, n in enumerate(notes, 1)]
        if self.notes:
            lines += [""] + [f"{n}  " for n in self.notes]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        body, notes = self._cells()
        head = ["Method"] + [self.labels.get(c, LABELS.get(c, c)) for c in self.columns]
        out = [f"<h4>{html.escape(self.title)}</h4>", "<table>",
               "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
        for row in body:
            cls = ' class="published"' if "(published)" in row[0] else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        out.append("</table>")
        if notes:
            out.append("<ol class=notes>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ol>")
        out += [f"<p>{html.escape(n)}</p>" for n in self.notes]
        return "\n".join(out)


def published_table(title: str, columns: list[str], set_name: str, level: str, table: str) -> Table:
    """A table of the evaluation report, started with the papers' own published rows of the paper set that
    ``set_name`` at ``level`` stands for (configs/published_tables.yaml, through training.eval.paper); each row's
    footnote names the paper table and set."""
    from training.eval.paper import published_cells

    out = Table(title, columns, [])
    for label, cells, source in published_cells(set_name, level, table):
        out.rows.append((label, cells))
        out.row_notes[label] = source
    return out


# --- the report ----------------------------------------------------------------------------------------------------
@dataclass
class Report:
    tables: list[Table]
    results: list[dict]
    grids: dict[str, np.ndarray]  # "<set>/<level>" -> HWC uint8 RGB grid
    grid_captions: dict[str, str]
    methods: list[dict]
    seconds: float
    restore_seconds: float
    markdown: str = ""
    paths: dict[str, Path] = field(default_factory=dict)


def _grid(bset: BenchSet, level: str, columns: list[tuple[str, dict[str, np.ndarray] | None, str]],
          faces: int) -> tuple[np.ndarray, str]:
    from attrface_pipeline.images import preview_grid

    rows = bset.level_rows(level)[:faces]
    tiles = []
    for r in rows:
        tiles.append(_read(bset.root / r["lq_path"]))
        for _, images, _ in columns:
            img = (images or {}).get(r["key"])
            tiles.append(np.zeros((96, 96, 3), np.uint8) if img is None else img)
        if bset.has_gt:
            tiles.append(_read(bset.root / r["gt_path"]))
        if bset.has_targets:
            tiles.append(_read(bset.root / r["tar_path"]))
    names = ["LQ"] + [c[0] for c in columns] + (["GT"] if bset.has_gt else []) + (["target GT"]
                                                                                  if bset.has_targets else [])
    return preview_grid(tiles, tile=96, columns=len(names)), " | ".join(names)


def run_report(sets: Sequence[BenchSet], methods: Sequence[Method], scorers: Scorers, out_dir: str | Path, *,
               metrics: Sequence[str], batch_size: int, grid_faces: int, write: Callable[[Path, bytes], None],
               hq_reference: BenchSet | None = None, log: Callable[[str], None] = print) -> Report:
    """Restore every set with every method, score, and lay out the tables (module docstring)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    preds: dict[tuple[str, str], Predictions] = {}
    restore_seconds = 0.0
    for method in methods:  # one model in memory at a time
        restore = None
        try:
            for bset in sets:
                if restore is None and method.load is not None and not method.unavailable:
                    restore = method.load()
                p = predict(method, bset, out_dir, batch_size=batch_size, restore=restore, write=write, log=log)
                preds[(method.name, bset.name)] = p
                restore_seconds += p.seconds
        except Exception as err:  # noqa: BLE001 - a model that fails to load or run is an n/a column
            method.unavailable = f"{method.name} failed: {type(err).__name__}: {err}"[:400]
            log(method.unavailable)
            for bset in sets:
                p = preds.setdefault((method.name, bset.name), Predictions())
                for level in bset.levels:
                    for branch in ("src", "tar"):
                        if (level, branch) not in p.images:
                            p.missing[(level, branch)] = method.unavailable
        finally:
            del restore
            _free_memory()

    results: list[dict] = []
    tables: list[Table] = []
    grids: dict[str, np.ndarray] = {}
    captions: dict[str, str] = {}
    for bset in sets:
        gts = ({r["key"]: _read(bset.root / r["gt_path"]) for r in bset.level_rows(bset.levels[0])}
               if bset.has_gt else None)
        tars = ({r["key"]: _read(bset.root / r["tar_path"]) for r in bset.level_rows(bset.levels[0])}
                if bset.has_targets else None)
        if gts is not None:
            reference: Callable[[], np.ndarray] | str = reference_features(scorers, list(gts.values()))
        elif hq_reference is not None and hq_reference.has_gt:
            reference = reference_features(scorers, [_read(hq_reference.root / r["gt_path"])
                                                     for r in hq_reference.level_rows(hq_reference.levels[0])])
        else:
            reference = "no HQ reference set for FID (add celeba_test_levels to eval.sets)"
        for level in bset.levels:
            rows = bset.level_rows(level)
            keys = [r["key"] for r in rows]
            columns = RESTORATION_GT if bset.has_gt else RESTORATION_REAL
            columns = [c for c in columns if c in metrics and (c != "sc" or bset.has_targets)]
            restoration = published_table(f"{bset.name} · {level} · restoration ({len(keys)} faces)", columns,
                                          bset.name, level, "restoration")
            attribute = published_table(f"{bset.name} · {level} · attribute-controlled ({len(keys)} faces)",
                                        [c for c in ATTRIBUTE if c in metrics], bset.name, level, "attribute")
            by_attribute: dict[str, dict[str, Cell]] = {}
            for method in methods:
                p = preds[(method.name, bset.name)]
                src = p.images.get((level, "src"))
                if src is None:
                    note = p.missing.get((level, "src"), "no outputs")
                    cells = {c: Cell(None, note=note) for c in columns}
                else:
                    pred_list = [_fit(src[k], (gts or src)[k].shape) for k in keys]
                    log(f"scoring {method.name} on {bset.name}/{level}")
                    cells = score_restoration(
                        columns, scorers, pred_list, [gts[k] for k in keys] if gts is not None else None,
                        prompts=[r["source_prompt"] for r in rows] if bset.has_targets else None,
                        fid_reference=reference)
                restoration.rows.append((method.name, cells))
                restoration.row_notes[method.name] = method.caveat
                _record(results, bset.name, level, method.name, "restoration", cells)
                if not bset.has_targets:
                    continue
                if not method.prompted:
                    note = f"{method.name} takes no text prompt"
                    cells = {c: Cell(None, note=note) for c in attribute.columns}
                elif (level, "tar") not in p.images or src is None:
                    note = p.missing.get((level, "tar")) or p.missing.get((level, "src"), "no outputs")
                    cells = {c: Cell(None, note=note) for c in attribute.columns}
                else:
                    tar = p.images[(level, "tar")]
                    cells, per_attr = score_attribute(
                        attribute.columns, scorers, [_fit(src[k], tars[k].shape) for k in keys],
                        [_fit(tar[k], tars[k].shape) for k in keys], [tars[k] for k in keys], rows)
                    by_attribute[method.name] = per_attr
                    _record(results, bset.name, level, method.name, "aa_by_attribute", per_attr)
                attribute.rows.append((method.name, cells))
                attribute.row_notes[method.name] = method.caveat
                _record(results, bset.name, level, method.name, "attribute", cells)
            tables.append(restoration)
            if bset.has_targets:
                tables.append(attribute)
                attrs = sorted({r["attribute"] for r in rows})
                if by_attribute and "aa" in metrics:
                    tables.append(Table(f"{bset.name} · {level} · AA per attribute", attrs,
                                        list(by_attribute.items()), labels={a: a for a in attrs}))
            if grid_faces:
                cols = [(m.name, preds[(m.name, bset.name)].images.get((level, "src")), "src") for m in methods]
                cols += [(f"{m.name} → target", preds[(m.name, bset.name)].images.get((level, "tar")), "tar")
                         for m in methods if m.prompted and bset.has_targets]
                grids[f"{bset.name}/{level}"], captions[f"{bset.name}/{level}"] = _grid(bset, level, cols,
                                                                                        grid_faces)
    method_records = [{"name": m.name, "kind": m.kind, "model_id": m.model_id, "prompted": m.prompted,
                       "tag": m.tag, "unavailable": m.unavailable} for m in methods]
    return Report(tables, results, grids, captions, method_records, time.perf_counter() - t0, restore_seconds)


def _record(results: list[dict], set_name: str, level: str, method: str, table: str, cells: dict[str, Cell]) -> None:
    for metric, cell in cells.items():
        results.append({"set": set_name, "level": level, "method": method, "table": table, "metric": metric,
                        "value": float("nan") if cell.value is None else float(cell.value), "n": cell.n,
                        "note": cell.note})


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_report(report: Report, out_dir: str | Path, *, record: dict,
                 write: Callable[[Path, bytes], None]) -> dict[str, Path]:
    """``report.md``, ``report.html`` (grids inline), ``results.parquet``, ``grids/*.png`` and ``report.json`` (the
    exact config, model ids and timings) under ``out_dir``."""
    from attrface_pipeline.images import encode_image

    out_dir = Path(out_dir)
    grid_png = {name: encode_image(img, "png") for name, img in report.grids.items()}
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html",
             "results": out_dir / "results.parquet", "record": out_dir / "report.json"}
    for name, png in grid_png.items():
        write(out_dir / "grids" / f"{name.replace('/', '__')}.png", png)
    methods = "\n".join(f"- **{m['name']}** ({m['kind']}): `{m['model_id']}`"
                        + (f" — not available: {m['unavailable']}" if m["unavailable"] else "")
                        for m in report.methods)
    md = ["# AttrFace evaluation report", "", "Rows marked *(published)* are the papers' numbers on their own test "
          "sets and degradations, for orientation; every other row is measured here.", "", "## Methods", "", methods,
          "", "## Tables", ""]
    md += [t.markdown() for t in report.tables]
    md += ["## Sample grids", ""] + [f"- {n}: `grids/{n.replace('/', '__')}.png` ({report.grid_captions[n]})"
                                     for n in report.grids]
    md += ["", f"Wall time {report.seconds:.1f} s (restoring {report.restore_seconds:.1f} s)."]
    report.markdown = "\n".join(md) + "\n"
    grids_html = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(png).decode()}'><figcaption>"
        f"{html.escape(n)}: {html.escape(report.grid_captions[n])}</figcaption></figure>"
        for n, png in grid_png.items())
    page = ("<!doctype html><meta charset=utf-8><title>AttrFace evaluation</title><style>body{font-family:sans-serif}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:"
            "right}td:first-child{text-align:left}tr.published{color:#666;font-style:italic}</style>"
            "<h1>AttrFace evaluation report</h1><p>Rows marked (published) are the papers' numbers on their own test"
            " sets and degradations; every other row is measured here.</p><ul>"
            + "".join(f"<li><b>{html.escape(m['name'])}</b> ({m['kind']}): <code>{html.escape(m['model_id'])}</code>"
                      + (f" — not available: {html.escape(m['unavailable'])}" if m["unavailable"] else "") + "</li>"
                      for m in report.methods)
            + "</ul>" + "".join(t.html() for t in report.tables) + "<h2>Sample grids</h2>" + grids_html)
    write(paths["markdown"], report.markdown.encode())
    write(paths["html"], page.encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(report.results, schema=RESULT_SCHEMA), sink)
    write(paths["results"], sink.getvalue().to_pybytes())
    full_record = {**record, "methods": report.methods, "seconds": round(report.seconds, 3),
                   "restore_seconds": round(report.restore_seconds, 3)}
    write(paths["record"], json.dumps(full_record, indent=2, sort_keys=True, default=str).encode())
    report.paths = paths
    return paths


# --- two folders ---------------------------------------------------------------------------------------------------
FOLDER_METRICS = ("psnr", "ssim", "lpips", "ids", "fid", *NR_METRICS)


def pair_folders(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, pred, gt) for every image stem present in both folders, and the stems present in only one."""
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

    def stems(folder: Path) -> dict[str, Path]:
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist: pass a folder of images")
        if not folder.is_dir():
            raise ValueError(f"{folder} is a file, not a folder: pass the folder that holds the images")
        try:
            return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in exts}
        except OSError as err:
            raise ValueError(f"{folder}: cannot list the folder ({err.strerror or type(err).__name__})") from None

    preds, gts = stems(Path(pred_dir)), stems(Path(gt_dir))
    both = sorted(set(preds) & set(gts))
    return [(s, preds[s], gts[s]) for s in both], sorted(set(preds) ^ set(gts))


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, scorers: Scorers, *,
                     metrics: Sequence[str] = FOLDER_METRICS) -> tuple[dict[str, Cell], list[str], list[dict]]:
    """Mean metrics of the restorations in ``pred_dir`` against same-named GT images in ``gt_dir`` (predictions
    are resized to their GT's size); also returns the names found in only one folder and one record per pair
    ({name, pred, gt, status: ok | failed, reason}): a pair whose image cannot be read is left out of the means,
    never the end of the run. ValueError when no pair can be read, for an unknown metric, or a folder that is a
    file; FileNotFoundError for a folder that does not exist.

    A mean that is not a finite number says why in its cell's note: PSNR is +inf when a pair is identical (kept as
    inf for the console and the tables; :func:`cells_json` writes it as null), a mean over no value is None."""
    from attrface_pipeline.images import check_rgb

    if isinstance(metrics, str):
        raise ValueError(f"metrics: expected a list of names, got the string {metrics!r}")
    unknown = [m for m in metrics if m not in FOLDER_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics {list(metrics)}: choose one or more of {', '.join(FOLDER_METRICS)}")
    metrics = list(dict.fromkeys(metrics))
    pairs, unpaired = pair_folders(pred_dir, gt_dir)
    if not pairs:
        raise ValueError(f"no image of {pred_dir} has a same-named GT in {gt_dir}")
    preds, gts, records = [], [], []
    for name, pred, gt in pairs:
        record = {"name": name, "pred": str(pred), "gt": str(gt), "status": "ok", "reason": ""}
        records.append(record)
        try:
            images = []
            for path in (gt, pred):
                try:
                    image = _read(path)
                    check_rgb(image)
                except Exception as err:  # noqa: BLE001 - any unreadable file is that pair's failure
                    raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
                if min(image.shape[:2]) < 1:
                    raise ValueError(f"{path}: empty image")
                images.append(image)
            gt_img, pred_img = images
            pred_img = _fit(pred_img, gt_img.shape)
        except ValueError as err:
            record.update(status="failed", reason=str(err))
            continue
        gts.append(gt_img)
        preds.append(pred_img)
    if not gts:
        raise ValueError(f"none of the {len(pairs)} pairs of {pred_dir} and {gt_dir} could be read: "
                         f"{records[0]['reason']}")
    cells = score_restoration(metrics, scorers, preds, gts, prompts=None,
                              fid_reference=reference_features(scorers, gts))
    identical = sum(p.shape == g.shape and np.array_equal(p, g) for p, g in zip(preds, gts))
    for metric, cell in cells.items():
        _explain_non_finite(metric, cell, identical, len(gts))
    return cells, unpaired, records


def _explain_non_finite(metric: str, cell: Cell, identical: int, pairs: int) -> None:
    """A cell whose value is not a finite number gets a note saying why (nan becomes None: no value)."""
    if cell.value is None or math.isfinite(cell.value):
        return
    if metric == "psnr" and cell.value == math.inf:
        why = f"identical images: PSNR is infinite ({identical} of {pairs} pairs identical)"
    elif math.isnan(cell.value):
        cell.value = None
        why = "no pair gave a value (the mean is undefined)"
    else:
        why = f"the mean is {cell.value} (not a finite number)"
    cell.note = f"{why}; {cell.note}" if cell.note else why


def check_json_path(path: str | Path) -> Path:
    """``path`` usable as the JSON output file, checked before any work (storage.check_output_file)."""
    from attrface_pipeline.storage import check_output_file

    return check_output_file(path, "--json")


def cells_json(cells: dict[str, Cell]) -> dict[str, dict]:
    """The metric cells as standard JSON values: ``{metric: {value, n, note}}``, a non-finite value (PSNR of
    identical images) written as null; its note says why."""
    return {m: {"value": c.value if c.value is None or math.isfinite(c.value) else None, "n": c.n,
                "note": c.note or ("not a finite number" if c.value is not None and not math.isfinite(c.value)
                                   else "")}
            for m, c in cells.items()}
