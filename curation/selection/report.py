"""report.md for a curated set: counts, rejects by reason, score histograms, top examples per domain, and
why: the SAE latents that drive each domain's selection (curation/selection/explain_report.py)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from core import storage
from core.figures import png_bytes
from core.storage import StorageOptions
from curation.explain import DomainDrivers
from curation.seeds import Seeds
from curation.selection.explain_report import TokenSource, peak_contexts, profile_png, scan_scored, why_section

logger = logging.getLogger(__name__)

SCORE_SAMPLE_ROWS = 200_000
"""Rows of scored/ read for the all-documents histogram; enough for its shape at any corpus size."""


def _scored_sample(out: str, options: StorageOptions | None, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per domain, the domain scores (best query) of a sample of all scored documents; `labels`, the domain of
    each `seed_sims` column."""
    fs, path = storage.filesystem(storage.join(out, "scored"), options)
    import pyarrow.parquet as pq

    sims: list[np.ndarray] = []
    rows = 0
    for file in sorted(fs.find(path)):
        if not file.endswith(".parquet") or rows >= SCORE_SAMPLE_ROWS:
            continue
        with fs.open(file, "rb") as handle:
            table = pq.read_table(handle, columns=["seed_sims"])
        if table.num_rows:
            sims.append(np.stack(table.column("seed_sims").to_numpy(zero_copy_only=False)))
            rows += table.num_rows
    if not sims:
        return {}
    matrix = np.concatenate(sims)
    return {domain: matrix[:, labels == domain].max(axis=1) for domain in sorted(set(labels))}


def _column_domains(seeds: Seeds, drivers: DomainDrivers | None) -> np.ndarray:
    """The domain of each `seed_sims` column: a seed's, or, under a learned scorer, its query's (the drivers
    are made from the queries)."""
    if drivers is None:
        return np.asarray(seeds.domains)
    labels = np.empty(sum(len(members) for members in drivers.members), dtype=object)
    for domain, members in zip(drivers.domains, drivers.members, strict=True):
        labels[members] = domain
    return labels


def _histogram_png(all_scores: dict[str, np.ndarray], curated: pa.Table) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(all_scores)
    fig, axes = plt.subplots(len(domains), 1, figsize=(7, 2.4 * max(len(domains), 1)), squeeze=False)
    domain_column = np.asarray(curated.column("domain").to_pylist())
    score_column = np.asarray(curated.column("score").to_pylist(), dtype=np.float32)
    for axis, domain in zip(axes[:, 0], domains, strict=True):
        scores = all_scores[domain]
        bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 60)
        axis.hist(scores, bins=bins, color="#9aa5b1", label="all documents")
        axis.hist(score_column[domain_column == domain], bins=bins, color="#d9480f", label="selected")
        axis.set_title(f"{domain}: cosine to nearest seed", fontsize=10)
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _driving(row: dict[str, Any], shown: int = 3) -> str:
    """A curated row's largest score terms, as `latent (contribution)`."""
    pairs = list(zip(row.get("top_latents") or [], row.get("latent_contributions") or [], strict=True))
    return ", ".join(f"{latent} ({term:.3f})" for latent, term in pairs[:shown]) or "-"


def _top_examples(curated: pa.Table, seeds: Seeds, per_domain: int = 5) -> list[str]:
    lines: list[str] = []
    columns = ["domain", "score", "text", "nearest_seed", "source"]
    columns += [name for name in ("top_latents", "latent_contributions") if name in curated.column_names]
    rows = curated.select(columns).to_pylist()
    text_of = dict(zip(seeds.ids, seeds.texts, strict=True))
    for domain in sorted({row["domain"] for row in rows}):
        best = sorted((row for row in rows if row["domain"] == domain), key=lambda row: -row["score"])
        lines += [f"### {domain}", "", "| score | text | nearest seed | driving latents |", "|---:|---|---|---|"]
        for row in best[:per_domain]:
            text = " ".join(row["text"].split())[:160].replace("|", "\\|")
            seed = " ".join(text_of.get(row["nearest_seed"], row["nearest_seed"]).split())[:60].replace("|", "\\|")
            lines.append(f"| {row['score']:.3f} | {text} | {seed} | {_driving(row)} |")
        lines.append("")
    return lines


def _why_lines(
    out: str, options: StorageOptions | None, curated: pa.Table, drivers: DomainDrivers, tokens: TokenSource | None
) -> list[str]:
    """The "Why these documents" section and its figure, `latents.png`; nothing when scored/ cannot say."""
    selected: dict[str, set[str]] = {}
    for doc_id, domain in zip(curated.column("id").to_pylist(), curated.column("domain").to_pylist(), strict=True):
        selected.setdefault(domain, set()).add(doc_id)
    stats = scan_scored(out, options, drivers, selected)
    if stats is None:
        return []
    contexts = peak_contexts(out, options, stats, tokens) if tokens is not None else {}
    storage.write_bytes_atomic(storage.join(out, "latents.png"), profile_png(drivers, stats), options)
    return why_section(drivers, stats, contexts, "latents.png")


def write_report(
    out: str,
    options: StorageOptions | None,
    seeds: Seeds,
    counts: dict[str, Any],
    timings: dict[str, float],
    drivers: DomainDrivers | None = None,
    tokens: TokenSource | None = None,
    precision: str | None = None,
    notes: list[str] | None = None,
) -> None:
    """Write `report.md`, `scores.png` and, given the domains' driving latents, `latents.png`.

    `tokens` says how documents were tokenized, to show each driving latent's peak tokens in context;
    `precision`, what the encode ran in (core.placement.describe_dtype): `auto` selects differently on
    machines that decide it differently; `notes`, more lines for the summary at the top.
    """
    curated_dir = storage.join(out, "curated")
    curated = (
        storage.read_parquet(curated_dir, options)
        if storage.exists(curated_dir, options)
        else pa.table({name: [] for name in ("id", "domain", "score", "text", "nearest_seed", "source")})
    )
    all_scores = _scored_sample(out, options, _column_domains(seeds, drivers))
    if all_scores:
        storage.write_bytes_atomic(storage.join(out, "scores.png"), _histogram_png(all_scores, curated), options)
    # A re-selection encodes no document: it has no encode rate to show.
    rate = f", {counts['tokens'] / timings['encode']:,.0f} tokens/s end to end" if timings.get("encode") else ""
    lines = [
        "# Curation report",
        "",
        f"- documents scored: {counts['documents']:,} ({counts['tokens']:,} tokens{rate})",
        f"- documents rejected: {counts['rejected']:,}",
        f"- curated rows: {counts['curated_rows']:,}",
        *([f"- encode precision: {precision}"] if precision else []),
        *[f"- {note}" for note in notes or []],
        "",
        "| domain | seeds | curated rows |",
        "|---|---:|---:|",
    ]
    for domain in sorted(set(seeds.domains)):
        lines.append(f"| {domain} | {seeds.domains.count(domain)} | {counts['by_domain'].get(domain, 0)} |")
    lines += ["", "## Rejects by reason", "", "| reason | rows |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(counts["rejects_by_reason"].items())] or ["| none | 0 |"]
    lines += ["", "## Scores", "", "![cosine to the nearest seed](scores.png)", ""]
    lines += ["## Top examples per domain", "", *_top_examples(curated, seeds)]
    if drivers is not None:
        lines += _why_lines(out, options, curated, drivers, tokens)
    lines += ["## Timings (s)", "", *[f"- {name}: {seconds:.1f}" for name, seconds in timings.items()], ""]
    storage.write_bytes_atomic(storage.join(out, "report.md"), "\n".join(lines).encode(), options)
