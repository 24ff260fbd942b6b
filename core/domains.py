"""One domain's rows of a dataset that may hold several (a curate output curates every domain of its seeds
file at once): the check every stage that takes `--domain` makes before it reads anything more."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.errors import ConfigError
from core.storage import FileInfo, StorageOptions

DOMAIN_COLUMN = "domain"


def domains_in(files: Sequence[FileInfo], options: StorageOptions | None = None) -> list[str] | None:
    """The distinct values of the `domain` column across `files` (Parquet), sorted; None when they have none."""
    found: set[str] = set()
    for info in files:
        with storage.open_read(info.uri, options) as handle:
            parquet = pq.ParquetFile(handle)
            if DOMAIN_COLUMN not in parquet.schema_arrow.names:
                return None
            found.update(str(value) for value in parquet.read(columns=[DOMAIN_COLUMN]).column(0).to_pylist())
    return sorted(found)


def check_domain(domain: str | None, found: list[str] | None, data: str, mixed: bool = False) -> None:
    """Refuse a `--domain` the data does not hold, and, unless `mixed` (a stage whose work is per row, like
    the teacher's rewrites), a dataset of several domains without one: importance measured on every domain
    mixed would serve none of them."""
    if domain is None:
        if not mixed and found is not None and len(found) > 1:
            raise ConfigError("domain", None, f"{data} holds rows of {len(found)} domains ({', '.join(found)}): pass "
                              "--domain NAME for the one to work on")  # fmt: skip
        return
    if found is None:
        raise ConfigError("domain", domain, f"{data} has no `{DOMAIN_COLUMN}` column to choose rows by; leave --domain "
                          "unset")  # fmt: skip
    if domain not in found:
        raise ConfigError("domain", domain, f"{data} holds no row of it; its domains are {', '.join(found) or 'none'}")


def only_domain(table: pa.Table, domain: str | None) -> pa.Table:
    """The rows of `domain` (all rows when it is None)."""
    if domain is None:
        return table
    return table.filter(pc.equal(table.column(DOMAIN_COLUMN), domain))
