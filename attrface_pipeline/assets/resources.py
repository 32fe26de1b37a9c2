"""Dagster resources: the pipeline config, built from run config on top of the code location's defaults."""

from typing import Any, Optional

import dagster as dg

from attrface_pipeline.config import PipelineConfig, load_config


class AttrFaceConfig(dg.ConfigurableResource):
    """Which profile, YAML files and inline settings make up this run's :class:`PipelineConfig`.

    ``-c configs/full.yaml`` sets ``resources.attrface.config``; with nothing set, ``$ATTRFACE_CONFIG`` and
    ``$ATTRFACE_PROFILE`` decide (the same inputs the partitions were computed from).
    """

    profile: Optional[str] = None
    config_files: Optional[list[str]] = None
    settings: dict[str, Any] = {}

    def pipeline_config(self) -> PipelineConfig:
        return load_config(self.profile, self.config_files, self.settings or None)
