"""The partitions every dataset asset shares: one per chunk of the source listing.

Computed once when the code location loads, from the config in ``$ATTRFACE_CONFIG``/``$ATTRFACE_PROFILE``
(listing files only: no I/O beyond a directory scan).
"""

from attrface_pipeline.assets.common import build_partitions

SOURCE_PARTITIONS = build_partitions()
# A UI backfill runs one chunk per run, so chunks proceed in parallel under the run queue.
import dagster as dg

PER_CHUNK = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
