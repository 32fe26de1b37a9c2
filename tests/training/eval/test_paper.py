"""The papers' tables: every published row of configs/published_tables.yaml in the rendered report, peers included,
our experiments below the paper row each stands for with the difference to it, a damaged file named in one line,
and the training table (final loss, trained weights) of the ablations."""

import math
import re

import pytest
import torch
from safetensors.torch import save_file

from training.eval.paper import (
    PAPER_TABLES,
    ExperimentResult,
    PublishedTablesError,
    add_published_complexity,
    final_loss,
    load_published,
    paper_tables,
    published_cells,
    published_file,
    training_table,
    weights_distance,
)
from training.eval.report import Cell, Table
from training.experiments import ExperimentError, load_experiments, read_experiments


def _rows(model, set_name, level, values, table="restoration"):
    return [{"set": set_name, "level": level, "method": model, "table": table, "metric": m, "value": v, "n": 4,
             "note": ""} for m, v in values.items()]


def _sections(markdown: str) -> dict[str, list[str]]:
    """Table title -> its markdown lines."""
    return {s.split("\n", 1)[0]: s.splitlines() for s in markdown.split("#### ")[1:]}


def _experiments():
    defined = load_experiments([])
    return [e for by_name in defined.values() for e in by_name.values()]


def test_the_shipped_file_holds_both_papers_tables():
    published = load_published()
    assert published_file().name == "published_tables.yaml" and published_file().is_file()
    assert [t for t in published if t.startswith("a2bfr")] == [f"a2bfr_tab{n}" for n in range(1, 6)]
    assert [t for t in published if t.startswith("roboface")] == [f"roboface_tab{n}" for n in range(1, 11)]
    assert sum(len(t.rows) for t in published.values()) == 176
    row = next(r for r in published["a2bfr_tab2"].rows if r.label == "GFPGAN" and r.set == "AttrFace-90K-Test")
    assert row.values["LPIPS"] == 0.307 and row.printed["LPIPS"] == "0.3070"  # as printed: trailing zero kept
    assert "copy error" in next(r for r in published["a2bfr_tab2"].rows if r.label == "DR2"
                                and r.set == "LFW-Test").check  # its `# check` remark
    assert published["roboface_tab1"].rows[0].printed["blur_1st"] == "0.2–3.0"


def test_every_published_table_and_row_is_in_the_report():
    """Every table of the file and every one of its rows, with every printed value, in the rendered markdown (the
    complexity table takes RoboFace Tab. 10's)."""
    published = load_published()
    md = "\n".join(t.markdown() for t in paper_tables(_experiments(), {}, []))
    complexity = add_published_complexity(Table("RoboFace Tab. 10 · complexity", ["params", "s_per_face"], [
        ("RoboFace (stabilityai/stable-diffusion-2-1-base)", {"params": Cell(2.6), "s_per_face": Cell(None)})]))
    md += "\n" + complexity.markdown()
    sections = _sections(md)
    for table in published.values():
        titles = [t for t in sections if t.startswith(f"{table.name} ")]
        assert titles, table.id
        for row in table.rows:
            where = [t for t in titles if row.set is None or f" · {row.set}" in t]
            lines = [line for t in where for line in sections[t] if line.startswith(f"| {row.label} (published)")]
            assert len(lines) == 1, (table.id, row.label, row.set)
            cells = lines[0].split(" | ")
            for name, printed in row.printed.items():
                shown = printed if name != "Params_M" else f"{row.values[name] / 1000:.4f}"
                assert any(c.strip(" |").startswith(shown) for c in cells), (table.id, row.label, name, printed)


def test_peers_are_published_rows_beside_ours():
    tables = {t.title: t.markdown() for t in paper_tables(_experiments(), {}, [])}
    a2bfr = tables["A²BFR Tab. 2 · restoration · AttrFace-90K-Test"]
    assert "| CodeFormer (published) | 0.3337 | 20.31 | 0.3154 | 0.7160 | 0.7740 | 0.5210 | 74.62 |" in a2bfr
    assert "| DiT4SR (published) | 0.3048 | 18.10 |" in a2bfr
    robo = tables["RoboFace Tab. 2 · CelebA-Test at three degradation levels · CelebA-Test (FID=262.42)"]
    assert "| DiffBIR (published) | 156.95 | 0.78 | 0.56 | 0.65 |" in robo
    assert "| DiT4SR + Qwen-Image-Edit (published) |" in next(v for k, v in tables.items() if "A²BFR Tab. 3" in k)
    # a set no set of ours stands for: the published rows only, said so
    assert "No set of ours stands for LFW-Test" in tables["A²BFR Tab. 2 · restoration · LFW-Test"]


def test_ours_minus_published_on_a_small_result_set():
    exps = _experiments()
    a2bfr = {"full": ExperimentResult("full", "fp-full", _rows("a2bfr", "attrface_test", "train", {
        "lpips": 0.3, "ids": 0.5}) + _rows("a2bfr", "attrface_test", "train", {"lpips": 0.4, "aa": 0.9}, "attribute")),
             "baseline": ExperimentResult("baseline", "fp-base", _rows("a2bfr", "attrface_test", "train", {
                 "lpips": 0.5, "aa": 0.2}, "attribute"))}
    tables = {t.title: t for t in paper_tables(exps, a2bfr, [], model="a2bfr")}
    tab2 = dict(tables["A²BFR Tab. 2 · restoration · AttrFace-90K-Test"].rows)
    assert math.isclose(tab2["full"]["restoration:lpips"].vs_published, 0.3 - 0.2679)
    assert math.isclose(tab2["full"]["restoration:ids"].vs_published, 0.5 - 0.3495)
    assert tab2["full"]["restoration:psnr"].vs_published is None  # the paper prints no PSNR
    tab4 = tables["A²BFR Tab. 4 · ablation of the attribute-aware loss and semantic dual-training · "
                  "AttrFace-90K-Test · deltas to baseline"]
    cells = dict(tab4.rows)
    assert math.isclose(cells["full"]["attribute:aa"].vs_published, 0.9 - 0.8536)
    assert math.isclose(cells["full"]["attribute:aa"].delta, 0.7)  # and the delta to our reference experiment
    assert math.isclose(cells["baseline"]["attribute:lpips"].vs_published, 0.5 - 0.2948)
    # the published ablation rows carry the paper's own deltas to its reference row (A²BFR: "AA +0.2136")
    assert math.isclose(cells["+AAL (published)"]["attribute:aa"].delta, 0.2136)
    md = tab4.markdown()
    assert "| full | n/a [" in md and "0.9000 (+0.7000) (vs published +0.0464)" in md
    assert "0.5000 (vs published +0.2052)" in md
    robo = {"full": ExperimentResult("full", "fp", _rows("roboface", "celeba_test_levels", "ood", {"fid": 60.0}))}
    tables = {t.title: t for t in paper_tables(exps, robo, [], model="roboface")}
    tab2 = tables["RoboFace Tab. 2 · CelebA-Test at three degradation levels · CelebA-Test (FID=262.42)"]
    assert math.isclose(dict(tab2.rows)["full"]["restoration:fid"].vs_published, 60.0 - 56.53)
    assert "| full | 60.00 (vs published +3.47) |" in tab2.markdown()
    labels = [label for label, _ in tab2.rows]
    assert labels.index("full") == labels.index("RoboFace (published)") + 1


def test_every_shipped_paper_row_is_a_published_row_of_a_set_of_ours():
    published = load_published()
    specs = {s.id: s for s in PAPER_TABLES}
    mapped = 0
    for exp in _experiments():
        for table, row in exp.paper_row.items():
            sets = {p for p, _, _ in specs[table].groups}
            assert any(r.label == row and r.set in sets for r in published[table].rows), (exp.key, table, row)
            mapped += 1
    assert mapped >= 15


def test_a_paper_row_outside_its_tables_is_refused(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("a2bfr:\n  wide: {tables: [a2bfr_tab4], paper_row: {a2bfr_tab2: A²BFR}}\n")
    with pytest.raises(ExperimentError, match=r"mine.yaml: a2bfr.wide: paper_row: 'a2bfr_tab2' is not one of its "
                                              r"tables \(a2bfr_tab4\)"):
        read_experiments(path)
    path.write_text("a2bfr:\n  wide: {tables: [a2bfr_tab4], paper_row: [Ours]}\n")
    with pytest.raises(ExperimentError, match="paper_row: must be the published row's name"):
        read_experiments(path)
    path.write_text("a2bfr:\n  wide: {tables: [a2bfr_tab4, a2bfr_tab5], paper_row: Ours}\n")
    assert read_experiments(path)["a2bfr"]["wide"].paper_row == {"a2bfr_tab4": "Ours", "a2bfr_tab5": "Ours"}


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.replace("  - id: a2bfr_tab3", "  - id: a2bfr_tab2"), r"tables\[2\] \(a2bfr_tab2\): id given twice"),
    (lambda t: t.replace("IDS: 0.3242", "IDS: high"), r"tables\[1\] \(a2bfr_tab2\) rows\[0\]: IDS: must be a number"),
    (lambda t: t.replace("paper: roboface\n    number: 4", "paper: robofac\n    number: 4"),
     r"\(roboface_tab4\): paper: 'robofac' is not one of papers"),
    (lambda t: t.replace('{method: "GPEN", set: "LFW-Test"', '{set: "LFW-Test"', 1),
     r"\(roboface_tab3\) rows\[4\]: named by 'set', the table's first row by 'method'"),
    (lambda t: t.replace("metrics: {FID: down, CLIPIQA: up}", "metrics: {FID: lower, CLIPIQA: up}"),
     r"\(roboface_tab3\): metrics: must map each metric to up, down or null"),
    (lambda t: t.replace("InferenceTime_s: null}\n    rows:\n", "InferenceTime_s: null}\n    rows: []\n    old:\n"),
     r"\(roboface_tab10\): rows: must be a non-empty list"),
    (lambda t: t.replace("tables:\n", "tablez:\n", 1), r"must be a mapping with `papers` and a non-empty list"),
    (lambda t: t + "papers: {}\n", r"not valid YAML: line \d+, column 1: .*papers"),
])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, change, expected):
    path = tmp_path / "published_tables.yaml"
    path.write_text(change(published_file().read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(PublishedTablesError) as err:
        load_published(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path)), str(err.value)
    assert re.search(expected, str(err.value)), str(err.value)


def test_a_missing_or_unreadable_file_is_one_line(tmp_path):
    for path, why in ((tmp_path / "none.yaml", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(PublishedTablesError, match=why) as err:
            load_published(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"tables: [\xff]\n")
    with pytest.raises(PublishedTablesError, match="not UTF-8"):
        load_published(bad)


def test_the_evaluation_reports_published_rows_come_from_the_file():
    rows = {label: (cells, source) for label, cells, source in published_cells("attrface_test", "train", "restoration")}
    assert rows["A²BFR (published)"][0]["ids"].value == 0.3495 and rows["A²BFR (published)"][0]["lpips"].text == \
        "0.2679"
    assert rows["A²BFR (published)"][1] == "A²BFR Tab. 2, AttrFace-90K-Test"
    attribute = dict((label, cells) for label, cells, _ in published_cells("attrface_test", "train", "attribute"))
    assert attribute["A²BFR (published)"]["cp_ids"].value == 0.8301
    ood = dict((label, cells) for label, cells, _ in published_cells("celeba_test_levels", "ood", "restoration"))
    assert ood["RoboFace (published)"]["fid"].value == 56.53 and "A²BFR (published)" not in ood
    assert published_cells("attrface_test", "ood", "restoration") == []  # the papers report no such level


def _lora(folder, scale):
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({"a.lora_A.weight": torch.ones(2, 3) * scale, "a.lora_B.weight": torch.zeros(3, 2)},
              folder / "pytorch_lora_weights.safetensors")
    return str(folder)


def test_the_training_table_shows_what_each_switch_changed(tmp_path):
    exps = [e for e in _experiments() if e.model == "a2bfr"]
    rows = _rows("a2bfr", "attrface_test", "train", {"lpips": 0.3})
    losses = [{"step": s, "loss": 1.0 / s} for s in range(1, 101)]
    results = {"full": ExperimentResult("full", "fp-full", rows, weights=_lora(tmp_path / "full", 1.0),
                                        losses=losses, caveat="tiny random base"),
               "baseline": ExperimentResult("baseline", "fp-b", rows, weights=_lora(tmp_path / "b", 1.5),
                                            losses=[{"step": s, "loss": 2.0 / s} for s in range(1, 101)]),
               "attrface": ExperimentResult("attrface", "fp-full", [], missing="not selected")}
    assert math.isclose(final_loss(losses), sum(1.0 / s for s in range(91, 101)) / 10)
    l2, largest, compared, unmatched = weights_distance(tmp_path / "b", tmp_path / "full")
    assert math.isclose(l2, math.sqrt(6 * 0.25)) and math.isclose(largest, 0.5) and (compared, unmatched) == (2, 0)
    table = training_table("a2bfr", exps, results)
    cells = dict(table.rows)
    assert math.isclose(cells["baseline"]["weights_l2"].value, math.sqrt(1.5))
    assert math.isclose(cells["baseline"]["loss_delta"].value, final_loss(losses))
    assert cells["attrface (= full: same run)"]["weights_l2"].value == 0.0  # one run: nothing differs
    assert cells["+aal"]["steps"].note == "experiment a2bfr/+aal was not run"
    md = table.markdown()
    assert "| full [1] | 100 |" in md and "| baseline | 100 |" in md and "(reference)" in md
