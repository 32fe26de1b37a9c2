"""Dagster resources: the pipeline config, built from run config on top of the code location's defaults."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import dagster as dg

from attrface_pipeline.assets.run_guard import exit_when_orphaned, hold_run_lock
from attrface_pipeline.config import PipelineConfig, load_config


class AttrFaceConfig(dg.ConfigurableResource):
    """Which profile, YAML files and inline settings make up this run's :class:`PipelineConfig`.

    ``-c configs/full.yaml`` sets ``resources.attrface.config``; with nothing set, ``$ATTRFACE_CONFIG`` and
    ``$ATTRFACE_PROFILE`` decide (the same inputs the partitions were computed from).
    """

    profile: Optional[str] = None
    config_files: Optional[list[str]] = None
    settings: dict[str, Any] = {}

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator["AttrFaceConfig"]:
        # Each step process joins its run's lock, so a step outliving a killed orchestrator keeps the run alive
        # (and its GPU slot held) until it ends; see assets/run_guard.py.
        if context.instance is None or not context.run_id:
            yield self
            return
        with hold_run_lock(context.instance, context.run_id):
            finished = exit_when_orphaned(context.instance, context.run_id)
            try:
                yield self
            finally:
                finished.set()

    def pipeline_config(self) -> PipelineConfig:
        return load_config(self.profile, self.config_files, self.settings or None)
