"""The dataset card: README.md with Hugging Face dataset-card front matter, written beside the shards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import yaml

LICENCES = """\
- **Source photos**: each source keeps its own licence (the sample build: see `data/samples/faces/SOURCES.md`,
  research and testing only; FFHQ: CC BY-NC-SA 4.0 with per-image licences; CelebA-HQ: non-commercial research).
- **Models used to build it**: SD3.5 (Stability AI Community License), FLUX.1-dev (non-commercial) where used
  downstream, Qwen3 (Apache-2.0), FaRL/facer weights (their terms), insightface packs (non-commercial research).
  Edited images are derived from these models' outputs; check each licence for your use.
- **This card and the build code**: Apache-2.0."""


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def render_card(*, name: str, splits: dict[str, dict], samples_meta: Sequence[dict], qc_rates: dict[str, float],
                qc_pairs: int, config_dump: dict, profile: str, chart_file: str | None,
                gate: Sequence[str] = ("attribute", "identity", "similarity"), review: str = "optional",
                identity: dict | None = None) -> str:
    total = sum(s["samples"] for s in splits.values())
    front = {
        "pretty_name": name, "license": "other", "task_categories": ["image-to-image"],
        "tags": ["faces", "face-restoration", "image-editing", "webdataset"],
        "size_categories": [_size_category(total)],
        "configs": [{"config_name": "default", "data_files": [
            {"split": split, "path": f"{split}/*.tar"} for split, s in splits.items() if s["samples"]]}],
    }
    flips = Counter(f"{m['edit']['attribute']} ({m['edit']['direction']})" for m in samples_meta)
    sims = [m["qc"]["identity_similarity"] for m in samples_meta]
    mean_sim = sum(sims) / len(sims) if sims else float("nan")
    backend = samples_meta[0]["qc"]["identity_backend"] if samples_meta else "n/a"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
        "Pairs of aligned face images: a source photo and a FlowEdit edit of it that flips one facial attribute, with"
        " a caption for each, for attribute-aware blind face restoration (A²BFR-style training).", "",
    ]
    if profile != "full":
        lines += ["> **Built with the offline profile**: tiny *random* models made the attributes, captions and edits."
                  " The files are in the real format; their content is meaningless. Do not train on it.", ""]
    lines += ["## Contents", "", "| split | samples | shards | bytes |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['samples']} | {len(v['shards'])} | {v['bytes']:,} |" for k, v in splits.items()]
    lines += ["", "Each sample has the same members: `src.jpg`, `tar.jpg` (or `.png`), `json` (attributes, flip,"
              " prompts, every QC score, provenance: model ids, seeds, FlowEdit parameters and β), `src.txt`,"
              " `tar.txt`. Keys have no dots."]
    if identity:
        lines += ["", f"The split is identity-disjoint: faces are grouped by person ({identity['metric']} threshold"
                  f" {identity['threshold']} of the QC identity backend) and by source photo, and each group lands in"
                  f" one split (hash-based and stable). {identity['faces']} faces form {identity['identity_clusters']}"
                  f" identity clusters and {identity['split_groups']} split groups; {identity['identity_matches']}"
                  f" identity matches, of which {identity['cross_split_identity_matches']} cross the split."]
    else:
        lines += ["", "The split is by source photo (hash-based and stable), so no photo is in both; one person in"
                  " two photos may be."]
    lines += ["", "## Flipped attributes", ""]
    if chart_file:
        lines += [f"![attribute distribution]({chart_file})", ""]
    lines += ["| flip | samples |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(flips.items())]
    lines += ["", "## Quality control", "",
              f"{qc_pairs} edited pairs were scored on every check; published pairs passed the gating checks"
              f" ({', '.join(gate)}) and the review rule (`review: {review}`). `overall` is the share passing the"
              " gating checks.", "",
              "| check | pass rate |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in qc_rates.items()]
    lines += ["", f"Average identity similarity of the published pairs ({backend}): {mean_sim:.4f}"
              " (the A²BFR paper reports 0.6387 with ArcFace after QC).", "", "## Licences", "", LICENCES, "",
              "## How it was built", "", "The AttrFace Dagster pipeline (`build_dataset`) with this configuration:",
              "", "```yaml", yaml.safe_dump(config_dump, sort_keys=True).strip(), "```", ""]
    return "\n".join(lines)
