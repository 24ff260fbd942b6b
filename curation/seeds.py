"""Seed examples: JSONL rows with `text` and an optional `domain`; several domains per file."""

from __future__ import annotations

import json
from dataclasses import dataclass

from core import storage
from core.errors import ConfigError
from core.storage import StorageOptions

DEFAULT_DOMAIN = "default"


@dataclass(frozen=True)
class Seeds:
    texts: list[str]
    domains: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def load_seeds(uri: str, options: StorageOptions | None = None) -> Seeds:
    """Read a seeds file, failing with the line number on anything unusable: seeds are few and precious."""
    if not storage.exists(uri, options):
        raise ConfigError("seeds", uri, 'no such file; pass a JSONL file of {"text": ..., "domain": ...} rows')
    texts: list[str] = []
    domains: list[str] = []
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
    if not texts:
        raise ConfigError("seeds", uri, "holds no seeds; give about 10 examples per domain")
    return Seeds(texts, domains)
