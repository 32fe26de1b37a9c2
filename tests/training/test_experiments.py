"""Named experiments: the shipped papers' rows, user files, fingerprints (two names, one run), the tables they make."""

import math

import pytest

from attrface_pipeline.builders import experiment_config, experiment_run_dir, roboface_train_config
from attrface_pipeline.config import load_config
from training.eval.paper import PAPER_TABLES, ExperimentResult, paper_tables
from training.experiments import PAPER_TABLE_MODELS, ExperimentError, load_experiments, read_experiments, select

SHARDS = "/data/attrface_shards"


def test_the_shipped_experiments_are_the_papers_rows():
    defined = load_experiments([])
    assert list(defined["a2bfr"]) == ["full", "baseline", "+aal", "+sdt", "ffhq_only", "attrface"]
    assert {"full", "no_explicit", "no_implicit", "implicit_first", "no_remover", "n10", "n50",
            "captions_none"} == set(defined["roboface"])
    cfg = load_config()
    for by_name in defined.values():
        for exp in by_name.values():
            experiment_config(cfg, exp)  # every override is a valid value of its section
            assert exp.tables and set(exp.tables) <= {t.id for t in PAPER_TABLES}
    # every paper table has its reference experiment among its rows
    for table in PAPER_TABLES:
        rows = [e.name for e in defined[table.model].values() if table.id in e.tables]
        assert rows and (table.reference is None or table.reference in rows), table.id


def test_a_typo_names_the_file_the_experiment_and_the_key(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("a2bfr:\n  wide:\n    overrides: {sdt_margn: 0.5}\nsd3:\n  x: {}\nroboface:\n  'a b': {}\n")
    with pytest.raises(ExperimentError) as err:
        read_experiments(bad)
    text = str(err.value)
    assert f"{bad}: a2bfr.wide: overrides.sdt_margn: not a key of the a2bfr section; did you mean 'sdt_margin'?" in text
    assert "sd3: unknown model" in text and "names may not contain spaces" in text
    with pytest.raises(ExperimentError, match="not defined; defined: full, baseline"):
        select(load_experiments([]), "a2bfr", ["full", "nope"])



def test_the_table_names_are_the_papers_tables():
    """training/experiments.py checks ``tables`` without importing the evaluation code: the same names."""
    assert PAPER_TABLE_MODELS == {t.id: t.model for t in PAPER_TABLES}


def _problems(path) -> list[str]:
    with pytest.raises(ExperimentError) as err:
        read_experiments(path)
    assert all("\n" not in p and p.startswith(str(path)) for p in err.value.problems)
    return err.value.problems


@pytest.mark.parametrize("text, expected", [
    ("- a2bfr\n- roboface\n", "must hold a mapping of model -> experiments (a2bfr / roboface), got a list"),
    ("a2bfr: [full, wide]\n", "a2bfr: must be a mapping of experiment name -> experiment, got a list"),
    ("a2bfr:\n  wide: [sdt_margin]\n", "a2bfr.wide: must be a mapping (description, overrides, tables), got a list"),
    ("a2bfr:\n  wide: {overrides: [sdt_margin, 0.5]}\n",
     "a2bfr.wide: overrides: must be a mapping of a2bfr setting -> value, got a list"),
    ("a2bfr:\n  wide: {tables: {a2bfr_tab4: 1}}\n",
     "a2bfr.wide: tables: must be a list of paper table names (e.g. [a2bfr_tab2]), got a mapping"),
    ("a2bfr:\n  wide: {tables: a2bfr_tab4}\n",
     "a2bfr.wide: tables: must be a list of paper table names (e.g. [a2bfr_tab2]), got text"),
    ("a2bfr:\n  wide: {description: [a, b]}\n", "a2bfr.wide: description: must be text, got a list"),
    ("a2bfr:\n  wide: {tables: [a2bfr_tab9]}\n", "a2bfr.wide: tables: 'a2bfr_tab9' is not a paper table (did you "
     "mean 'a2bfr_tab5'?); a2bfr tables: a2bfr_tab2, a2bfr_tab3, a2bfr_tab4, a2bfr_tab5"),
    ("a2bfr:\n  wide: {tables: [roboface_tab5]}\n", "a2bfr.wide: tables: 'roboface_tab5' is a roboface table; a2bfr "
     "tables: a2bfr_tab2, a2bfr_tab3, a2bfr_tab4, a2bfr_tab5"),
    ("a2bfr:\n  wide: {}\n  narrow: {}\n  wide: {description: again}\n",
     "not valid YAML: line 4, column 3: duplicate key 'wide' (first given on line 2); each key may appear once"),
    ("a2bfr:\n  wide: {overrides: {output_dir: /x}}\n", "a2bfr.wide: overrides.output_dir: an experiment may not "
     "set it (where and how wide a run goes is not part of an experiment; set a2bfr.output_dir in the config)"),
])
def test_a_wrong_shape_is_one_line_naming_the_file_and_the_experiment(tmp_path, text, expected):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert _problems(path) == [f"{path}: {expected}"]


def test_an_unreadable_experiments_file_is_named(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_bytes(b"a2bfr:\n  wide:\n    description: caf\xe9\n")
    assert _problems(path) == [f"{path}: not UTF-8 text (byte 0xe9 on line 3); save the file as UTF-8"]
    assert _problems(tmp_path) == [f"{tmp_path}: is a folder, not a YAML file (an experiments file, from "
                                   f"experiments.files)"]
    with pytest.raises(ExperimentError) as err:  # every file's problems at once
        load_experiments([tmp_path / "gone.yaml", path])
    assert err.value.problems == [
        f"{tmp_path / 'gone.yaml'}: does not exist (an experiments file, from experiments.files)",
        f"{path}: not UTF-8 text (byte 0xe9 on line 3); save the file as UTF-8"]


def test_every_experiments_override_values_are_checked_when_the_file_is_read(tmp_path):
    """Not only the selected experiment's: each value is validated like the setting it overrides."""
    path = tmp_path / "mine.yaml"
    path.write_text("a2bfr:\n  ok: {overrides: {sdt_margin: 0.5}}\n"
                    "  bad: {overrides: {batch_size: 0, sdt_margin: 1.5, lr: .inf, mode: triple, resolution: 72}}\n"
                    "roboface:\n  n0: {overrides: {num_tokens: 0, stage1_lr: .nan, caption_dropout: '0.1x'}}\n")
    assert sorted(_problems(path)) == sorted(f"{path}: {line}" for line in [
        "a2bfr.bad: overrides.batch_size = 0: Input should be greater than or equal to 1",
        "a2bfr.bad: overrides.sdt_margin = 1.5: Input should be less than or equal to 1",
        "a2bfr.bad: overrides.lr = inf: Input should be a finite number",
        "a2bfr.bad: overrides.mode = 'triple': Input should be 'single' or 'dual'",
        "a2bfr.bad: overrides.resolution = 72: Input should be a multiple of 16",
        "roboface.n0: overrides.num_tokens = 0: Input should be greater than or equal to 1",
        "roboface.n0: overrides.stage1_lr = nan: Input should be a finite number",
        "roboface.n0: overrides.caption_dropout = '0.1x': Input should be a valid number, unable to parse string as "
        "a number",
    ])


def test_experiment_config_turns_a_refused_override_into_one_line(tmp_path):
    from training.experiments import Experiment

    exp = Experiment(name="wide", model="a2bfr", overrides={"batch_size": -2}, source="mine.yaml")
    with pytest.raises(ExperimentError) as err:
        experiment_config(load_config(), exp)
    assert err.value.problems == ["mine.yaml: a2bfr.wide: overrides.batch_size = -2: Input should be greater than "
                                  "or equal to 1"]

def test_user_experiments_add_and_replace(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("a2bfr:\n  wide:\n    overrides: {sdt_margin: 0.5}\n    tables: [a2bfr_tab4]\n"
                    "  baseline:\n    description: mine\n    overrides: {aal_weight: 0}\n")
    defined = load_experiments([mine])
    assert defined["a2bfr"]["wide"].overrides == {"sdt_margin": 0.5}
    assert defined["a2bfr"]["baseline"].description == "mine" and defined["a2bfr"]["baseline"].source == str(mine)
    assert [e.name for e in select(defined, "a2bfr", ["all"])][-1] == "wide"


@pytest.mark.parametrize("profile", ["offline", "full"])
def test_fingerprints_two_names_one_run_and_shared_stage_one(profile):
    cfg = load_config(profile)
    defined = load_experiments([])
    a, r = defined["a2bfr"], defined["roboface"]

    def run(exp):
        return experiment_run_dir(cfg, exp, shards=SHARDS)

    assert run(a["attrface"]) == run(a["full"])  # the same resolved config: one run folder, trained once
    assert len({run(e) for e in a.values()}) == len(a) - 1
    assert len({run(e) for e in r.values()}) == len(r) - (1 if profile == "offline" else 0)  # offline: no captioner

    def stage1(exp):
        return roboface_train_config(experiment_config(cfg, exp), shards=SHARDS, stage="stage1").run.output_dir

    # stage-II ablations share stage I; N changes the Mapper, so it trains its own
    assert stage1(r["no_remover"]) == stage1(r["no_explicit"]) == stage1(r["implicit_first"]) == stage1(r["full"])
    assert stage1(r["n10"]) != stage1(r["full"])


def _rows(method, set_name, level, values, table="restoration"):
    return [{"set": set_name, "level": level, "method": method, "table": table, "metric": m, "value": v, "n": 4,
             "note": ""} for m, v in values.items()]


def test_paper_tables_rows_columns_deltas_and_reasons():
    defined = load_experiments([])
    exps = list(defined["a2bfr"].values())
    full = _rows("a2bfr", "attrface_test", "train", {"ids": 0.5, "lpips": 0.3}) + _rows(
        "a2bfr", "attrface_test", "train", {"lpips": 0.4, "cp_ids": 0.9, "aa": float("nan")}, "attribute")
    full[-1]["note"] = "no VLM judge configured"
    base = _rows("a2bfr", "attrface_test", "train", {"ids": 0.4, "lpips": 0.35}) + _rows(
        "a2bfr", "attrface_test", "train", {"lpips": 0.5, "cp_ids": 0.8}, "attribute")
    results = {"full": ExperimentResult("full", "fp-full", full, caveat="tiny random base"),
               "baseline": ExperimentResult("baseline", "fp-base", base),
               "+aal": ExperimentResult("+aal", "fp-aal", [], missing="not selected (experiments.a2bfr)"),
               "attrface": ExperimentResult("attrface", "fp-full", [], missing="not selected")}
    tables = {t.title.split(" · deltas")[0]: t for t in paper_tables(exps, results, [], model="a2bfr")}
    tab4 = next(t for title, t in tables.items() if title.startswith("A²BFR Tab. 4"))
    labels = [label for label, _ in tab4.rows]
    assert [label for label in labels if "(published)" not in label] == ["baseline", "+aal", "+sdt", "full"]
    assert labels.index("full") == labels.index("Ours (published)") + 1  # below the paper row it stands for
    cells = dict(tab4.rows)
    assert math.isclose(cells["full"]["restoration:ids"].delta, 0.1)
    assert math.isclose(cells["full"]["attribute:lpips"].delta, -0.1)
    assert cells["baseline"]["restoration:ids"].delta is None  # the reference row carries no delta
    assert cells["full"]["attribute:aa"].value is None and cells["full"]["attribute:aa"].note == \
        "no VLM judge configured"
    assert cells["+aal"]["restoration:ids"].note == "not selected (experiments.a2bfr)"
    assert cells["+sdt"]["restoration:ids"].note == "experiment a2bfr/+sdt was not run"
    md = tab4.markdown()
    assert "0.5000 (+0.1000)" in md and "] tiny random base" in md
    tab5 = next(t for title, t in tables.items() if title.startswith("A²BFR Tab. 5"))
    assert [label for label, _ in tab5.rows if "(published)" not in label] == ["attrface (= full: same run)",
                                                                              "ffhq_only"]
    assert dict(tab5.rows)["attrface (= full: same run)"]["restoration:ids"].value == 0.5
    tab2 = tables["A²BFR Tab. 2 · restoration · AttrFace-90K-Test"]
    assert [label for label, _ in tab2.rows][0] == "GFPGAN (published)"
    assert dict(tab2.rows)["bicubic"]["restoration:ids"].note.startswith("baselines not evaluated")
    for table in tables.values():  # every cell: a number, text, or n/a with its reason
        for _, row in table.rows:
            assert set(row) <= set(table.columns)
            for cell in row.values():
                assert cell.value is not None or cell.note or cell.text


def test_lambda_zero_trains_another_lora_and_one_config_trains_once(tmp_path, training_zoo, shard_dir):
    """+aal and baseline differ only in lambda: same seed and data, different LoRAs. The same experiment under a
    second name resolves to the same run folder, and training it again resumes the finished run: nothing retrains."""
    from safetensors.torch import load_file

    from attrface_pipeline.builders import a2bfr_train_config, build_gt_latents, build_text_embeddings
    from training.a2bfr.train import train

    mine = tmp_path / "mine.yaml"
    mine.write_text("a2bfr:\n  aal_again:\n    overrides: {mode: single, lq_from: random}\n")
    cfg = load_config(overrides={
        "paths": {"data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
        "models": {"flux": str(training_zoo / "flux"), "farl": str(training_zoo / "farl")},
        "a2bfr": {"max_steps": 3, "checkpoint_every": 3, "sample_faces": 0, "lora_rank": 4},
        "experiments": {"files": [str(mine)]}})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "attrface_shards").symlink_to(shard_dir)
    build_text_embeddings(cfg, log=lambda m: None)  # what the jobs run before training: the cached encoders' output
    build_gt_latents(cfg, log=lambda m: None)
    defined = load_experiments(cfg.experiments.files)["a2bfr"]
    runs = {}
    for name in ("+aal", "baseline", "aal_again"):
        train_cfg = a2bfr_train_config(experiment_config(cfg, defined[name]), shards=str(shard_dir))
        result, _ = train(train_cfg, log=lambda m: None)
        runs[name] = (train_cfg, result)
    (aal_cfg, aal), (base_cfg, base), (again_cfg, again) = runs["+aal"], runs["baseline"], runs["aal_again"]
    assert aal_cfg.loss.aal_weight > 0 and base_cfg.loss.aal_weight == 0
    assert aal_cfg.model_dump(exclude={"loss", "train"}) == base_cfg.model_dump(exclude={"loss", "train"})
    assert aal_cfg.train.seed == base_cfg.train.seed and aal.step == base.step == 3
    lora_a = load_file(aal.final_dir / "pytorch_lora_weights.safetensors")
    lora_b = load_file(base.final_dir / "pytorch_lora_weights.safetensors")
    assert lora_a.keys() == lora_b.keys() and any(not (lora_a[k] == lora_b[k]).all() for k in lora_a)
    assert again_cfg.train.output_dir == aal_cfg.train.output_dir
    assert again.resumed_from == 3 and again.step == 3  # the finished run: no step trained again
