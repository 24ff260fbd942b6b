"""Seed examples: JSONL rows with `text`, an optional `domain` and an optional `id`; several domains per file.

A seed's id is its `id` field when the row has one, else the content id of its text (the id a corpus
document with that text would have), so a curated row names its nearest seed in a way that survives
reordering or editing the seeds file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from core import storage
from core.errors import ConfigError
from core.reader import doc_id
from core.storage import StorageOptions

DEFAULT_DOMAIN = "default"


@dataclass(frozen=True)
class Seeds:
    texts: list[str]
    domains: list[str]
    ids: list[str] = field(default_factory=list)
    """Each seed's id (`id` of its row, else the content id of its text); filled from the texts if empty."""

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", [doc_id(text) for text in self.texts])

    def __len__(self) -> int:
        return len(self.texts)


def load_seeds(uri: str, options: StorageOptions | None = None) -> Seeds:
    """Read a seeds file, failing with the line number on anything unusable: seeds are few and precious."""
    if not storage.exists(uri, options):
        raise ConfigError("seeds", uri, 'no such file; pass a JSONL file of {"text": ..., "domain": ...} rows')
    texts: list[str] = []
    domains: list[str] = []
    ids: list[str] = []
    with storage.open_read(uri, options) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError("seeds", f"{uri}:{line_no}", f"not a JSON line ({error})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ConfigError("seeds", f"{uri}:{line_no}", "each row needs a non-empty string `text`")
            texts.append(text.strip())
            domains.append(str(row.get("domain") or DEFAULT_DOMAIN))
            ids.append(_seed_id(row, text.strip(), f"{uri}:{line_no}", ids))
    if not texts:
        raise ConfigError("seeds", uri, "holds no seeds; give about 10 examples per domain")
    return Seeds(texts, domains, ids)


def _seed_id(row: dict, text: str, where: str, taken: list[str]) -> str:
    """A row's `id` (a string or an integer), else its text's content id; refused when an earlier seed has it."""
    given = row.get("id")
    if given is not None and (isinstance(given, bool) or not isinstance(given, str | int) or not str(given).strip()):
        raise ConfigError("seeds", where, f"`id` must be a non-empty string or an integer, got {given!r}")
    seed_id = str(given).strip() if given is not None else doc_id(text)
    if seed_id in taken:
        raise ConfigError("seeds", where, f"repeats the id {seed_id!r} of an earlier seed (the same text, or the same "
                          "`id`): give each seed its own")  # fmt: skip
    return seed_id
