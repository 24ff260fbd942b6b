"""The report's "Why these documents" section: each domain's driving latents, in context and against the corpus.

The encode actor recorded, for every document and each domain's driving latents, the latent's largest
activation and its token position (`driver_peaks`, `driver_positions`; curation/explain.py). Here those
small columns are read file by file from `scored/`: how often each latent fires (in the corpus, and in
the documents selected for its domain) and, per latent, the few documents where it peaks highest. Only
those few documents' texts are read, one row group each, and re-tokenized as the actor tokenized them to
show the peak token in context.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from core import storage
from core.batching import cached_tokenizer, tokenize_texts
from core.figures import png_bytes
from core.storage import StorageOptions
from curation.explain import DomainDrivers, matrix

EXAMPLES_PER_LATENT = 3
"""Top-activating documents shown per driving latent."""
CONTEXT_TOKENS = 6
"""Tokens shown on each side of a peak token."""


@dataclass(frozen=True)
class TokenSource:
    """How the encode actor tokenized documents, so a token position can be found again in a text."""

    model: str
    max_tokens: int


@dataclass(frozen=True)
class Peak:
    value: float
    doc_id: str
    file: str
    row: int
    position: int


@dataclass
class DriverStats:
    """What the scan of `scored/` found for each (domain, driving latent) slot."""

    documents: int
    fired: np.ndarray
    """(domains, latents) documents in which the latent fires (its peak is above 0)."""
    selected_fired: np.ndarray
    """(domains, latents) documents selected for that domain in which it fires."""
    selected_docs: np.ndarray
    """(domains,) documents selected for each domain that the scan found."""
    peaks: dict[tuple[int, int], list[Peak]] = field(default_factory=dict)
    """(domain, slot) -> the highest peaks, best first, one per document."""

    def frequency(self) -> np.ndarray:
        return self.fired / max(self.documents, 1)

    def selected_frequency(self) -> np.ndarray:
        return self.selected_fired / np.maximum(self.selected_docs, 1)[:, None]


def _merge_peaks(kept: list[Peak], new: list[Peak], keep: int) -> list[Peak]:
    """The `keep` best of both, one per document id, ties broken by id."""
    best: dict[str, Peak] = {}
    for peak in sorted([*kept, *new], key=lambda p: (-p.value, p.doc_id)):
        best.setdefault(peak.doc_id, peak)
    return list(best.values())[:keep]


def _scan_file(stats: DriverStats, file: str, table: pa.Table, pending: list[set[str]], keep: int) -> None:
    """Fold one scored file's `id`, `driver_peaks`, `driver_positions` into `stats`."""
    domains = len(pending)
    peaks, positions = matrix(table, "driver_peaks", domains), matrix(table, "driver_positions", domains)
    ids = table.column("id").to_pylist()
    stats.documents += table.num_rows
    stats.fired += (peaks > 0).sum(axis=0)
    for domain in range(domains):
        rows = {doc_id: row for row, doc_id in reversed(list(enumerate(ids))) if doc_id in pending[domain]}
        pending[domain] -= rows.keys()
        chosen = np.asarray(sorted(rows.values()), dtype=np.int64)
        stats.selected_fired[domain] += (peaks[chosen, domain] > 0).sum(axis=0)
        stats.selected_docs[domain] += len(chosen)
        for slot in range(peaks.shape[2]):
            column = peaks[:, domain, slot]
            top = [row for row in np.argsort(-column, kind="stable")[: 4 * keep] if column[row] > 0]
            new = [Peak(float(column[r]), ids[r], file, int(r), int(positions[r, domain, slot])) for r in top]
            stats.peaks[(domain, slot)] = _merge_peaks(stats.peaks.get((domain, slot), []), new, keep)


def scan_scored(
    out: str,
    options: StorageOptions | None,
    drivers: DomainDrivers,
    selected_ids: dict[str, set[str]],
    keep: int = EXAMPLES_PER_LATENT,
) -> DriverStats | None:
    """Stream `scored/` (three small columns, one file at a time); None when it has no explanation columns."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(storage.join(out, "scored"), options)
    shape = drivers.latents.shape
    stats = DriverStats(0, np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape[0], np.int64))
    pending = [set(selected_ids.get(domain, ())) for domain in drivers.domains]
    for file in sorted(fs.find(path)):
        if not file.endswith(".parquet"):
            continue
        with fs.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if "driver_peaks" not in parquet.schema_arrow.names:
                return None
            table = parquet.read(columns=["id", "driver_peaks", "driver_positions"])
        if table.num_rows:
            _scan_file(stats, file, table, pending, keep)
    return stats


def _read_texts(fs, file: str, rows: list[int]) -> dict[int, str]:
    """The `text` of a few rows of one Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    texts: dict[int, str] = {}
    with fs.open(file, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        start = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            wanted = [row for row in rows if start <= row < start + size]
            if wanted:
                column = parquet.read_row_group(group, columns=["text"]).column("text")
                texts.update({row: column[row - start].as_py() for row in wanted})
            start += size
    return texts


def _flat(text: str) -> str:
    """Whitespace runs to one space, keeping whether the piece starts or ends with one; markdown-safe."""
    core = " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("`", "\\`")
    if not core:
        return " " if text else ""
    return (" " if text[:1].isspace() else "") + core + (" " if text[-1:].isspace() else "")


def token_in_context(tokenizer, ids: list[int], position: int, width: int = CONTEXT_TOKENS) -> str:
    """The token at `position` in bold, with `width` tokens of text on each side (markdown)."""
    if not 0 <= position < len(ids):
        return "(token position beyond the text)"
    start, stop = max(0, position - width), min(len(ids), position + width + 1)
    # Decode growing prefixes, so the pieces keep the spaces a tokenizer puts between tokens.
    before = tokenizer.decode(ids[start:position])
    through = tokenizer.decode(ids[start : position + 1])
    whole = tokenizer.decode(ids[start:stop])
    token = through[len(before) :] if through.startswith(before) else tokenizer.decode(ids[position : position + 1])
    after = whole[len(through) :] if whole.startswith(through) else tokenizer.decode(ids[position + 1 : stop])
    lead = " " if token[:1].isspace() and before else ""
    body = f"{_flat(before).rstrip()}{lead}**{_flat(token).strip()}**{_flat(after)}"
    return f"{'…' if start else ''}{body}{'…' if stop < len(ids) else ''}"


def peak_contexts(
    out: str, options: StorageOptions | None, stats: DriverStats, tokens: TokenSource
) -> dict[tuple[int, int], list[str]]:
    """(domain, slot) -> "activation: token in context" for each of its top peaks."""
    fs, _ = storage.filesystem(storage.join(out, "scored"), options)
    by_file: dict[str, set[int]] = defaultdict(set)
    for kept in stats.peaks.values():
        for peak in kept:
            by_file[peak.file].add(peak.row)
    texts = {file: _read_texts(fs, file, sorted(rows)) for file, rows in by_file.items()}
    tokenizer = cached_tokenizer(tokens.model, options)
    contexts: dict[tuple[int, int], list[str]] = {}
    for slot, kept in stats.peaks.items():
        contexts[slot] = []
        for peak in kept:
            ids = tokenize_texts(tokenizer, [texts[peak.file][peak.row]], tokens.max_tokens)[0]
            contexts[slot].append(f"{peak.value:.2f}: {token_in_context(tokenizer, ids, peak.position)}")
    return contexts


def why_section(
    drivers: DomainDrivers, stats: DriverStats, contexts: dict[tuple[int, int], list[str]], figure: str | None
) -> list[str]:
    """Markdown: per domain, its driving latents with seed weight, firing frequencies and contexts."""
    lines = [
        "## Why these documents",
        "",
        "A document's score is a sum over SAE latents of (its vector x the nearest seed's vector); each"
        " curated row lists its largest terms in `top_latents` and `latent_contributions`. Below, per"
        " domain, the latents that weigh most in its seeds' mean vector, the share of the documents selected"
        f" for it and of all {stats.documents:,} scored documents in which each fires, and the tokens where"
        " it fires most strongly.",
        "",
    ]
    if figure:
        lines += [f"![driving latents: selected documents against the corpus]({figure})", ""]
    frequency, selected = stats.frequency(), stats.selected_frequency()
    for d, domain in enumerate(drivers.domains):
        lines += [
            f"### {domain}",
            "",
            "| latent | seed weight | fires in selected | fires in corpus | top activations in context |",
            "|---:|---:|---:|---:|---|",
        ]
        for slot, (latent, weight) in enumerate(zip(drivers.latents[d], drivers.weights[d], strict=True)):
            if weight <= 0:
                continue
            shown = "<br>".join(contexts.get((d, slot), [])) or "(never fires)"
            lines.append(f"| {latent} | {weight:.3f} | {selected[d, slot]:.1%} | {frequency[d, slot]:.1%} | {shown} |")
        lines.append("")
    return lines


def profile_png(drivers: DomainDrivers, stats: DriverStats) -> bytes:
    """One panel per domain: how often each driving latent fires in its selected documents and in the corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(drivers.domains)
    fig, axes = plt.subplots(count, 1, figsize=(7, 2.4 * max(count, 1)), squeeze=False)
    frequency, selected = stats.frequency(), stats.selected_frequency()
    for d, (axis, domain) in enumerate(zip(axes[:, 0], drivers.domains, strict=True)):
        slots = np.flatnonzero(drivers.weights[d] > 0)  # a latent absent from every seed drives nothing
        x = np.arange(len(slots))
        axis.bar(x - 0.2, selected[d, slots], width=0.4, color="#d9480f", label=f"selected for {domain}")
        axis.bar(x + 0.2, frequency[d, slots], width=0.4, color="#9aa5b1", label="all documents")
        axis.set_xticks(x, [str(latent) for latent in drivers.latents[d, slots]], fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_title(f"{domain}: share of documents in which each driving latent fires", fontsize=10)
        axis.set_xlabel("SAE latent (heaviest in the seeds first)", fontsize=8)
        axis.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
