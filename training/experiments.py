"""Named experiments: a model, overrides of its config section and the paper tables it is a row of.

The project ships the papers' rows (``configs/experiments.yaml``: A²BFR Tab. 4/5 ablations, RoboFace Tab. 5-9);
users add or replace experiments in their own YAML files of the same shape (``experiments.files``)::

    a2bfr:
      my_margin:
        description: a wider dual-loss margin
        overrides: {sdt_margin: 0.5}
        tables: [a2bfr_tab4]
        paper_row: Ours  # optional: the published row it stands for (or {table: row name})

An experiment's overrides are validated against its model's config section (``a2bfr`` / ``roboface``) when the
file is read, so a typo names the file, the experiment and the key. Its *fingerprint* is the resolved training
config (``attrface_pipeline.builders``): the run folder is named by it, so two names with one fingerprint share one
run folder and train once.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attrface_pipeline.config import CONFIGS_DIR, A2BFRConfig, RoboFaceSection, YAMLFileError, read_yaml, \
    validation_lines

MODELS = ("a2bfr", "roboface")
INVALID_NAME_CHARACTERS = set("|,[]/ \t\n")  # Dagster partition keys and run-folder names
BODY_FIELDS = ("description", "overrides", "tables", "paper_row")
NOT_OVERRIDABLE = ("output_dir", "num_processes")  # where and how wide a run goes is not part of an experiment
# The papers' tables an experiment may be a row of, and whose experiments their rows are. training.eval.paper's
# PAPER_TABLES lays each one out; this plain list lets a file be checked without importing the evaluation code.
PAPER_TABLE_MODELS: dict[str, str] = {
    "a2bfr_tab2": "a2bfr", "a2bfr_tab3": "a2bfr", "a2bfr_tab4": "a2bfr", "a2bfr_tab5": "a2bfr",
    "roboface_tab2": "roboface", "roboface_tab3": "roboface", "roboface_tab5": "roboface", "roboface_tab6": "roboface",
    "roboface_tab7": "roboface", "roboface_tab8": "roboface", "roboface_tab9": "roboface",
}
SECTIONS: dict[str, type[BaseModel]] = {"a2bfr": A2BFRConfig, "roboface": RoboFaceSection}


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)
    tables: tuple[str, ...] = ()
    # paper table -> the published row it stands for (configs/published_tables.yaml's method name): the paper
    # tables place it below that row and show its difference to the published numbers
    paper_row: dict[str, str] = Field(default_factory=dict)
    source: str = ""  # the file that defined it

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"


class ExperimentError(ValueError):
    """An experiments file that cannot be used: one line per problem, naming the file, the experiment and the key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = self.problems[0] if len(self.problems) == 1 else "invalid experiments:\n" + "\n".join(
            f"  {p}" for p in self.problems)
        super().__init__(text)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(value), f"a {type(value).__name__}")


def _tables_of(model: str) -> list[str]:
    return [t for t, m in PAPER_TABLE_MODELS.items() if m == model]


def override_problems(model: str, overrides: dict[Any, Any], where: str) -> list[str]:
    """Every problem of an experiment's overrides, one line each naming ``where`` and the key: keys that are not
    settings of the model's section (with the closest one), keys an experiment may not set, and values the setting
    itself would refuse (the overrides applied to the section's defaults, validated like a config file's)."""
    section = SECTIONS[model]
    fields = sorted(section.model_fields)
    problems = []
    for key in overrides:
        if not isinstance(key, str) or key not in section.model_fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}: overrides.{key}: not a key of the {model} section{hint}")
        elif key in NOT_OVERRIDABLE:
            problems.append(f"{where}: overrides.{key}: an experiment may not set it (where and how wide a run goes "
                            f"is not part of an experiment; set {model}.{key} in the config)")
    known = {k: v for k, v in overrides.items() if isinstance(k, str) and k in section.model_fields}
    try:
        section.model_validate(known)
    except ValidationError as err:
        problems += validation_lines(err, "overrides.", where=where, model=section)
    return problems


def _experiment(path: Path, model: str, name: Any, body: Any) -> tuple[Experiment | None, list[str]]:
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # `2024:` names experiment "2024"
    where = f"{path}: {model}.{name}"
    if not isinstance(name, str) or not name or set(name) & INVALID_NAME_CHARACTERS:
        return None, [f"{where}: names may not contain spaces or any of | , [ ] / (and must be text)"]
    if body is None:
        body = {}
    if not isinstance(body, dict):
        return None, [f"{where}: must be a mapping ({', '.join(BODY_FIELDS[:3])}), got {_kind(body)}"]
    problems = []
    unknown = [str(k) for k in body if k not in BODY_FIELDS]
    if unknown:
        problems.append(f"{where}: unknown field(s) {unknown}; use {', '.join(BODY_FIELDS)}")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(f"{where}: description: must be text, got {_kind(description)}")
    overrides = body.get("overrides")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        problems.append(f"{where}: overrides: must be a mapping of {model} setting -> value, got {_kind(overrides)}")
    else:
        problems += override_problems(model, overrides, where)
    tables = body.get("tables")
    if tables is None:
        tables = []
    allowed = ", ".join(_tables_of(model))
    if not isinstance(tables, list):
        problems.append(f"{where}: tables: must be a list of paper table names (e.g. [{_tables_of(model)[0]}]), got "
                        f"{_kind(tables)}")
    else:
        for table in tables:
            if table not in PAPER_TABLE_MODELS:
                close = difflib.get_close_matches(str(table), list(PAPER_TABLE_MODELS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where}: tables: {table!r} is not a paper table{hint}; {model} tables: {allowed}")
            elif PAPER_TABLE_MODELS[table] != model:
                problems.append(f"{where}: tables: {table!r} is a {PAPER_TABLE_MODELS[table]} table; {model} "
                                f"tables: {allowed}")
    paper_row = body.get("paper_row")
    if isinstance(paper_row, str) and paper_row and isinstance(tables, list):
        paper_row = {t: paper_row for t in tables}  # one name: the same row in each of its tables
    if paper_row is None:
        paper_row = {}
    if not isinstance(paper_row, dict) or not all(isinstance(v, str) and v for v in paper_row.values()):
        problems.append(f"{where}: paper_row: must be the published row's name, or a mapping of paper table -> "
                        f"row name, got {_kind(paper_row)}")
    elif isinstance(tables, list):
        problems += [f"{where}: paper_row: {t!r} is not one of its tables ({', '.join(map(str, tables)) or 'none'})"
                     for t in paper_row if t not in tables]
    if problems:
        return None, problems
    return Experiment(name=name, model=model, description=description or "", overrides=dict(overrides),
                      tables=tuple(dict.fromkeys(tables)), paper_row=dict(paper_row), source=str(path)), []


def read_experiments(path: str | Path) -> dict[str, dict[str, Experiment]]:
    """The experiments of one YAML file, by model then name; :class:`ExperimentError` lists every problem, one line
    each naming the file, the experiment and the key: an unreadable file, a wrong shape, a name given twice,
    unknown keys or tables, and override values their setting refuses."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except YAMLFileError as err:
        hint = " (an experiments file, from experiments.files)" if not path.is_file() else ""
        raise ExperimentError(f"{err}{hint}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: must hold a mapping of model -> experiments ({' / '.join(MODELS)}), got "
                              f"{_kind(data)}")
    problems: list[str] = []
    out: dict[str, dict[str, Experiment]] = {}
    for model, entries in data.items():
        if model not in MODELS:
            problems.append(f"{path}: {model}: unknown model; experiments are listed under {' or '.join(MODELS)}")
            continue
        if entries is None:
            continue
        if not isinstance(entries, dict):
            problems.append(f"{path}: {model}: must be a mapping of experiment name -> experiment, got "
                            f"{_kind(entries)}")
            continue
        for name, body in entries.items():
            experiment, found = _experiment(path, model, name, body)
            problems += found
            if experiment is not None:
                out.setdefault(model, {})[name] = experiment
    if problems:
        raise ExperimentError(problems)
    return out


def load_experiments(files: list[str | Path]) -> dict[str, dict[str, Experiment]]:
    """The shipped experiments, then each file's (a name defined again replaces the earlier one). The problems of
    every file are raised together, as one :class:`ExperimentError`."""
    merged: dict[str, dict[str, Experiment]] = {m: {} for m in MODELS}
    problems: list[str] = []
    for path in [CONFIGS_DIR / "experiments.yaml", *files]:
        try:
            found = read_experiments(path)
        except ExperimentError as err:
            problems += err.problems
            continue
        for model, entries in found.items():
            merged[model].update(entries)
    if problems:
        raise ExperimentError(problems)
    return merged


def select(experiments: dict[str, dict[str, Experiment]], model: str, names: list[str]) -> list[Experiment]:
    """The chosen experiments of ``model`` in the given order (``["all"]``: every defined one)."""
    defined = experiments.get(model, {})
    if names == ["all"]:
        return list(defined.values())
    missing = [n for n in names if n not in defined]
    if missing:
        raise ExperimentError(f"experiments.{model}: {missing} not defined; defined: {', '.join(defined)}")
    return [defined[n] for n in names]
