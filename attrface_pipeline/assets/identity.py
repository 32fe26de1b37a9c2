"""Dagster asset: one identity embedding per aligned face (the QC identity backend), for the identity-disjoint split."""

import dagster as dg

from attrface_pipeline.assets.ingest import faces
from attrface_pipeline.remote import remote_root
from attrface_pipeline.assets.partition_loop import CachedBuilder, run_partitions
from attrface_pipeline.assets.partitions import PER_CHUNK, SOURCE_PARTITIONS
from attrface_pipeline.assets.resources import AttrFaceConfig
from attrface_pipeline.builders import build_identity_scorer
from attrface_pipeline.config import PipelineConfig
from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.store import model_fingerprint
from attrface_pipeline.stages.identity import EMBEDDING_SCHEMA
from attrface_pipeline.storage import PartitionStore

BATCH = 32


def identity_fingerprint(cfg: PipelineConfig) -> str:
    """What the embeddings depend on: the backend and, for ArcFace, its pack."""
    backend = cfg.qc.identity_backend
    return backend + (model_fingerprint(cfg.models.insightface_pack) if backend == "arcface" else "")


@dg.asset(
    partitions_def=SOURCE_PARTITIONS,
    backfill_policy=PER_CHUNK,
    deps=[faces],
    description="An identity embedding per aligned face (qc.identity_backend: dlib 128-d offline, ArcFace 512-d on "
    "a full install): publishing groups faces of one person so the split is identity-disjoint.",
    group_name="dataset",
    kinds={"python", "parquet"},
)
def face_identities(context: dg.AssetExecutionContext, attrface: AttrFaceConfig) -> dg.MaterializeResult:
    cfg = attrface.pipeline_config()
    root = cfg.paths.data_root
    scorer = CachedBuilder(lambda: build_identity_scorer(cfg), lambda s: f"identity backend {s.name}")

    def compute(partition: str, store: PartitionStore) -> tuple[list[dict], dict]:
        face_store = PartitionStore(root, "faces", partition)
        ok = [r for r in face_store.read_manifest().to_pylist() if r["status"] == "ok"]
        rows = []
        for start in range(0, len(ok), BATCH):
            batch = ok[start:start + BATCH]
            vectors = scorer().embed([read_rgb(face_store.path(r["aligned_path"])) for r in batch])
            rows += [{"face_key": r["face_key"], "image_key": r["image_key"], "backend": scorer().name,
                      "embedding": [float(v) for v in vec]} for r, vec in zip(batch, vectors)]
        return rows, {"faces": len(rows)}

    results = run_partitions("face_identities", context.partition_keys, data_root=root, remote=remote_root(cfg.paths),
                             fingerprint=identity_fingerprint(cfg), upstream="faces", schema=EMBEDDING_SCHEMA,
                             compute=compute, model=scorer, log=context.log.info)
    computed = sum(r.rows_computed for r in results)
    seconds = sum(r.seconds for r in results)
    return dg.MaterializeResult(metadata={
        "faces": sum(r.stats["faces"] for r in results),
        "faces_computed": computed,
        "backend": cfg.qc.identity_backend,
        "seconds": round(seconds, 3),
        "seconds_per_face": round(seconds / computed, 4) if computed else 0.0,
    })
