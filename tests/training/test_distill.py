"""Stage 2b: the teacher backends, the recipes and filters, and the distillation pipeline on local Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TINY_TEXTS

from core.errors import ConfigError
from core.stage import MARKER
from training.distillation import distill
from training.distillation.distill import (
    DistillConfig,
    PrepareSettings,
    judge,
    prepare_rows,
    run_distill,
    split_document,
)
from training.distillation.teacher import BatchedGenerator, TeacherConfig, finish_row, pad_left

# --- a scripted tiny teacher -------------------------------------------------------------------------------
# A tiny Llama whose next token depends only on the current one (attention and MLP outputs are zeroed, the
# embeddings are one-hot and the LM head maps each word to its successor). Its generation for a prompt is
# therefore known in advance: the chain that starts at the prompt's last word. The word-level tokenizer
# has no chat template, so the prompt ends with the reference's last word.

WORDS = "alpha beta gamma delta loop leaky reference answer omega sigma 7 42 the question is what".split()
CHAINS = {
    "alpha": "beta",  # -> "beta gamma" then EOS: a clean rewrite
    "beta": "gamma",
    "gamma": "</s>",
    "delta": "</s>",  # -> EOS at once: empty
    "loop": "loop",  # -> never stops: cut off at max_new_tokens
    "leaky": "reference",  # -> "reference answer": leaks the prompt
    "reference": "answer",
    "answer": "</s>",
    "omega": "7",  # -> "7": fails the answer check when the reference's final number is 42
    "sigma": "42",  # -> "42": passes it
}


def build_scripted_model(directory: Path, context: int = 128) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    hidden = 64
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(hidden)[: len(vocab)])
        head = torch.zeros(len(vocab), hidden)
        for token, index in vocab.items():
            head[vocab[CHAINS.get(token, "</s>")], index] = 100.0
        model.lm_head.weight.copy_(head)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory) -> str:
    return build_scripted_model(tmp_path_factory.mktemp("scripted"))


# Instruction rows, each with the outcome the scripted teacher must produce.
INSTRUCTION_ROWS = [
    {"id": "r01", "instruction": "what is the question", "response": "the answer is alpha", "domain": "general"},
    {"id": "r02", "instruction": "what is delta", "response": "delta", "domain": "general"},
    {"id": "r03", "instruction": "what is loop", "response": "loop", "domain": "general"},
    {"id": "r04", "instruction": "what is leaky", "response": "the leaky", "domain": "general"},
    {"id": "r05", "instruction": "what is 6 times 7", "response": "it is 42 omega", "domain": "mathematics"},
    {"id": "r06", "instruction": "what is 6 times 7 again", "response": "it is 42 sigma", "domain": "mathematics"},
    {"id": "r07", "instruction": "the question again", "response": "again alpha", "domain": "general"},
    {"id": "r08", "instruction": "", "response": "alpha", "domain": "general"},
    {"id": "r09", "instruction": "what " * 200, "response": "alpha", "domain": "general"},
]
EXPECTED = {
    "r01": ("", "beta gamma"),
    "r02": ("empty", None),
    "r03": ("cut_off", None),
    "r04": ("leak", None),
    "r05": ("answer_mismatch", None),
    "r06": ("", "42"),
    "r07": ("duplicate", None),  # same rewrite as r01, which has the smaller id
}
EXPECTED_REJECTS = {"r08": "empty_input", "r09": "too_long"}


def write_rows(directory: Path, rows: list[dict], files: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        pq.write_table(pa.Table.from_pylist(rows[index::files]), directory / f"rows-{index}.parquet")
    return directory


def mechanics_config(data: Path, out: Path, teacher: str, **overrides) -> DistillConfig:
    values = dict(
        data=str(data),
        out=str(out),
        teacher=teacher,
        max_new_tokens=4,
        batch_size=2,
        part_rows=2,
        cpus=0.5,
        threads=1,
    )
    values.update(overrides)
    return DistillConfig(**values)


def read_dir(directory: Path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(directory).to_pylist()}


# --- pure core ---------------------------------------------------------------------------------------------


def test_pad_left_aligns_last_tokens():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_finish_row_reasons(scripted_model):
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(scripted_model)
    alpha, beta, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("alpha", "beta", "</s>", "<pad>"))
    assert finish_row([alpha, beta, eos, pad], tokenizer, [eos], [], pad, 4).finish_reason == "stop"
    assert finish_row([alpha, beta, eos, pad], tokenizer, [eos], [], pad, 4).tokens == 3
    cut = finish_row([alpha, beta, alpha, beta], tokenizer, [eos], [], pad, 4)
    assert (cut.text, cut.finish_reason, cut.tokens) == ("alpha beta alpha beta", "length", 4)
    stopped = finish_row([alpha, beta, pad, pad], tokenizer, [eos], ["beta"], pad, 4)
    assert (stopped.text.strip(), stopped.finish_reason, stopped.tokens) == ("alpha", "stop", 2)


def test_judge_filters_in_order():
    leaks = distill.DEFAULT_LEAK_PHRASES
    assert judge("  ", "stop", None, leaks) == "empty"
    assert judge("a long answer", "length", None, leaks) == "cut_off"
    assert judge("Using the Reference Answer, x", "stop", None, leaks) == "leak"
    assert judge("As an AI, I think 4", "stop", None, leaks) == "leak"
    assert judge("so the total is 41", "stop", "42", leaks) == "answer_mismatch"
    assert judge("so the total is 42.0 apples", "stop", "42", leaks) == ""
    assert judge("about 1,200 people", "stop", distill.final_number("#### 1200"), leaks) == ""


def test_final_number_and_split():
    assert distill.final_number("3 apples and 4 pears make 7") == "7"
    assert distill.final_number("so 12 ... #### 1,250") == "1250"
    assert distill.final_number("no digits") is None
    prefix, rest = split_document("one two three four five six", 0.5)
    assert f"{prefix} {rest}" == "one two three four five six" and prefix and rest


def test_prepare_rows_rejects_bad_rows_with_reasons(scripted_model):
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(scripted_model)
    spec = PrepareSettings(scripted_model, "rewrite", "instruction", "response", "text", 0.5, 64, 4, 128, 4, "auto")
    rows = {row["id"]: row for row in prepare_rows(INSTRUCTION_ROWS, spec, tokenizer)}
    assert {key: row["reason"] for key, row in rows.items() if row["reason"]} == EXPECTED_REJECTS
    assert rows["r05"]["check_number"] == "42" and rows["r01"]["check_number"] is None
    assert rows["r01"]["prompt"] == "what is the question" and rows["r01"]["original"] == "the answer is alpha"
    assert rows["r01"]["prompt_ids"][-1] == tokenizer.convert_tokens_to_ids("alpha")
    docs = [{"id": "d1", "text": "alpha beta " * 20}, {"id": "d2", "text": "alpha beta"}, {"id": "d3", "text": None}]
    spec = PrepareSettings(
        scripted_model, "continuation", "instruction", "response", "text", 0.5, 16, 8, 128, 4, "auto"
    )
    reasons = {row["id"]: row["reason"] for row in prepare_rows(docs, spec, tokenizer)}
    assert reasons == {"d1": "", "d2": "too_short", "d3": "empty_input"}


@pytest.mark.timeout(60)
def test_batched_generation_matches_one_row_at_a_time(tiny_model_dir, one_torch_thread):
    """Left padding and the KV cache change nothing: each row's greedy output equals its lone generation."""
    generator = BatchedGenerator(TeacherConfig(model=tiny_model_dir, max_new_tokens=6, batch_size=8))
    tokenizer = generator.tokenizer
    texts = ["the cat sat on the mat", "prime numbers", "the heart pumps blood and cells divide in the body", "kings"]
    prompts = [tokenizer(text).input_ids for text in texts]
    batched = generator.generate(prompts)
    alone = [generator.generate([prompt])[0] for prompt in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert all(g.tokens == 6 and g.finish_reason == "length" for g in batched)
    # A stop string cuts the text where it starts and ends the row there.
    first_word = alone[0].text.split()[1]
    stopped = BatchedGenerator(TeacherConfig(model=tiny_model_dir, max_new_tokens=6, stop=[first_word]))
    result = stopped.generate([prompts[0]])[0]
    assert result.finish_reason == "stop" and first_word not in result.text


def build_chatty_model(directory: Path, tokenizer_dir: str) -> str:
    """A tiny Llama with large random weights and its own LM head: every generated token depends on the whole
    context, so a key at the wrong cache column, a wrong position or a leaky mask changes the output (the
    tied tiny model mostly repeats its last prompt word, whatever the cache holds)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.timeout(120)
def test_slot_decoding_equals_lone_generate(tiny_model_dir, tmp_path, one_torch_thread, monkeypatch):
    """The slot-cache decode loop gives, row for row, what `model.generate` gives for that prompt alone in the
    same dtype: prompts of 1 to 13 tokens in micro-batches of 4, rows ending at different steps on an EOS
    token and leaving the batch while the others go on."""
    from training.distillation.slot_cache import SlotCache

    model_dir = build_chatty_model(tmp_path / "chatty", tiny_model_dir)
    generator = BatchedGenerator(TeacherConfig(model=model_dir, max_new_tokens=10, batch_size=4, dtype="float32"))
    words = " ".join(TINY_TEXTS).split()
    prompts = [generator.tokenizer(" ".join(words[i : i + 1 + (7 * i) % 13])).input_ids for i in range(10)]

    def alone() -> list[list[int]]:
        rows = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                output = generator.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generator.generation_config
                )
            rows.append(output[0, len(prompt) :].tolist())
        return rows

    # A second EOS: a token row 0 generates fourth, so some rows end early and others run to max_new_tokens.
    extra_eos = alone()[0][3]
    generator.stop_ids.append(extra_eos)
    generator.generation_config.eos_token_id = list(generator.stop_ids)
    expected = [generator.finish(row) for row in alone()]
    assert len({g.tokens for g in expected}) > 1 and {g.finish_reason for g in expected} == {"stop", "length"}
    drops = []
    keep = SlotCache.keep
    monkeypatch.setattr(SlotCache, "keep", lambda cache, slots: (drops.append(len(slots)), keep(cache, slots)))
    assert generator.generate(prompts) == expected
    assert drops, "no row left its batch early"
    assert generator.generate_padded(prompts[:4]) == expected[:4]  # the fallback path agrees too


@pytest.mark.timeout(60)
def test_sampling_is_seeded(tiny_model_dir, tmp_path, one_torch_thread):
    """Above temperature 0 the loop samples (top_p applied), and the same seed samples the same rows again."""
    model_dir = build_chatty_model(tmp_path / "chatty", tiny_model_dir)
    config = TeacherConfig(model=model_dir, max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3, dtype="float32")
    generator = BatchedGenerator(config)
    prompts = [generator.tokenizer(text).input_ids for text in TINY_TEXTS]
    first = generator.generate(prompts)
    assert generator.generate(prompts) == first
    assert first != BatchedGenerator(dataclasses.replace(config, seed=4)).generate(prompts)
    assert all(0 < g.tokens <= 8 for g in first)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        DistillConfig(data="x", out="y", max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(data="x", out="y", temperature=-1)
    with pytest.raises(ConfigError, match="dtype='float16'.*auto, float32 or bfloat16"):
        DistillConfig(data="x", out="y", dtype="float16")
    with pytest.raises(ConfigError, match="data"):
        DistillConfig(out="y")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="data"):
        distill.plan(DistillConfig(data=str(empty), out=str(tmp_path / "o")))
    write_rows(tmp_path / "odd", [{"id": "1", "body": "x"}], files=1)
    with pytest.raises(ConfigError, match="columns"):
        distill.plan(DistillConfig(data=str(tmp_path / "odd"), out=str(tmp_path / "o")))


# --- the pipeline on local Ray, scripted teacher ---------------------------------------------------------------


@pytest.mark.timeout(300)
def test_pipeline_filters_dedups_and_resumes(ray_local, scripted_model, tmp_path):
    data = write_rows(tmp_path / "data", INSTRUCTION_ROWS)
    out = tmp_path / "out"
    config = mechanics_config(data, out, scripted_model)
    result = run_distill(config)

    distilled = read_dir(out / "distilled")
    assert set(distilled) == set(EXPECTED)
    for key, (reason, rewrite) in EXPECTED.items():
        row = distilled[key]
        assert row["reason"] == reason, key
        assert row["accepted"] == (reason == "")
        source = next(r for r in INSTRUCTION_ROWS if r["id"] == key)
        assert row["prompt"] == source["instruction"] and row["original"] == source["response"]
        assert row["response"] == (rewrite if rewrite is not None else source["response"])
    assert distilled["r03"]["teacher"] == "loop loop loop loop" and distilled["r03"]["finish_reason"] == "length"
    rejects = {row["id"]: row["reason"] for row in pq.read_table(out / "rejects").to_pylist()}
    assert rejects == EXPECTED_REJECTS
    counts = result["counts"]
    assert counts["rows"] == 7 and counts["accepted"] == 2 and counts["input_rejects"] == 2
    assert counts["reasons"] == {
        "answer_mismatch": 1, "cut_off": 1, "duplicate": 1, "empty": 1, "empty_input": 1, "leak": 1, "too_long": 1,
    }  # fmt: skip
    assert counts["generated_rows"] == 7 and counts["resumed_rows"] == 0
    assert json.loads((out / "manifest.json").read_text())["hash"] == result["hash"]

    # A rerun of the finished output is skipped.
    assert run_distill(config)["finished_at"] == result["finished_at"]

    # A crash: one part file never got written, and no manifest; the in-progress marker the run wrote first
    # is still there. The rerun generates only the lost part's rows.
    parts = sorted((out / "parts").glob("part-*.parquet"))
    generated_parts = [
        p for p in parts if any(r["reason"] not in distill.INPUT_REASONS for r in pq.read_table(p).to_pylist())
    ]
    assert len(generated_parts) >= 2, "part_rows=2 must spread the rows over several parts"
    lost = generated_parts[0]
    lost_ids = set(pq.read_table(lost).column("id").to_pylist())
    lost.unlink()
    (out / "manifest.json").unlink()
    (out / MARKER).write_text(json.dumps({"stage": "distill", "hash": result["hash"]}))
    resumed = run_distill(config)
    assert resumed["counts"]["generated_rows"] == len(lost_ids)
    assert resumed["counts"]["resumed_rows"] == len(INSTRUCTION_ROWS) - len(lost_ids)
    assert read_dir(out / "distilled") == distilled


@pytest.mark.timeout(240)
def test_one_domain_of_a_multi_domain_set_is_rewritten_with_domain(ray_local, scripted_model, tmp_path):
    data = write_rows(tmp_path / "data", INSTRUCTION_ROWS)
    result = run_distill(mechanics_config(data, tmp_path / "out", scripted_model, domain="mathematics"))
    distilled = read_dir(tmp_path / "out" / "distilled")
    assert set(distilled) == {"r05", "r06"} and result["counts"]["rows"] == 2
    assert {row["domain"] for row in distilled.values()} == {"mathematics"}
    with pytest.raises(ConfigError) as error:
        distill.plan(mechanics_config(data, tmp_path / "other", scripted_model, domain="history"))
    assert error.value.field == "domain" and "general, mathematics" in str(error.value)


@pytest.mark.timeout(240)
def test_pipeline_reads_a_curated_output(ray_local, scripted_model, tmp_path):
    """Raw curated text takes the continuation recipe; a changed config starts over instead of resuming."""
    docs = [
        {"id": "a", "text": "the question is what " * 3 + "alpha", "domain": "general"},
        {"id": "b", "text": "the question is what " * 3 + "loop", "domain": "general"},
        {"id": "c", "text": "   ", "domain": "general"},
        {"id": "d", "text": "alpha", "domain": "general"},
    ]
    write_rows(tmp_path / "curated_run" / "curated", docs, files=1)
    out = tmp_path / "out"
    result = run_distill(mechanics_config(tmp_path / "curated_run", out, scripted_model, min_document_tokens=4))
    assert result["recipe"] == "continuation"
    distilled = read_dir(out / "distilled")
    assert distilled["a"]["accepted"] and distilled["a"]["response"] == "beta gamma"
    assert distilled["a"]["prompt"] + " " + distilled["a"]["original"] == docs[0]["text"]
    assert distilled["b"]["reason"] == "cut_off" and distilled["b"]["response"] == distilled["b"]["original"]
    rejects = {row["id"]: row["reason"] for row in pq.read_table(out / "rejects").to_pylist()}
    assert rejects == {"c": "empty_input", "d": "too_short"}
    again = run_distill(
        mechanics_config(tmp_path / "curated_run", out, scripted_model, min_document_tokens=4, max_new_tokens=5)
    )
    assert again["counts"]["resumed_rows"] == 0 and again["counts"]["generated_rows"] == 2


# --- vLLM backend: the config and processor build on CPU, without vLLM -------------------------------------


@pytest.mark.timeout(120)
def test_finetune_reads_a_distill_output_through_its_manifest(ray_local, scripted_model, tmp_path):
    """`jobs.finetune --data <distill --out>` trains on distilled/ alone: never on the parts/ copies of the
    same rows or on rejects/; a path into parts/ or rejects/, and an unfinished output, are refused."""
    from training.finetuning import finetune
    from training.finetuning.finetune import FinetuneConfig

    out = tmp_path / "out"
    run_distill(mechanics_config(write_rows(tmp_path / "rows", INSTRUCTION_ROWS), out, scripted_model))
    assert {"distilled", "parts", "rejects", "manifest.json"} <= {p.name for p in out.iterdir()}

    def plan(data: str):
        config = FinetuneConfig(model=scripted_model, data=data, out=str(tmp_path / "ft"), micro_batch=1, actors=1)
        return finetune.plan(config)

    checked = plan(str(out))
    assert sorted(info.uri for info in checked.inputs) == sorted(str(p) for p in (out / "distilled").glob("*.parquet"))
    assert checked.rows == pq.read_table(out / "distilled").num_rows == len(EXPECTED)
    for wrong in (out / "parts", out / "rejects", out / "**" / "*.parquet"):
        with pytest.raises(ConfigError) as error:
            plan(str(wrong))
        assert error.value.field == "data" and str(out / "distilled") in str(error.value), wrong
    (out / "manifest.json").unlink()  # as a run killed before its end leaves it
    with pytest.raises(ConfigError) as error:
        plan(str(out))
    assert error.value.field == "data" and "manifest.json" in str(error.value) and "parts/" in str(error.value)


def test_vllm_processor_builds_without_vllm(ray_local, scripted_model):
    import importlib.util

    from training.distillation import teacher as teacher_module

    config = TeacherConfig(
        model=scripted_model,
        backend="vllm",
        max_new_tokens=16,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        stop=["###"],
        batch_size=48,
        actors=2,
        engine_kwargs={"dtype": "bfloat16", "max_model_len": 128},
    )
    processor_config = teacher_module.vllm_processor_config(config, scripted_model)
    assert processor_config.batch_size == 48 and processor_config.concurrency == 2
    assert processor_config.engine_kwargs["dtype"] == "bfloat16"
    assert processor_config.engine_kwargs["max_model_len"] == 128
    assert processor_config.model_source == scripted_model
    params = teacher_module.sampling_params(config)
    assert params == {"max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["###"]}

    processor = teacher_module.build_vllm_processor(config, scripted_model, distill.PREPARED_SCHEMA.names, [3])
    assert processor.list_stage_names() == ["vLLMEngineStage"]
    stage = processor.get_stage_by_name("vLLMEngineStage")
    assert stage.fn_constructor_kwargs["engine_kwargs"]["max_model_len"] == 128
    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules  # the CPU install builds all of this without vLLM

    # The row mapping both ways, as the processor applies it around the engine.
    row = {name: None for name in distill.PREPARED_SCHEMA.names} | {"id": "x", "prompt_ids": [4, 5]}
    engine_in = teacher_module.vllm_preprocess(row, params)
    assert engine_in == {"tokenized_prompt": [4, 5], "sampling_params": params}
    columns = distill.PREPARED_SCHEMA.names
    done = teacher_module.vllm_postprocess(
        {**row, "generated_text": "hi", "generated_tokens": [7, 3], "num_generated_tokens": 2}, columns, 16, [3]
    )
    assert (done["id"], done["teacher"], done["teacher_tokens"], done["finish_reason"]) == ("x", "hi", 2, "stop")
    cut = teacher_module.vllm_postprocess(
        {**row, "generated_text": "a" * 16, "generated_tokens": [9] * 16, "num_generated_tokens": 16}, columns, 16, [3]
    )
    assert cut["finish_reason"] == "length"


# --- the real SmolLM2-135M-Instruct, a handful of rows ---------------------------------------------------------

SMOL_INSTRUCTIONS = [
    {"id": "s1", "instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"id": "s2", "instruction": "What is 12 plus 30?", "response": "12 plus 30 is 42.", "domain": "mathematics"},
    {"id": "s3", "instruction": "Name a primary colour.", "response": "Red is a primary colour."},
]


@pytest.mark.timeout(300)
def test_smollm2_rewrite_recipe(one_torch_thread):
    """SmolLM2-Instruct through its chat template: decoded, non-empty rewrites, judged as specified."""
    from core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    spec = PrepareSettings("smollm2-135m", "rewrite", "instruction", "response", "text", 0.5, 512, 16, 8192, 40, "auto")
    rows = prepare_rows(SMOL_INSTRUCTIONS, spec, tokenizer)
    assert all(row["teacher_prompt"].startswith("<|im_start|>") for row in rows)
    assert all(row["teacher_prompt"].endswith("<|im_start|>assistant\n") for row in rows)
    torch.set_num_threads(2)
    generator = BatchedGenerator(TeacherConfig(model="smollm2-135m", max_new_tokens=40))
    generations = generator.generate([row["prompt_ids"] for row in rows])
    for row, generation in zip(rows, generations, strict=True):
        assert generation.text.strip(), row["id"]
        assert "<|im_end|>" not in generation.text and "<|im_start|>" not in generation.text
        assert 0 < generation.tokens <= 40
        reason = judge(generation.text, generation.finish_reason, row["check_number"], distill.DEFAULT_LEAK_PHRASES)
        expected = "cut_off" if generation.finish_reason == "length" else ""
        if not expected and row["check_number"] and "42" not in generation.text:
            expected = "answer_mismatch"
        if not expected and any(p in generation.text.lower() for p in distill.DEFAULT_LEAK_PHRASES):
            expected = "leak"
        assert reason == expected, (row["id"], generation)
    assert rows[1]["check_number"] == "42"
    # Paris is in the reference; a grounded rewrite keeps it.
    assert "paris" in generations[0].text.lower()


@pytest.mark.timeout(300)
def test_smollm2_continuation_pipeline(ray_local, tmp_path):
    docs = [
        {
            "id": "w1",
            "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built for the 1889 World's "
            "Fair and is named after the engineer Gustave Eiffel, whose company designed and built it.",
            "domain": "History",
        },
        {
            "id": "w2",
            "text": "Photosynthesis is the process by which plants use light to turn water and carbon dioxide into "
            "sugar and oxygen. It takes place mainly in the chloroplasts of leaf cells.",
            "domain": "Biology & health",
        },
        {"id": "w3", "text": "", "domain": "History"},
    ]
    write_rows(tmp_path / "curated", docs, files=1)
    out = tmp_path / "out"
    result = run_distill(
        DistillConfig(data=str(tmp_path / "curated"), out=str(out), teacher="smollm2-135m", max_new_tokens=48)
    )
    distilled = read_dir(out / "distilled")
    assert set(distilled) == {"w1", "w2"} and result["recipe"] == "continuation"
    for row in distilled.values():
        assert row["teacher"].strip() and "<|im_" not in row["teacher"]
        assert row["teacher_prompt"].startswith("<|im_start|>")
        assert row["prompt"] and row["original"] and row["prompt"] in row["teacher_prompt"]
        assert row["response"] == (row["teacher"] if row["accepted"] else row["original"])
        assert (row["reason"] == "cut_off") == (row["finish_reason"] == "length") or row["reason"] in ("leak", "")
    assert {row["id"]: row["reason"] for row in pq.read_table(out / "rejects").to_pylist()} == {"w3": "empty_input"}
    assert result["counts"]["generated_tokens"] > 0


# --- the job, as a user runs it ---------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_distill_job_subprocess(scripted_model, tmp_path):
    data = write_rows(tmp_path / "data", INSTRUCTION_ROWS)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "jobs.distill", "--data", str(data), "--teacher", scripted_model]
    command += ["--backend", "transformers", "--out", str(out), "--max-new-tokens", "4", "--batch-size", "4"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "distill" and manifest["counts"]["rows"] == 7 and manifest["counts"]["accepted"] == 2
    assert set(pq.read_table(out / "distilled").column_names) >= {
        "id",
        "prompt",
        "original",
        "teacher",
        "accepted",
        "reason",
    }
    bad = subprocess.run(
        [*command[:-4], "--max-new-tokens", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "max_new_tokens" in bad.stderr
