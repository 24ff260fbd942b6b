"""The teacher: one config, two backends that turn rendered prompts into generations.

- `transformers` (CPU or one GPU): real batched generation. Prompts of similar length are grouped
  (sorted by length, padded on the left so every row's last prompt token sits at the same position),
  and `model.generate` decodes them together with its KV cache, stopping each row at EOS or a stop
  string, or at `max_new_tokens`. `TransformersTeacher` is the Ray Data actor around that core.
- `vllm` (GPU clusters): `ray.data.llm.build_processor` with a `vLLMEngineProcessorConfig`. vLLM is only
  in the `gpu` extra; the config and processor objects build without it (vLLM is imported by the engine
  actor when it starts).

Both backends receive the same row columns: `teacher_prompt` (the text, already through the teacher's
chat template) and `prompt_ids` (its token ids), and both add `teacher` (the generated text),
`teacher_tokens` and `finish_reason` (`stop` or `length`). vLLM is given the token ids, not the text,
so the two backends see exactly the same tokens and the context-length check made before the
teacher holds for both.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import torch

from core.batching import length_batches
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.logs import worker_logging
from core.placement import worker_device

logger = logging.getLogger(__name__)

Backend = Literal["transformers", "vllm"]
FinishReason = Literal["stop", "length"]

# Columns a teacher adds to each row.
GENERATED_FIELDS = {"teacher": pa.string(), "teacher_tokens": pa.int32(), "finish_reason": pa.string()}


@dataclass
class GenerationSettings:
    """How a teacher generates, for either backend: the settings the distill job's flags share with
    :class:`TeacherConfig`."""

    max_new_tokens: int = 256
    """Tokens generated per row at most; a row that reaches it is cut off (finish reason `length`)."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (used only when temperature > 0)."""
    seed: int = 0
    """Sampling seed (used only when temperature > 0)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; generation also stops at the tokenizer's EOS token(s). Not part of the output."""
    batch_size: int = 32
    """Rows per Ray Data batch handed to a teacher actor (vLLM: per engine request batch)."""
    max_batch_tokens: int = 16384
    """transformers: (prompt + max_new_tokens) x rows per generate call, which bounds the KV cache."""
    cpus_per_actor: float = 0.5
    """CPUs each transformers actor reserves; keep it below the node's CPUs so read tasks can run."""
    gpus_per_actor: float = 0.0
    """GPUs each transformers actor reserves; > 0 generates on CUDA."""
    torch_threads: int = 0
    """Torch threads per transformers actor; 0 picks from the machine (local) or cpus_per_actor (cluster)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """transformers weights and activations. bf16 is ~3x faster on CPUs with AVX512-BF16 but changes outputs."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """vllm: extra vLLM engine arguments (e.g. {"dtype": "bfloat16", "max_model_len": 4096})."""
    accelerator_type: str | None = None
    """vllm: accelerator the engine actors ask for (e.g. "H100"); unset takes any GPU."""


@dataclass
class TeacherConfig(GenerationSettings):
    """A teacher: its model, its backend, how many of it run, and how it generates."""

    model: str = ""
    """Teacher model: an embedded name (smollm2-135m), a Hugging Face directory or a .gguf file."""
    backend: Backend = "transformers"
    """`transformers` (CPU or one GPU, batched generate) or `vllm` (GPU, ray.data.llm)."""
    actors: int = 1
    """transformers: teacher actors. vllm: engine replicas (the processor's `concurrency`)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", self.model, "is required: name the teacher model")
        if self.backend not in ("transformers", "vllm"):
            raise ConfigError("backend", self.backend, "must be transformers or vllm")
        check_ranges(self, ("max_new_tokens", "batch_size", "max_batch_tokens", "actors"), ge=1)
        check_range("temperature", self.temperature, ge=0, hint="0 decodes greedily")
        check_range("top_p", self.top_p, gt=0, le=1)
        check_seed("seed", self.seed)
        check_range("cpus_per_actor", self.cpus_per_actor, gt=0, hint="fractions are fine")
        check_range("gpus_per_actor", self.gpus_per_actor, ge=0)
        check_range("torch_threads", self.torch_threads, ge=0, hint="0 picks from the machine")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", self.dtype, "must be float32 or bfloat16")
        if any(not text for text in self.stop):
            raise ConfigError("stop", self.stop, "stop strings must be non-empty")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class Generation:
    """One row's output: the text (stop string and EOS removed), tokens generated, and why it ended."""

    text: str
    tokens: int
    finish_reason: FinishReason


def pad_left(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (batch, longest) ids and attention mask, padded on the left.

    Decoder-only generation appends to the right: left padding puts every row's last prompt token in
    the last column, so the first new token of every row comes from its own prompt.
    """
    longest = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, longest - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
            mask[row, longest - len(tokens) :] = 1
    return ids, mask


def eos_ids(tokenizer, model_config=None) -> list[int]:
    """Every token id that ends generation: the tokenizer's EOS and the model's generation-config EOS."""
    found: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    generation_config = getattr(model_config, "generation_config", None) if model_config is not None else None
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for candidate in candidates:
        for value in candidate if isinstance(candidate, list | tuple) else [candidate]:
            if value is not None and int(value) not in found:
                found.append(int(value))
    return found


def finish_row(
    generated: Sequence[int], tokenizer, stop_ids: Sequence[int], stop: Sequence[str], pad_id: int, max_new_tokens: int
) -> Generation:
    """Turn one row of `generate` output (new tokens only) into text, a token count and a finish reason.

    `generate` keeps padding a finished row (with `pad_id`) until the whole batch is done, so the row's
    own output ends at its first EOS, or, for a stop string, where the string ends.
    """
    tokens = list(generated)
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(_cut_at_stop(_decode(tokenizer, tokens[:position]), stop)[0], position + 1, "stop")
    text, stopped = _cut_at_stop(_decode(tokenizer, tokens), stop)
    if stopped:
        while tokens and tokens[-1] == pad_id:  # the padding generate added after the stop string
            tokens.pop()
        return Generation(text, len(tokens), "stop")
    reason: FinishReason = "length" if len(tokens) >= max_new_tokens else "stop"
    return Generation(text, len(tokens), reason)


def _decode(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(word) for word in stop if word in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopOnStrings:
    """A `generate` stopping criterion: a row is done once its new text contains a stop string.

    transformers' own `stop_strings` maps strings onto vocabulary pieces and fails on some tokenizers
    (word-level ones, for instance); decoding the tail of each row works with any tokenizer. Only the
    last few tokens are decoded each step: a stop string of n characters spans at most n tokens.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_length = prompt_length
        self.window = max(len(word) for word in self.stop) + 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tails = input_ids[:, self.prompt_length :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(word in text for word in self.stop) for text in texts], device=input_ids.device)


class BatchedGenerator:
    """A causal LM and its tokenizer, loaded once, generating for many prompts at a time."""

    def __init__(self, config: TeacherConfig, device: str = "cpu", threads: int = 0):
        from transformers import GenerationConfig

        from core.models import load_model, load_tokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.config = config
        self.device = device
        self.tokenizer = load_tokenizer(config.model)
        dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        self.model = load_model(config.model, dtype=dtype, device=device)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.stop_ids = eos_ids(self.tokenizer, self.model)
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=config.sampling,
            temperature=config.temperature if config.sampling else None,
            top_p=config.top_p if config.sampling else None,
            top_k=None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """One `generate` call for prompts of similar length (token-id lists), in input order."""
        from transformers import StoppingCriteriaList

        ids, mask = pad_left(prompts, self.pad_id)
        criteria = [StopOnStrings(self.tokenizer, self.config.stop, ids.shape[1])] if self.config.stop else []
        output = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=self.generation_config,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        new_tokens = output[:, ids.shape[1] :].cpu().tolist()  # (batch, generated)
        return [
            finish_row(row, self.tokenizer, self.stop_ids, self.config.stop, self.pad_id, self.config.max_new_tokens)
            for row in new_tokens
        ]

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Generate for any number of prompts: length-sorted micro-batches within the token budget."""
        budget_lengths = [len(prompt) + self.config.max_new_tokens for prompt in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        for rows in length_batches(budget_lengths, self.config.max_batch_tokens, self.config.batch_size):
            if self.config.sampling:
                # Seeded per micro-batch from its first prompt, so a resumed run samples the same way.
                torch.manual_seed(self.config.seed + hash(tuple(prompts[rows[0]])) % (2**31))
            for row, generation in zip(rows, self.generate_batch([prompts[row] for row in rows]), strict=True):
                results[row] = generation
        return results  # type: ignore[return-value]


class TransformersTeacher:
    """Ray Data actor: `prompt_ids` -> `teacher`, `teacher_tokens`, `finish_reason` (pyarrow batches)."""

    def __init__(self, config: TeacherConfig, threads: int = 0):
        worker_logging()
        device = worker_device(config.gpus_per_actor)
        self.generator = BatchedGenerator(config, device=device, threads=threads)
        self.generated_tokens = 0
        self.seconds = 0.0
        logger.info("teacher %s ready on pid %d (%s)", config.model, os.getpid(), device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        prompts = batch.column("prompt_ids").to_pylist()
        generations = self.generator.generate(prompts)
        self.generated_tokens += sum(generation.tokens for generation in generations)
        self.seconds += time.perf_counter() - started
        logger.info(
            "teacher: %d rows, %.1f generated tokens/s so far", len(prompts), self.generated_tokens / self.seconds
        )
        return add_generations(batch, generations)


def add_generations(batch: pa.Table, generations: Sequence[Generation]) -> pa.Table:
    columns = {
        "teacher": [generation.text for generation in generations],
        "teacher_tokens": [generation.tokens for generation in generations],
        "finish_reason": [generation.finish_reason for generation in generations],
    }
    for name, values in columns.items():
        batch = batch.append_column(pa.field(name, GENERATED_FIELDS[name]), pa.array(values, GENERATED_FIELDS[name]))
    return batch


# --- vLLM through ray.data.llm ---------------------------------------------------------------------------


def vllm_processor_config(config: TeacherConfig, model_dir: str):
    """The `vLLMEngineProcessorConfig` for this teacher. Needs `ray.data.llm`, not vLLM.

    Prompts arrive rendered and tokenized (`tokenized_prompt`), so Ray's chat-template and tokenize stages
    are off; vLLM detokenizes its own output, so the detokenize stage is off too.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = {"max_model_len": None, **config.engine_kwargs}
    if engine_kwargs["max_model_len"] is None:
        engine_kwargs.pop("max_model_len")
    return vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs,
        concurrency=config.actors,
        batch_size=config.batch_size,
        accelerator_type=config.accelerator_type,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


def sampling_params(config: TeacherConfig) -> dict[str, Any]:
    """vLLM `SamplingParams` keyword arguments equivalent to the transformers backend's settings."""
    params: dict[str, Any] = {"max_tokens": config.max_new_tokens, "temperature": config.temperature}
    if config.sampling:
        params.update(top_p=config.top_p, seed=config.seed)
    if config.stop:
        params["stop"] = list(config.stop)
    return params


def vllm_preprocess(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Our row -> the engine's inputs. Ray keeps the row's other columns alongside for postprocess."""
    return {"tokenized_prompt": [int(token) for token in row["prompt_ids"]], "sampling_params": dict(params)}


def vllm_postprocess(
    row: dict[str, Any], columns: Sequence[str], max_new_tokens: int, stop_ids: Sequence[int]
) -> dict[str, Any]:
    """The engine's output row -> our columns plus `teacher`, `teacher_tokens`, `finish_reason`.

    Ray's vLLM stage reports the generated token ids but no finish reason: a row that generated
    `max_new_tokens` tokens and did not end on an EOS token was cut off.
    """
    generated = row.get("generated_tokens")
    tokens = [] if generated is None else [int(token) for token in generated]  # a list or a numpy array
    count = int(row["num_generated_tokens"]) if row.get("num_generated_tokens") is not None else len(tokens)
    cut_off = count >= max_new_tokens and not (tokens and tokens[-1] in stop_ids)
    out = {name: row[name] for name in columns}
    out.update(
        teacher=row.get("generated_text") or "", teacher_tokens=count, finish_reason="length" if cut_off else "stop"
    )
    return out


def build_vllm_processor(config: TeacherConfig, model_dir: str, columns: Sequence[str], stop_ids: Sequence[int]):
    """A `ray.data.llm` Processor: dataset of our rows in, the same rows with generations out."""
    from ray.data.llm import build_processor

    return build_processor(
        vllm_processor_config(config, model_dir),
        preprocess=functools.partial(vllm_preprocess, params=sampling_params(config)),
        postprocess=functools.partial(
            vllm_postprocess, columns=list(columns), max_new_tokens=config.max_new_tokens, stop_ids=list(stop_ids)
        ),
        preprocess_map_kwargs={"num_cpus": 0.25},
        postprocess_map_kwargs={"num_cpus": 0.25},
    )
