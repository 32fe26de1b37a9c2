"""How a trainer process ends on a failure the user can act on: one line, not a traceback.

The trainers run as child processes (``accelerate launch`` from ``attrface train-*``, Dagster Pipes from the
assets). A failure that names its own cause -- a damaged checkpoint, other data than the checkpoint's, a cache to
rebuild, missing shards or weights, a full disk -- ends the child with ``error: <message>`` on stderr and exit
status 2, and the message is written to the file named by ``$ATTRFACE_ERROR_FILE`` so the parent can repeat it
(the CLI's last line, the Dagster step's failure). Anything else is a bug and keeps its traceback.
``ATTRFACE_DEBUG=1`` keeps the traceback of every failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

ERROR_FILE_ENV = "ATTRFACE_ERROR_FILE"
DEBUG_ENV = "ATTRFACE_DEBUG"
EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story (each names the path or setting and what to do)."""
    from attrface_pipeline.artifacts import ArtifactError
    from attrface_pipeline.config import ConfigError
    from attrface_pipeline.models.store import ModelNotAvailableError
    from attrface_pipeline.models.weights import WeightsError
    from attrface_pipeline.storage import StorageError
    from training.data import ImagesNotFoundError, ShardsNotFoundError
    from training.degradation import PresetError
    from training.engine import CheckpointError, OutputDirInUseError, ResumeMismatchError, TooManyBadSamplesError
    from training.latent_cache import LatentCacheMissError
    from training.plan import PlanDoesNotFit
    from training.quantize import QuantizationUnavailable
    from training.text_cache import TextCacheMissError

    return (ArtifactError, ConfigError, ModelNotAvailableError, WeightsError, StorageError, ImagesNotFoundError,
            ShardsNotFoundError, PresetError, CheckpointError, OutputDirInUseError, ResumeMismatchError,
            TooManyBadSamplesError, LatentCacheMissError, PlanDoesNotFit, QuantizationUnavailable,
            TextCacheMissError)


def one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def report_error(message: str) -> None:
    """Print ``error: message`` and leave it where the parent looks (first writer wins: one line per run)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError:  # another process of the run reported first, or the folder is gone: stderr has it
            pass


def run_main(main: Callable[[], None]) -> None:
    """Run a trainer's ``main``; a user error ends the process with one line and exit status 2."""
    try:
        main()
    except user_errors() as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        report_error(one_line(err))
        sys.exit(EXIT_USER_ERROR)


def read_error(path: str | Path) -> str | None:
    """The child's reported line, if it reported one."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None
