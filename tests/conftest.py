from pathlib import Path

import pytest

from attrface_pipeline.config import PROJECT_ROOT

SAMPLES = PROJECT_ROOT / "data" / "samples" / "faces"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def dlib_detector():
    from attrface_pipeline.stages.detect import DlibDetector

    return DlibDetector(max_side=1024, max_upscale=1.0)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """All tiny models, generated once per session through the public generator."""
    from attrface_pipeline.models import tiny

    root = tmp_path_factory.mktemp("tiny_zoo")
    for name in tiny.GENERATORS:
        tiny.generate(name, root / name)
    return root
