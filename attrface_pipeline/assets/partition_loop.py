"""The one partition loop of the per-chunk assets: reuse what is complete, (re)compute the rest, crash-safely.

Per partition: compose the fingerprint (config, model and upstream partition), reuse the partition if it is
complete under that fingerprint, else drop its completion marker, keep per-item work only if it was made under the
same fingerprint (resumable assets), build the step's model if this is the first partition that needs it, run the
asset's ``compute(partition, store) -> (rows, stats)``, write the manifest, then the marker. An asset body keeps
only its compute and its metadata. Nothing here needs Dagster: the asset passes its logger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pyarrow as pa

from attrface_pipeline.remote import RemoteRoot
from attrface_pipeline.storage import PartitionStore

T = TypeVar("T")
Compute = Callable[[str, PartitionStore], tuple[list[dict], dict[str, Any]]]


class CachedBuilder(Generic[T]):
    """A component built on first use and shared by every partition of the step (a model loads once per step,
    and only if some partition needs work)."""

    def __init__(self, build: Callable[[], T], describe: Callable[[T], str] | None = None):
        self._build = build
        self._describe = describe
        self._value: T | None = None
        self.built = False

    def __call__(self) -> T:
        if not self.built:
            self._value, self.built = self._build(), True
        return self._value

    def describe(self) -> str:
        return self._describe(self()) if self._describe else ""

    def close(self) -> None:
        """Close the component if it was built and has a ``close`` (an HTTP client, a server connection)."""
        if self.built and hasattr(self._value, "close"):
            self._value.close()


@dataclass
class PartitionResult:
    """One partition after the loop: complete on disk, either reused or computed in this step."""

    partition: str
    store: PartitionStore
    stats: dict[str, Any]  # as stored in _stats.json (with the fingerprint)
    computed: bool
    seconds: float  # compute time in this step (0.0 when reused)
    rows_computed: int  # manifest rows computed in this step (0 when reused)

    def rows(self) -> list[dict]:
        return self.store.read_manifest().to_pylist()


def run_partitions(
    asset: str,
    partitions: Sequence[str],
    *,
    data_root: Path,
    fingerprint: str | Callable[[str], str],
    schema: pa.Schema,
    compute: Compute,
    upstream: str | None = None,
    resume: Sequence[str] | None = None,
    model: CachedBuilder | None = None,
    remote: RemoteRoot | None = None,
    log: Callable[[str], None] = print,
) -> list[PartitionResult]:
    """Make every partition of ``asset`` complete, in order; returns one :class:`PartitionResult` per partition.

    ``fingerprint``: the config part (a string), or a function of the partition when it depends on more. With
    ``upstream``, the first 8 characters of that asset's partition fingerprint are appended, so an upstream
    re-run re-runs this partition. ``resume``: the per-item work directories (besides ``records/``) a crashed
    partition keeps when its fingerprint is unchanged; ``None`` for assets that recompute a partition whole.
    ``model`` is built before the first compute (outside its timing). ``compute`` returns the manifest rows and
    the partition's stats; ``partition`` and ``seconds`` are added to the stats here.

    ``remote``: the data root is a URL and ``data_root`` its working copy. Each partition first pulls the chunk's
    committed remote work (its own and its upstreams'), and is committed to the URL once complete (``_stats.json``
    last), so any machine can run any step of any chunk.
    """
    results = []
    for partition in partitions:
        store = PartitionStore(data_root, asset, partition)
        if remote is not None:
            remote.pull_partition(partition)
        fp = fingerprint(partition) if callable(fingerprint) else fingerprint
        if upstream is not None:
            fp += PartitionStore(data_root, upstream, partition).fingerprint()[:8]
        computed, seconds, count = not store.is_complete(fp), 0.0, 0
        if computed:
            store.invalidate()
            if resume is not None:
                store.guard_resume(fp, *resume)  # per-item work made under other settings must not be resumed
            if model is not None and not model.built:
                model()
                if description := model.describe():
                    log(f"{asset}: {description}")
            t0 = time.perf_counter()
            rows, stats = compute(partition, store)
            store.write_manifest(rows, schema)
            seconds, count = time.perf_counter() - t0, len(rows)
            store.complete({**stats, "partition": partition, "seconds": round(seconds, 3)}, fp)
            log(f"{asset} {partition}: {count} rows in {seconds:.1f} s")
        else:
            log(f"{asset} {partition}: complete, reusing {store.dir}")
        if remote is not None and not remote.is_committed(f"{asset}/{partition}"):
            files = remote.push(f"{asset}/{partition}")
            log(f"{asset} {partition}: committed {files} files to {remote.url}")
        results.append(PartitionResult(partition, store, store.read_stats(), computed, seconds, count))
    return results
