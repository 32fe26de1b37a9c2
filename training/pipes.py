"""Talk to Dagster from inside a training process launched through Dagster Pipes (no Dagster import: dagster_pipes).

``attrface_pipeline.assets.training.run_training_subprocess`` starts a trainer with ``accelerate launch`` under
``dg.PipesSubprocessClient``; the trainer wraps its work in :func:`pipes_session` and calls ``session.log(...)``
for progress and ``session.report({...})`` once at the end for the asset's materialization metadata. Launched any
other way (a terminal, a test) or on a non-main process (``RANK``/``LOCAL_RANK`` > 0), logs are printed and
``report`` does nothing, so trainer code never branches on how it was started.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"  # set by the Pipes client in the launched process's environment


def is_main_process() -> bool:
    """RANK and LOCAL_RANK (set by accelerate/torchrun) unset or 0."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "LOCAL_RANK"))


def launched_by_pipes() -> bool:
    return PIPES_CONTEXT_ENV in os.environ


def png_markdown_value(path: str | Path, alt: str | None = None) -> dict[str, str]:
    """A PNG file as a Pipes markdown metadata value with the image inline (shown by the Dagster UI)."""
    path = Path(path)
    data = base64.b64encode(path.read_bytes()).decode()
    return {"raw_value": f"![{alt or path.stem}](data:image/png;base64,{data})", "type": "md"}


def pipes_metadata_value(value: Any) -> dict[str, Any]:
    """One metadata entry in dagster_pipes' ``{"raw_value", "type"}`` form; a ``Path`` to a .png becomes an image."""
    if isinstance(value, Mapping) and set(value) == {"raw_value", "type"}:
        return dict(value)
    if isinstance(value, Path):
        return png_markdown_value(value) if value.suffix.lower() == ".png" else {"raw_value": str(value),
                                                                                   "type": "path"}
    if value is None:
        return {"raw_value": None, "type": "null"}
    if isinstance(value, bool):
        return {"raw_value": value, "type": "bool"}
    if isinstance(value, int):
        return {"raw_value": value, "type": "int"}
    if isinstance(value, float):
        return {"raw_value": value, "type": "float"} if math.isfinite(value) else {"raw_value": str(value),
                                                                                    "type": "text"}
    if isinstance(value, str):
        return {"raw_value": value, "type": "text"}
    if isinstance(value, (Mapping, list, tuple)):
        return {"raw_value": value, "type": "json"}
    return {"raw_value": str(value), "type": "text"}


class PipesSession:
    """``log`` (always printed; also to Dagster's event log under Pipes) and ``report`` (final metadata)."""

    def __init__(self, context: Any = None):
        self._context = context

    @property
    def active(self) -> bool:
        """True when messages reach Dagster (launched by Pipes, main process)."""
        return self._context is not None

    def log(self, message: str) -> None:
        print(message, flush=True)
        if self._context is not None:
            self._context.log.info(message)

    def report(self, metadata: Mapping[str, Any]) -> None:
        """The asset's materialization metadata (once per run); ``Path`` values to PNGs are shown as images."""
        if self._context is not None:
            self._context.report_asset_materialization(
                metadata={k: pipes_metadata_value(v) for k, v in metadata.items()})


@contextmanager
def pipes_session() -> Iterator[PipesSession]:
    """Open Dagster Pipes when this process was launched by it and is the main process; else a print-only session.

    An exception inside the block is reported to Dagster (the asset fails with its traceback) and re-raised.
    """
    if launched_by_pipes() and is_main_process():
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as context:
            yield PipesSession(context)
    else:
        yield PipesSession(None)
