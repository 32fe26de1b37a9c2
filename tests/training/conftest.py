"""Shared training fixtures: tiny real shards built from the sample photos."""

import cv2
import numpy as np
import pytest

from attrface_pipeline.attributes import ADD, CELEBA_ATTRIBUTES, DEFAULT_CONTROLLABLE, REMOVE
from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.shards import Sample, write_split

SIZE, SHARDS, PER_SHARD = 64, 6, 3


def _square(rgb, size):
    h, w = rgb.shape[:2]
    side = min(h, w)
    crop = rgb[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def _meta(key, face, attribute, direction, probs, rng):
    states = {a: "positive" if probs[a] > 0.6 else "negative" if probs[a] < 0.4 else "unknown"
              for a in DEFAULT_CONTROLLABLE}
    return {"key": key, "source_dataset": "attrface-test", "image_key": face.split("_")[0], "face_key": face,
            "attributes": {"probabilities": probs, "states": states},
            "edit": {"attribute": attribute, "direction": direction, "seed": int(rng.integers(1 << 31)),
                     "resolution": SIZE, "flowedit": {"steps": 10, "n_max": 7}},
            "source_prompt": f"a portrait of {face}.", "target_prompt": f"a portrait of {face}, edited.",
            "qc": {"identity_similarity": 0.71, "ssim": 0.9, "pass_attribute": True}, "review": None,
            "provenance": {"editor": "tiny-sd3", "attribute_model": "tiny-farl"}}


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, samples):
    """6 train shards x 3 pairs from the real HQ sample photos: source = the face, target = mirrored and brighter."""
    tmp = tmp_path_factory.mktemp("train_shards")
    photos = sorted(p for p in (samples / "hq").iterdir() if p.suffix in {".jpg", ".png"})
    rng = np.random.default_rng(0)
    pairs = []
    for n in range(SHARDS * PER_SHARD):
        rgb = _square(read_rgb(photos[n % len(photos)]), SIZE)
        src, tar = tmp / f"src{n}.jpg", tmp / f"tar{n}.jpg"
        src.write_bytes(encode_image(rgb, "jpg"))
        tar.write_bytes(encode_image(np.clip(rgb[:, ::-1].astype(int) + 40, 0, 255).astype(np.uint8), "jpg"))
        probs = {a: round(float(p), 5) for a, p in zip(CELEBA_ATTRIBUTES, rng.uniform(0, 1, 40))}
        attribute = DEFAULT_CONTROLLABLE[n % len(DEFAULT_CONTROLLABLE)]
        direction = ADD if n % 2 else REMOVE
        face = f"img{n:03d}_00"
        key = f"{face}_{attribute}_{direction}"
        meta = _meta(key, face, attribute, direction, probs, rng)
        pairs.append(Sample(key, "train", src, tar, meta, meta["source_prompt"], meta["target_prompt"]))
    write_split(pairs, tmp / "attrface_shards" / "train", "train", shard_size=PER_SHARD, log=lambda m: None)
    return tmp / "attrface_shards"




@pytest.fixture(scope="session")
def training_zoo(tmp_path_factory):
    """The tiny models the model-training tests load, generated once (without SD3, whose VAE fit takes minutes)."""
    from attrface_pipeline.models import tiny

    root = tmp_path_factory.mktemp("training_zoo")
    for name in ("flux", "farl"):
        tiny.generate(name, root / name)
    return root
