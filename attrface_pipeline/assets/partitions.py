"""The partitions every dataset asset shares: one per chunk of the source listing.

Computed once when the code location loads, from the config in ``$ATTRFACE_CONFIG``/``$ATTRFACE_PROFILE``
(a directory scan only: nothing is read or written beyond the listing).
"""

import warnings

import dagster as dg

from attrface_pipeline.assets.common import build_partitions

# backfill_policy is marked beta in Dagster 1.13; it is the documented way to run one chunk per backfill run.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

SOURCE_PARTITIONS = build_partitions()
# A UI backfill runs one chunk per run, so chunks proceed in parallel under the run queue.
PER_CHUNK = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
