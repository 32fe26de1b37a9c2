"""Every option of the ``attrface`` command line, enumerated from the typer app itself, against the hostile values
of its declared domain: exit status 2, one error line naming the option, no traceback, nothing loaded. A new
option is covered the day it is added -- and fails here if it declares no domain."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from attrface_pipeline.cli import app
from attrface_pipeline.options import DIR, FILE, MISSING, UNDER_FILE, domain_of, options_of

COMMAND = typer.main.get_command(app)
CASES = [(name, p.name) for name, cmd in sorted(COMMAND.commands.items()) for p in options_of(cmd)]


def _param(command: str, name: str):
    return next(p for p in COMMAND.commands[command].params if p.name == name)


def _fill(value: str, places: dict[str, str]) -> str:
    for placeholder in (UNDER_FILE, FILE, DIR, MISSING):  # longest first: UNDER_FILE contains FILE
        value = value.replace(placeholder, places[placeholder])
    return value


def _args(command: str, param, value: str, places: dict[str, str]) -> list[str]:
    """The command with ``param`` set to ``value`` and every other required parameter set to a valid value."""
    options, positionals = [], []
    for other in COMMAND.commands[command].params:
        given = value if other is param else (
            _fill(domain_of(other).valid(), places) if other.required and domain_of(other) else None)
        if given is None:
            continue
        if other.param_type_name == "argument":
            positionals.append(given)
        else:
            options += [other.opts[0], given]
    return [command, *options, "--", *positionals] if positionals else [command, *options]


def test_the_app_has_options():
    assert len(CASES) > 50  # the enumeration sees the real app


@pytest.mark.parametrize(("command", "name"), CASES, ids=[f"{c}:{n}" for c, n in CASES])
def test_every_option_has_a_domain_and_refuses_its_hostile_values(command, name, tmp_path, monkeypatch):
    param = _param(command, name)
    domain = domain_of(param)
    assert domain is not None, (f"`attrface {command}` option {param.opts} declares no domain: give it "
                                f"parser=<an attrface_pipeline.options domain>")
    (tmp_path / "a_file.yaml").write_text("{}\n")
    (tmp_path / "a_dir").mkdir()
    places = {FILE: str(tmp_path / "a_file.yaml"), DIR: str(tmp_path / "a_dir"),
              MISSING: str(tmp_path / "missing" / "nothing"), UNDER_FILE: str(tmp_path / "a_file.yaml" / "x")}
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the checkout
    hostile = domain.hostile()
    assert hostile, f"{command} {param.opts}: the domain lists no hostile values"
    runner = CliRunner()
    for value in hostile:
        value = _fill(value, places)
        result = runner.invoke(app, _args(command, param, value, places))
        output = result.output
        assert result.exit_code == 2, f"attrface {command} {param.opts[0]} {value!r}: exit {result.exit_code}\n{output}"
        assert "Traceback" not in output and isinstance(result.exception, SystemExit), output
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, output
        named = [o.strip("-") for o in param.opts] + [param.name]
        assert any(n.lower() in errors[0].lower() for n in named), errors[0]


def test_valid_values_are_accepted_by_their_domains(tmp_path):
    """Each domain's own sample passes it (the fuzz above would otherwise prove nothing about the boundary)."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    places = {FILE: str(tmp_path / "f"), DIR: str(tmp_path / "d"), MISSING: str(tmp_path / "m"),
              UNDER_FILE: str(tmp_path / "f" / "x")}
    for command, name in CASES:
        domain = domain_of(_param(command, name))
        domain(_fill(domain.valid(), places))
