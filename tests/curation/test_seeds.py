"""Seeds files: each seed's domain and id, and what is refused."""

from __future__ import annotations

import json

import pytest

from core.errors import ConfigError
from core.reader import doc_id
from curation.seeds import load_seeds


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_seed_is_named_by_its_id_or_else_by_its_texts_content_id(tmp_path):
    seeds = load_seeds(_write(tmp_path / "s.jsonl", [
        {"text": "prime numbers", "domain": "maths", "id": "maths-01"},
        {"text": " the heart pumps blood ", "domain": "body"},
        {"text": "cells divide", "id": 7},
    ]))  # fmt: skip
    assert seeds.ids == ["maths-01", doc_id("the heart pumps blood"), "7"]
    assert seeds.domains == ["maths", "body", "default"]


@pytest.mark.parametrize("rows, why", [
    ([{"text": "a"}, {"text": "a"}], "repeats the id"),
    ([{"text": "a", "id": "x"}, {"text": "b", "id": "x"}], "repeats the id 'x'"),
    ([{"text": "a", "id": ["x"]}], "`id` must be"),
    ([{"text": "a", "id": " "}], "`id` must be"),
    ([{"text": "a", "id": True}], "`id` must be"),
])  # fmt: skip
def test_ids_that_name_no_single_seed_are_refused_with_the_line(tmp_path, rows, why):
    with pytest.raises(ConfigError) as error:
        load_seeds(_write(tmp_path / "s.jsonl", rows))
    assert error.value.field == "seeds" and why in str(error.value) and f":{len(rows)}" in str(error.value)
