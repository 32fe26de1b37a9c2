"""Command-line options declared once with their domain.

Every option and argument of the ``attrface`` command line takes one of the domains below as its ``parser``; the
domain converts the text, refuses anything outside it while the command line is parsed -- before any config,
model or file is loaded -- and typer turns the refusal into exit status 2 and one line naming the option, the value
and what is allowed::

    Error: Invalid value for '--steps': 0 is not allowed: an integer from 1 to 1000

Options that set a config key take :class:`ConfigKey`, whose domain *is* the pydantic field of that key
(``attrface_pipeline.config``): the command line, the YAML config files and the experiments' overrides are checked
by the same declaration.

Each domain also lists the hostile values it must refuse (:meth:`Domain.hostile`), so the generative test
(``tests/test_cli_domains.py``) tries every option of the app with them the day the option is added, and fails on
an option that has no domain.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import typer

# Placeholders in hostile/valid samples, filled in by the test with real paths of its own.
FILE, DIR, MISSING, UNDER_FILE = "{file}", "{dir}", "{missing}", "{file}/x"


def refuse(value: Any, allowed: str) -> typer.BadParameter:
    shown = repr(value) if isinstance(value, str) else str(value)
    return typer.BadParameter(f"{shown} is not allowed: {allowed}")


class Domain:
    """What one option accepts. ``__call__`` is typer's parser: text in, value out, or :class:`typer.BadParameter`."""

    def describe(self) -> str:
        raise NotImplementedError

    def convert(self, text: str) -> Any:
        raise NotImplementedError

    def __call__(self, text: Any) -> Any:
        if not isinstance(text, str):  # a default value, already of the right type
            return text
        return self.convert(text)

    def hostile(self) -> list[str]:
        """Values this domain must refuse (placeholders: :data:`FILE`, :data:`DIR`, :data:`MISSING`)."""
        return []

    def valid(self) -> str:
        """One value it accepts (to fill other required options while one is fuzzed)."""
        raise NotImplementedError


class Number(Domain):
    """A finite int or float in [lo, hi], optionally a multiple of ``multiple``."""

    def __init__(self, kind: type = float, lo: float | None = None, hi: float | None = None, *,
                 multiple: int | None = None, what: str = ""):
        self.kind, self.lo, self.hi, self.multiple, self.what = kind, lo, hi, multiple, what

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        lo, hi = (_show(b) for b in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            out = f"{noun} from {lo} to {hi}"
        elif self.lo is not None:
            out = f"{noun} of at least {lo}"
        elif self.hi is not None:
            out = f"{noun} of at most {hi}"
        else:
            out = noun
        if self.multiple:
            out += f", a multiple of {self.multiple}"
        return out + (f" ({self.what})" if self.what else "")

    def convert(self, text: str) -> int | float:
        try:
            value = int(text.strip(), 10) if self.kind is int else float(text)
        except ValueError:
            raise refuse(text, self.describe()) from None
        if (isinstance(value, float) and not math.isfinite(value)) or \
                (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi) or \
                (self.multiple and value % self.multiple):
            raise refuse(text, self.describe())
        return value

    def hostile(self) -> list[str]:
        out = ["", "abc", "nan", "inf", "-inf"]
        if self.kind is int:
            out += ["1.5", str(2 ** 70)]
        if self.lo is not None:
            out.append(_show(self.lo - 1))
        if self.hi is not None:
            out.append(_show(self.hi * 10 + 1))
        if self.multiple:
            out.append(str(int(self.lo or 0) + self.multiple + 1))
        return out

    def valid(self) -> str:
        value = self.lo if self.lo is not None else 1
        if self.multiple:
            value = math.ceil(value / self.multiple) * self.multiple
        return f"{int(value)}" if self.kind is int else f"{value:g}"


def _show(bound: float | None) -> str:
    return str(int(bound)) if bound is not None and float(bound).is_integer() else f"{bound}"


def Int(lo: int | None = 0, hi: int | None = None, **kw) -> Number:  # noqa: N802 - reads as a type
    return Number(int, lo, hi, **kw)


def Float(lo: float | None = None, hi: float | None = None, **kw) -> Number:  # noqa: N802
    return Number(float, lo, hi, **kw)


PORT = Int(1, 65535)
SEED = Int(0, 2 ** 32 - 1, what="the seed of every face's noise")


class Choice(Domain):
    """One of a fixed set of words; ``choices`` may be a function, called when the option is parsed (for lists that
    live in modules too heavy to import when the command line is built)."""

    def __init__(self, choices: Iterable[str] | Callable[[], Iterable[str]]):
        self._choices = choices

    @property
    def choices(self) -> list[str]:
        return list(self._choices() if callable(self._choices) else self._choices)

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)

    def convert(self, text: str) -> str:
        if text not in self.choices:
            raise refuse(text, self.describe())
        return text

    def hostile(self) -> list[str]:
        return ["", "bogus", "../x", self.choices[0].upper() + "_"]

    def valid(self) -> str:
        return self.choices[0]


PROFILE = Choice(("offline", "full"))


class Text(Domain):
    """Free text of at most ``max_len`` characters (``empty``: whether "" is allowed)."""

    def __init__(self, max_len: int = 4096, *, empty: bool = False, what: str = "text"):
        self.max_len, self.empty, self.what = max_len, empty, what

    def describe(self) -> str:
        return f"{'' if self.empty else 'non-empty '}{self.what} of at most {self.max_len} characters"

    def convert(self, text: str) -> str:
        if (not self.empty and not text.strip()) or len(text) > self.max_len or "\x00" in text:
            raise refuse(text if len(text) < 60 else text[:40] + "...", self.describe())
        return text

    def hostile(self) -> list[str]:
        return ["x" * (self.max_len + 1)] + ([] if self.empty else ["", "  "])

    def valid(self) -> str:
        return "x"


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class Name(Domain):
    """A piece of a file or folder name: letters, digits, ``._+-``; no separator, no ``..``, at most 64 long."""

    def __init__(self, what: str = "a name"):
        self.what = what

    def describe(self) -> str:
        return f"{self.what}: letters, digits and . _ + - (no path separators, not starting with a dot), at most 64"

    def convert(self, text: str) -> str:
        if not _NAME_OK.match(text) or ".." in text or len(text) > 64:
            raise refuse(text, self.describe())
        return text

    def hostile(self) -> list[str]:
        return ["", "/../../x", "a/b", "..", "a\\b", ".hidden", "x" * 65]

    def valid(self) -> str:
        return "a"


class PathArg(Domain):
    """A path: ``kind`` file | dir | any; ``exists`` True (must), False (must not) or None (either, but when it
    exists it must be of ``kind``; a new file's folder must exist or be creatable, not be a file)."""

    def __init__(self, kind: str = "any", exists: bool | None = True, what: str = ""):
        if kind not in ("file", "dir", "any"):
            raise ValueError(kind)
        self.kind, self.exists, self.what = kind, exists, what

    def describe(self) -> str:
        noun = {"file": "a file", "dir": "a folder", "any": "a file or folder"}[self.kind]
        state = {True: "that exists", False: "that does not exist yet", None: "(created when missing)"}[self.exists]
        return f"{noun} {state}" + (f" ({self.what})" if self.what else "")

    def convert(self, text: str) -> Path:
        if not text.strip() or "\x00" in text:
            raise refuse(text, self.describe())
        path = Path(text).expanduser()
        try:
            present = path.exists()
        except OSError as err:  # a name too long, a component that is a file
            raise refuse(text, f"{self.describe()} ({err.strerror})") from None
        if self.exists is True and not present:
            raise refuse(text, f"{self.describe()}; nothing is there")
        if self.exists is False and present:
            raise refuse(text, f"{self.describe()}; something is already there")
        if present and self.kind == "file" and not path.is_file():
            raise refuse(text, f"{self.describe()}; it is a folder")
        if present and self.kind == "dir" and not path.is_dir():
            raise refuse(text, f"{self.describe()}; it is a file")
        if not present:
            parent = next((p for p in path.absolute().parents if p.exists()), None)
            if parent is not None and not parent.is_dir():
                raise refuse(text, f"{self.describe()}; {parent} is a file, not a folder")
            if parent is not None and not os.access(parent, os.W_OK):
                raise refuse(text, f"{self.describe()}; {parent} is not writable")
        return path

    def hostile(self) -> list[str]:
        out = ["", UNDER_FILE]
        if self.exists is True:
            out.append(MISSING)
        if self.exists is False:
            out.append(FILE)
        if self.kind == "file":
            out.append(DIR)
        if self.kind == "dir":
            out.append(FILE)
        return out

    def valid(self) -> str:
        if self.exists is False:
            return MISSING
        return FILE if self.kind == "file" else DIR


class Resume(Domain):
    """latest | none | a checkpoint folder (one holding ``trainer_state.json``)."""

    def describe(self) -> str:
        return "latest, none, or a checkpoint folder (one holding trainer_state.json)"

    def convert(self, text: str) -> str:
        if text in ("latest", "none"):
            return text
        path = Path(text).expanduser() if text.strip() and "\x00" not in text else None
        if path is None or not path.is_dir():
            raise refuse(text, self.describe() + ("; it is a file" if path is not None and path.is_file() else
                                                  "; nothing is there" if path is not None else ""))
        if not (path / "trainer_state.json").is_file():
            raise refuse(text, f"{self.describe()}; {path} has no trainer_state.json (checkpoints live in "
                               f"<run folder>/checkpoints/checkpoint-NNNNNN)")
        return str(path)

    def hostile(self) -> list[str]:
        return ["", "bogus", MISSING, FILE, DIR]

    def valid(self) -> str:
        return "latest"


RESUME = Resume()


class Device(Domain):
    """auto | cpu | cuda | cuda:N, and only what this machine's torch can run (checked when parsed)."""

    def describe(self) -> str:
        return "auto, cpu, cuda or cuda:N (a CUDA device this machine has)"

    def convert(self, text: str) -> str:
        m = re.fullmatch(r"cuda(?::(\d{1,3}))?", text)
        if text in ("auto", "cpu"):
            return text
        if not m:
            raise refuse(text, self.describe() + (": this build of torch runs on CUDA or the CPU" if text else ""))
        import torch

        if not torch.cuda.is_available():
            raise refuse(text, "auto or cpu: CUDA is not available on this machine")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise refuse(text, f"a CUDA device index below {torch.cuda.device_count()}")
        return text

    def hostile(self) -> list[str]:
        return ["", "mps", "tpu", "cuda:-1", "cuda:x", "cuda:999"]

    def valid(self) -> str:
        return "cpu"


class ConfigKey(Domain):
    """The domain of a config key (``"a2bfr.batch_size"``): its pydantic field, with the config's own rules
    (finite floats), so the CLI, config files and experiments' overrides agree by construction."""

    def __init__(self, key: str):
        self.key = key
        self._adapter = None

    def field(self):
        from attrface_pipeline.config import PipelineConfig

        model, info = PipelineConfig, None
        for part in self.key.split("."):
            info = model.model_fields[part]
            model = info.annotation
        return info

    def adapter(self):
        if self._adapter is None:
            from typing import Annotated

            from pydantic import ConfigDict, TypeAdapter

            info = self.field()
            self._adapter = TypeAdapter(Annotated[info.annotation, info], config=ConfigDict(allow_inf_nan=False))
        return self._adapter

    def describe(self) -> str:
        info = self.field()
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        bounds = [f"{signs[name]} {bound:g}" for name, bound in _bounds(info)]
        return f"the config key {self.key} ({_type_name(info.annotation)}{', ' + ', '.join(bounds) if bounds else ''})"

    def convert(self, text: str) -> Any:
        from pydantic import ValidationError

        try:
            return self.adapter().validate_python(text)
        except ValidationError as err:
            why = "; ".join(e["msg"] for e in err.errors())
            raise typer.BadParameter(f"{text!r} is not allowed for the config key {self.key}: {why}") from None

    def hostile(self) -> list[str]:
        info = self.field()
        out: list[str] = ["", "abc"]
        for name, bound in _bounds(info):
            out.append(f"{bound + {'ge': -1, 'le': 1}.get(name, 0):g}")
        if _type_name(info.annotation) == "number":
            out += ["nan", "inf"]
        return out

    def valid(self) -> str:
        return str(self.field().default)


def _bounds(info: Any) -> list[tuple[str, float]]:
    """The (ge | gt | le | lt, bound) constraints of a pydantic field."""
    return [(name, getattr(m, name)) for m in info.metadata for name in ("ge", "gt", "le", "lt")
            if getattr(m, name, None) is not None]


def _type_name(annotation: Any) -> str:
    from typing import get_args

    if annotation is float:
        return "number"
    if annotation is int:
        return "integer"
    args = get_args(annotation)
    if args and all(isinstance(a, str) for a in args):
        return "one of " + ", ".join(args)
    return getattr(annotation, "__name__", str(annotation))


def domain_of(param: Any) -> Domain | None:
    """The declared domain of a typer option or argument object (what the generative test enumerates)."""
    info = getattr(getattr(param, "type_descriptor", None), "parameter_info", None)
    parser = getattr(info, "parser", None)
    return parser if isinstance(parser, Domain) else None


def options_of(command: Any) -> Sequence[Any]:
    """The options and arguments of a click/typer command that take a value (flags and --help take none)."""
    return [p for p in command.params if not getattr(p, "is_flag", False) and p.name != "help"]
