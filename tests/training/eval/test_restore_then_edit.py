"""The restore-then-edit baseline (A²BFR Tab. 3's two-stage protocol) is the project's own parts: a restorer, then
the project's FlowEditor -- the same output as calling the editor directly on the restorations."""

import cv2
import numpy as np
import pytest

from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.flowedit import FlowEditor, FlowEditParams
from training.eval.report import bicubic_restore, restore_then_edit

SRC = "A close-up portrait photo of a young woman."
TAR = "A close-up portrait photo of a young woman wearing eyeglasses."


@pytest.fixture(scope="module")
def lqs(samples):
    paths = sorted(p for p in (samples / "hq").iterdir() if p.suffix in {".jpg", ".png"})[:2]
    return [cv2.resize(read_rgb(p), (96, 96), interpolation=cv2.INTER_AREA) for p in paths]


def test_edit_stage_is_the_flow_editor(tiny_zoo, lqs):
    editor = FlowEditor.from_pretrained(tiny_zoo / "sd3")
    params = FlowEditParams(steps=6, n_max=4, max_sequence_length=32)
    seen = []

    def restore(images, prompts):
        seen.append(prompts)
        return bicubic_restore(2)(images)

    run = restore_then_edit(restore, editor, params, prompt="A photo of a human face", resolution=64, seed=3)
    out = run(lqs, [TAR, TAR], [SRC, SRC])
    restored = bicubic_restore(2)(lqs)
    small = [cv2.resize(r, (64, 64), interpolation=cv2.INTER_AREA) for r in restored]
    direct, _ = editor.edit(small, [SRC, SRC], [TAR, TAR], params, [3, 3])
    expected = [cv2.resize(e, (96, 96), interpolation=cv2.INTER_CUBIC) for e in direct]
    assert all(np.array_equal(o, e) for o, e in zip(out, expected))
    assert seen[0] == ["A photo of a human face"] * 2  # the restore stage is prompt-agnostic
    # the plain restoration (source prompt requested): nothing to edit
    same = run(lqs, [SRC, SRC], [SRC, SRC])
    assert all(np.array_equal(o, r) for o, r in zip(same, restored))
