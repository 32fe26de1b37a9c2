"""The built wheel, installed outside the checkout: `attrface demo` builds into the current directory with the
configs and sample photos the wheel ships, never into the installed package."""

import os
import shutil
import subprocess
import sys

import pytest

from attrface_pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.slow
SOURCES = ["pyproject.toml", "README.md", "attrface_pipeline", "training", "configs", "data/samples",
           "dagster_home/dagster.yaml"]


def test_the_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    src = tmp_path / "src"  # a clean copy, so building leaves nothing in the checkout
    for rel in SOURCES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if (PROJECT_ROOT / rel).is_dir():
            shutil.copytree(PROJECT_ROOT / rel, src / rel, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(PROJECT_ROOT / rel, src / rel)
    run = {"capture_output": True, "text": True, "timeout": 900}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], **run)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("attrface-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTRFACE_", "DAGSTER_"))}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import attrface_pipeline.config as c; print(c.__file__, "
                            "c.IN_CHECKOUT, c.SAMPLES_DIR)"], cwd=work, env=env, **run)
    assert where.stdout.split() == [str(site / "attrface_pipeline" / "config.py"), "False",
                                    str(site / "attrface_pipeline" / "_shipped" / "samples")], where.stderr
    photo = site / "attrface_pipeline" / "_shipped" / "samples" / "faces" / "hq" / "obama.jpg"
    assert photo.is_file() and not photo.is_symlink()  # shipped as a file
    (work / "demo.yaml").write_text(  # one shipped photo; the tiny models the suite already made
        f"source:\n  paths: [{photo}]\npaths:\n  cache_dir: {PROJECT_ROOT / 'data' / 'cache'}\n")
    demo = subprocess.run([sys.executable, "-m", "attrface_pipeline.cli", "demo", "-c", "demo.yaml"], cwd=work,
                          env=env, **run)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "AttrFace built in" in demo.stdout and "dagster job execute -m attrface_pipeline.definitions" in demo.stdout
    assert list((work / "data" / "build" / "attrface_shards").rglob("*.tar"))
    assert (work / "dagster_home" / "dagster.yaml").is_file()
    assert not (site / "data").exists() and not (site / "dagster_home").exists()  # nothing inside the package
