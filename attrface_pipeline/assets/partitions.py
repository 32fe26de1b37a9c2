"""The partitions every dataset asset shares: one per chunk of the sources (see stages/chunks.py).

Computed once when the code location loads, from the config in ``$ATTRFACE_CONFIG``/``$ATTRFACE_PROFILE``: the
chunk registry of the data root (members fixed when a chunk was first built) and new chunks for the source files no
registered chunk holds. A directory scan and the registry's small files; nothing is written. raw_images registers a
new chunk when it builds it, so reloading the code location after adding photos shows the old chunks unchanged and
the new photos as new chunks.
"""

import sys
import warnings

import dagster as dg

from attrface_pipeline.assets.common import build_partitions
from attrface_pipeline.config import ConfigError
from attrface_pipeline.stages.chunks import ChunkConflict

# backfill_policy is marked beta in Dagster 1.13; it is the documented way to run one chunk per backfill run.
warnings.filterwarnings("ignore", category=dg.BetaWarning)



def _load_partitions() -> dg.StaticPartitionsDefinition:
    try:
        return build_partitions()
    except (ConfigError, ChunkConflict) as err:
        # `dagster job execute` (and the other job/asset commands) load this module in the CLI process: show the
        # problems, one line each, instead of a traceback through Dagster's loader. A code server (UI) gets the
        # exception, whose message is the same lines.
        if len(sys.argv) > 1 and sys.argv[1] in ("job", "asset") and "dagster" in sys.argv[0]:
            raise SystemExit(f"error: {err}") from None
        raise


SOURCE_PARTITIONS = _load_partitions()
# A UI backfill runs one chunk per run, so chunks proceed in parallel under the run queue.
PER_CHUNK = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
