"""Every ``attrface`` and ``make`` command the README and docs/ quote exists with the options shown; the cheap ones
run. Commands are read from fenced code blocks and from inline code spans."""

import re
import shlex
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from attrface_pipeline.cli import app
from attrface_pipeline.config import PROJECT_ROOT

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
CHEAP = [["--help"], ["config"], ["restore", "--help"], ["evaluate", "--help"], ["bench-gpu", "--help"],
         ["job", "--help"], ["demo", "--help"]]


def _quoted(text: str, program: str) -> list[str]:
    """Command lines starting with ``program`` in code blocks (continuation lines joined) and inline code."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(program + " "):
                found.append(line)
    found += [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith(program + " ")]
    return found


def _commands():
    click_app = typer.main.get_command(app)
    return {name: cmd for name, cmd in click_app.commands.items()}


def _options(cmd) -> set[str]:
    return {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}


def _docs_lines(program):
    return [(doc.relative_to(PROJECT_ROOT).as_posix(), line) for doc in DOCS
            for line in _quoted(doc.read_text(), program)]


def test_every_quoted_attrface_command_and_option_exists():
    commands = _commands()
    problems, seen = [], 0
    for doc, line in _docs_lines("attrface"):
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace("<", "").replace(">", ""),
                            posix=True)[1:]
        if not words or words[0].startswith("-") or words[0] in ("…", "..."):  # a placeholder
            continue
        seen += 1
        name = words[0]
        if name not in commands:
            problems.append(f"{doc}: `{line}`: no command {name!r}")
            continue
        known = _options(commands[name])
        for word in words[1:]:
            option = word.split("=", 1)[0]
            if option.startswith("-") and option not in known and option not in ("-", "--"):
                problems.append(f"{doc}: `{line}`: {name} has no option {option}")
    assert seen >= 5 and not problems, "\n".join(problems)


def test_every_quoted_make_target_exists():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z0-9-]+):", makefile, flags=re.M))
    problems = [f"{doc}: `{line}`: no target {word!r}" for doc, line in _docs_lines("make")
                for word in shlex.split(line)[1:2] if not word.startswith("-") and word not in targets]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("args", CHEAP, ids=" ".join)
def test_cheap_commands_run(args):
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output


def test_make_help_lists_the_targets():
    done = subprocess.run(["make", "-s", "help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "make demo" in done.stdout and "make test" in done.stdout, done.stderr
    assert sys.executable  # the suite's interpreter runs the rest


def test_the_front_page_is_short_and_its_pictures_and_links_exist():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)\)", readme)
    assert any(t.endswith(".png") or t.endswith(".jpg") for t in targets)
    missing = [t for t in targets if not t.startswith("http") and not (PROJECT_ROOT / t).exists()]
    assert not missing, missing


def test_docs_describe_the_software_not_its_history():
    history = re.compile(r"\bissues? \d+|\bthis session\b|\bthe session\b|\bnot lent\b|\bno GPU (was )?lent\b|"
                         r"\bwhen the issue\b|\bprevious session\b", re.I)
    found = [f"{doc.relative_to(PROJECT_ROOT)}:{n}: {line.strip()}" for doc in DOCS
             for n, line in enumerate(doc.read_text().splitlines(), 1) if history.search(line)]
    assert not found, "\n".join(found)
