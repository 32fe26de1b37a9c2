"""RoboFace (REFERENCE.md): Mapper -> Remover implicit tokens, decoupled cross-attention, ControlNet on the LQ
image, captions as explicit guidance; two training stages and a two-stage restorer. Framework-free (no Dagster)."""
