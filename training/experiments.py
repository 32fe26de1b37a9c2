"""Named experiments: a model, overrides of its config section and the paper tables it is a row of.

The project ships the papers' rows (``configs/experiments.yaml``: A²BFR Tab. 4/5 ablations, RoboFace Tab. 5-9);
users add or replace experiments in their own YAML files of the same shape (``experiments.files``)::

    a2bfr:
      my_margin:
        description: a wider dual-loss margin
        overrides: {sdt_margin: 0.5}
        tables: [a2bfr_tab4]

An experiment's overrides are validated against its model's config section (``a2bfr`` / ``roboface``) when the
file is read, so a typo names the file, the experiment and the key. Its *fingerprint* is the resolved training
config (``attrface_pipeline.builders``): the run folder is named by it, so two names with one fingerprint share one
run folder and train once.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

MODELS = ("a2bfr", "roboface")
INVALID_NAME_CHARACTERS = set("|,[]/ \t\n")  # Dagster partition keys and run-folder names


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)
    tables: tuple[str, ...] = ()
    source: str = ""  # the file that defined it

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"


class ExperimentError(ValueError):
    """An experiments file that cannot be used: one line per problem, naming the file, the experiment and the key."""


def _section_fields(model: str) -> set[str]:
    from attrface_pipeline.config import A2BFRConfig, RoboFaceSection

    return set((A2BFRConfig if model == "a2bfr" else RoboFaceSection).model_fields)


def read_experiments(path: str | Path) -> dict[str, dict[str, Experiment]]:
    """The experiments of one YAML file, by model then name; :class:`ExperimentError` lists every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ExperimentError(f"experiments file {path} does not exist (experiments.files)") from None
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: must hold a mapping of model -> experiments, got {type(data).__name__}")
    problems: list[str] = []
    out: dict[str, dict[str, Experiment]] = {}
    for model, entries in data.items():
        if model not in MODELS:
            problems.append(f"{path}: {model}: unknown model; experiments are listed under {' or '.join(MODELS)}")
            continue
        fields = _section_fields(model)
        for name, body in (entries or {}).items():
            name = str(name)
            where = f"{path}: {model}.{name}"
            if not name or set(name) & INVALID_NAME_CHARACTERS:
                problems.append(f"{where}: names may not contain spaces or any of | , [ ] /")
                continue
            body = body or {}
            if not isinstance(body, dict):
                problems.append(f"{where}: must be a mapping (description, overrides, tables)")
                continue
            unknown = set(body) - {"description", "overrides", "tables"}
            if unknown:
                problems.append(f"{where}: unknown field(s) {sorted(unknown)}; use description, overrides, tables")
            overrides = body.get("overrides") or {}
            for key in overrides:
                if key not in fields:
                    close = difflib.get_close_matches(key, sorted(fields), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    problems.append(f"{where}: overrides.{key}: not a key of the {model} section{hint}")
            if key_clash := {"output_dir", "num_processes"} & set(overrides):
                problems.append(f"{where}: overrides may not set {sorted(key_clash)} (where and how wide a run goes "
                                f"is not part of an experiment)")
            out.setdefault(model, {})[name] = Experiment(
                name=name, model=model, description=str(body.get("description") or ""), overrides=dict(overrides),
                tables=tuple(body.get("tables") or ()), source=str(path))
    if problems:
        raise ExperimentError("invalid experiments:\n" + "\n".join(f"  {p}" for p in problems))
    return out


def load_experiments(files: list[str | Path]) -> dict[str, dict[str, Experiment]]:
    """The shipped experiments, then each file's (a name defined again replaces the earlier one)."""
    from attrface_pipeline.config import CONFIGS_DIR

    merged: dict[str, dict[str, Experiment]] = {m: {} for m in MODELS}
    for path in [CONFIGS_DIR / "experiments.yaml", *files]:
        for model, entries in read_experiments(path).items():
            merged[model].update(entries)
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
