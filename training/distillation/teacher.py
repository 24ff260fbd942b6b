"""The teacher: one config, two backends that turn rendered prompts into generations.

- `transformers` (CPU or one GPU): real batched generation. Each prompt is prefilled alone (no padding),
  then all rows of a micro-batch decode together, one token per row per step, on a KV cache allocated once
  (`slot_cache.SlotCache`); each row stops at EOS, a stop string or `max_new_tokens`, and finished rows
  leave the batch. In float32, greedy output matched `model.generate` on each prompt alone for every row
  measured (docs/results.md, "Distillation speed"); in bfloat16 batching changes some rows.
  `TransformersTeacher` is the Ray Data actor around that core.
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
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import torch

from core.batching import length_batches
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.logs import worker_logging
from core.placement import resolve_dtype, worker_device
from core.storage import StorageOptions

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

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
    cpus: float = 0.5
    """CPUs each transformers actor reserves; keep it below the node's CPUs so read tasks can run."""
    gpus: float = 0.0
    """GPUs each transformers actor reserves; > 0 generates on CUDA."""
    threads: int = 0
    """Torch threads per transformers actor; 0 picks from the machine (local) or cpus (cluster)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """transformers weights and activations. float32 (the default) gives, row for row, the text of a lone
    greedy `generate`; bfloat16 (or auto: bf16 where the device computes it natively, such as a CPU with
    AVX512-BF16) is faster but batching changes some rows' text (docs/results.md, "Distillation speed")."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """vllm: extra vLLM engine arguments (e.g. {"dtype": "bfloat16", "max_model_len": 4096})."""
    accelerator_type: str | None = None
    """vllm: accelerator the engine actors ask for (e.g. "H100"); unset takes any GPU."""


@dataclass
class TeacherConfig(GenerationSettings):
    """A teacher: its model, its backend, how many of it run, and how it generates."""

    model: str = ""
    """Teacher model: an embedded name (smollm2-135m), a Hugging Face directory, a .gguf file, a Hub id
    (org/name or org/name@revision) or an s3:// prefix."""
    backend: Backend = "transformers"
    """`transformers` (CPU or one GPU, batched generate) or `vllm` (GPU, ray.data.llm)."""
    actors: int = 1
    """transformers: teacher actors. vllm: engine replicas (the processor's `concurrency`)."""
    storage_options: StorageOptions | None = None
    """Reach a teacher on S3 (the job's endpoint and region; credentials stay in each process's environment)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", self.model, "is required: name the teacher model")
        if self.backend not in ("transformers", "vllm"):
            raise ConfigError("backend", self.backend, "must be transformers or vllm")
        check_ranges(self, ("max_new_tokens", "batch_size", "max_batch_tokens", "actors"), ge=1)
        check_range("temperature", self.temperature, ge=0, hint="0 decodes greedily")
        check_range("top_p", self.top_p, gt=0, le=1)
        check_seed("seed", self.seed)
        check_range("cpus", self.cpus, gt=0, hint="fractions are fine")
        check_range("gpus", self.gpus, ge=0)
        check_range("threads", self.threads, ge=0, hint="0 picks from the machine")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError("dtype", self.dtype, "must be auto, float32 or bfloat16 (auto: bf16 where native)")
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


def stop_string_seen(tokenizer, tokens: Sequence[int], stop: Sequence[str]) -> bool:
    """Whether a row's new tokens contain a stop string, decoding only their tail.

    transformers' own `stop_strings` maps strings onto vocabulary pieces and fails on some tokenizers
    (word-level ones, for instance); decoding the tail of the row works with any tokenizer. A stop string
    of n characters spans at most n tokens, so the last n + 2 tokens are enough.
    """
    window = max(len(word) for word in stop) + 2
    text = _decode(tokenizer, tokens[-window:])
    return any(word in text for word in stop)


class BatchedGenerator:
    """A causal LM and its tokenizer, loaded once, generating for many prompts at a time.

    `generate` cuts the prompts into micro-batches (longest first, within the token budget) and decodes each
    micro-batch in one loop:

    1. **prefill, one prompt at a time**: the forward that `model.generate` runs on that prompt alone, so no
       compute goes to padding and each row's first token and cached keys are exactly those of a lone
       generation;
    2. **decode, all rows together**: one forward per step over the rows still going, on a `SlotCache`
       allocated once (each row's keys stay at the columns they have alone, no per-step concatenation);
    3. **finished rows leave the batch**: a row ends at EOS, at a stop string or at `max_new_tokens`; once a
       quarter of the batch has ended, those rows are dropped, so the rest of the steps cost less.

    Models whose cache is not plain full attention (sliding windows, linear attention) go through
    `model.generate` on left-padded micro-batches instead.
    """

    def __init__(self, config: TeacherConfig, device: str = "cpu", threads: int = 0):
        from transformers import GenerationConfig

        from core.models import load_model, load_tokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.config = config
        self.device = device
        self.dtype = resolve_dtype(config.dtype, device)
        self.tokenizer = load_tokenizer(config.model, config.storage_options)
        self.model = load_model(
            config.model, dtype=getattr(torch, self.dtype), device=device, options=config.storage_options
        )
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
        self.use_slots = True  # False once the model's cache turns out not to fit a SlotCache

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Generate for any number of prompts (token-id lists), in input order.

        Micro-batches hold up to `batch_size` rows and (longest prompt + max_new_tokens) x rows stays within
        `max_batch_tokens`, which bounds the KV cache. Rows of a micro-batch need not have similar lengths: no
        row is padded, so prompts are only sorted (longest first) to keep the attention widths close.
        """
        budget_lengths = [len(prompt) + self.config.max_new_tokens for prompt in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        for rows in length_batches(budget_lengths, self.config.max_batch_tokens, self.config.batch_size, 1.0):
            if self.config.sampling:
                # Seeded per micro-batch from its first prompt, so a resumed run samples the same way.
                torch.manual_seed(self.config.seed + hash(tuple(prompts[rows[0]])) % (2**31))
            for row, generation in zip(rows, self.generate_batch([prompts[row] for row in rows]), strict=True):
                results[row] = generation
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """One micro-batch: prefill each prompt, decode all rows together, in input order."""
        from training.distillation.slot_cache import SlotCache, slots_fit

        if not self.use_slots:
            return self.generate_padded(prompts)
        capacity = max(len(prompt) for prompt in prompts) + self.config.max_new_tokens
        cache = SlotCache(self.model.config.num_hidden_layers)
        first_logits = []
        for slot, prompt in enumerate(prompts):
            logits, prefill = self.prefill(prompt)
            if slot == 0:
                if not slots_fit(prefill):
                    self.use_slots = False
                    logger.info("teacher: %s has a cache a SlotCache cannot hold; using generate", self.config.model)
                    return self.generate_padded(prompts)
                cache.allocate(prefill, [len(prompt) for prompt in prompts], capacity)
            cache.load(slot, prefill)
            first_logits.append(logits)
        tokens = self.choose(torch.cat(first_logits))
        generated: list[list[int]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # the prompt each slot decodes
        live = [True] * len(rows)  # slots whose row has not ended
        while True:
            for slot, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                if live[slot]:
                    generated[row].append(token)
                    live[slot] = not self.row_done(generated[row])
            going = [slot for slot, on in enumerate(live) if on]
            if not going:
                break
            if (len(rows) - len(going)) * 4 >= len(rows):  # a quarter of the slots hold ended rows
                cache.keep(going)
                tokens = tokens[going]
                rows = [rows[slot] for slot in going]
                live = [True] * len(rows)
            output = self.model(
                input_ids=tokens[:, None],
                attention_mask=cache.attention_mask(),
                position_ids=cache.positions[:, None],
                cache=cache,
                use_cache=True,
            )
            cache.advance()
            tokens = self.choose(output.logits[:, -1])
        return [self.finish(row_tokens) for row_tokens in generated]

    def prefill(self, prompt: Sequence[int]) -> tuple[torch.Tensor, Cache]:
        """One prompt's forward, as `model.generate` runs it: (1, vocab) next-token logits and its cache."""
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        output = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(ids.shape[1], device=self.device)[None, :],
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1], output.cache

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from (rows, vocab) logits: the argmax, or a sample at the configured temperature
        and top_p (transformers' own warpers, as `generate` applies them)."""
        scores = logits.float()
        if not self.config.sampling:
            return scores.argmax(dim=-1)
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        scores = TemperatureLogitsWarper(self.config.temperature)(None, scores)
        if self.config.top_p < 1:
            scores = TopPLogitsWarper(self.config.top_p)(None, scores)
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]

    def row_done(self, tokens: Sequence[int]) -> bool:
        """Whether a row's new tokens end it: EOS, `max_new_tokens`, or a stop string."""
        if tokens[-1] in self.stop_ids or len(tokens) >= self.config.max_new_tokens:
            return True
        return bool(self.config.stop) and stop_string_seen(self.tokenizer, tokens, self.config.stop)

    def finish(self, tokens: Sequence[int]) -> Generation:
        config = self.config
        return finish_row(tokens, self.tokenizer, self.stop_ids, config.stop, self.pad_id, config.max_new_tokens)

    def generate_padded(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """`model.generate` on the prompts padded on the left: the path for caches a `SlotCache` cannot hold."""
        from transformers import StoppingCriteriaList

        ids, mask = pad_left(prompts, self.pad_id)
        criteria = [StopOnStrings(self.tokenizer, self.config.stop, ids.shape[1])] if self.config.stop else []
        output = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=self.generation_config,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        return [self.finish(row) for row in output[:, ids.shape[1] :].cpu().tolist()]


class StopOnStrings:
    """A `generate` stopping criterion: a row is done once its new tokens contain a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        rows = input_ids[:, self.prompt_length :].tolist()
        return torch.tensor([stop_string_seen(self.tokenizer, row, self.stop) for row in rows], device=input_ids.device)


class TransformersTeacher:
    """Ray Data actor: `prompt_ids` -> `teacher`, `teacher_tokens`, `finish_reason` (pyarrow batches)."""

    def __init__(self, config: TeacherConfig, threads: int = 0):
        worker_logging()
        device = worker_device(config.gpus)
        self.generator = BatchedGenerator(config, device=device, threads=threads)
        self.generated_tokens = 0
        self.seconds = 0.0
        logger.info("teacher %s ready on pid %d (%s, %s)", config.model, os.getpid(), device, self.generator.dtype)

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
