"""The GT images' VAE posteriors computed once: the frozen encoder does not run on fixed images every step.

A training loader's GT image is fixed for a sample (the published face, centre-cropped and resized to the training
resolution; only the LQ is random), so its VAE posterior is too. The cache stores the posterior's ``parameters``
(mean and log-variance, as the encoder outputs them) per ``<sample key>.<src|tar>``; training draws the latent from
them exactly as ``latent_dist.sample()`` draws it (the encoder itself consumes no random numbers), so the random
streams and the loss stay what they would be with the encoder running. Layout and writing are the text cache's
(``training/text_cache.py``): ``meta.json``, ``index.json``, ``part-*.safetensors``. At 512² a FLUX posterior is
2 x 16 x 64 x 64 values: 256 KiB in bf16, ~45 GiB for AttrFace-90K's 180K faces.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from training.text_cache import CacheFolder, write_entries

SIDES = ("src", "tar")


class LatentCacheMissError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "image missing from the latent cache"


def gt_images(shards_root: str | Path, resolution: int, split: str = "train") -> Iterator[tuple[str, np.ndarray]]:
    """(``<key>.<side>``, the GT image as the loader makes it) for both faces of every sample of ``split``."""
    from training.data import IMAGE_EXTENSIONS, _fit

    for shard in sorted((Path(shards_root) / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                side, _, fmt = ext.partition(".")
                if side in SIDES and fmt in IMAGE_EXTENSIONS:
                    data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
                    if bgr is None:
                        continue  # an undecodable face: the loader skips that sample too
                    yield f"{key}.{side}", _fit(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), resolution)


def build_latent_cache(encode: Callable[[torch.Tensor], torch.Tensor], shards_root: str | Path, folder: str | Path,
                       *, resolution: int, meta: dict, batch_size: int = 8,
                       log: Callable[[str], None] = print) -> dict:
    """Encode the GT images the cache lacks (``encode(images in [-1, 1]) -> posterior parameters``)."""
    from training.data import to_tensor

    items = [(key, key, image) for key, image in gt_images(shards_root, resolution)]

    def tensors(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"posterior": encode(torch.stack([to_tensor(i) for i in images]))}

    return write_entries(folder, items, tensors, meta={**meta, "resolution": resolution}, batch_size=batch_size,
                         log=log, what="GT latents")


class LatentCache(CacheFolder):
    """Read side: the posteriors of GT faces, verified as the text cache is (``CacheFolder``)."""

    def __init__(self, folder: str | Path, *, resolution: int | None = None):
        super().__init__(folder, missing="materialize gt_latents (job train_a2bfr does) or set a2bfr.latent_cache: "
                                         "false")
        if resolution is not None and self.meta.get("resolution") != resolution:
            raise ValueError(f"the latent cache {self.folder} holds {self.meta.get('resolution')} px faces, the run "
                             f"trains at {resolution}: materialize gt_latents for this resolution")

    def parameters(self, ids: list[str]) -> torch.Tensor:
        """The posteriors' parameters (B, 2C, h, w) of ``ids`` (``<key>.<side>``)."""
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise LatentCacheMissError(f"{len(missing)} face(s) missing from the latent cache {self.folder}: "
                                       f"{', '.join(missing[:3])}; re-materialize gt_latents after publishing")
        return torch.stack([self.tensor(i, "posterior") for i in ids])
