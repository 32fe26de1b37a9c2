"""Training and evaluation of A²BFR and RoboFace on AttrFace shards (framework code only, no Dagster)."""

import attrface_pipeline  # noqa: F401 - its logging filters (the torchvision fallback line) apply here too
