"""Stage 2b: self-data distillation. The teacher rewrites the curated data; its rewrites train the student.

read -> prepare (recipe, chat template, tokenize, reject bad rows) -> teacher (transformers actors or
vLLM via ray.data.llm) -> judge (filters) -> part files in `parts/` -> dedup -> `distilled/`, `rejects/`,
and, last, `manifest.json`.

Recipes
- `rewrite` (SDFT; Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model
  Fine-Tuning"): rows with an instruction and a reference response. The teacher sees both and writes
  the response in its own words; the student trains on (instruction, rewrite).
- `continuation`: raw corpus text (a curated set has only `text`). Each document is cut into a prefix
  and its true continuation, and the teacher rewrites the continuation given both, i.e. SDFT applied to
  the two halves of a document. Chosen over "document -> generated question/answer pair" because
  (1) every row keeps an original to fall back on, so "reject the rewrite, keep the original in its
  place" holds for raw text exactly as for instruction data; (2) the rewrite stays grounded in real
  text, where a free question/answer pair from a small teacher drifts into invention and would need a
  parser that fails on its own; (3) both recipes yield the same (prompt, response) shape, so one
  set of filters and one fine-tuning format serve both.

Filters (a rejected rewrite keeps the original as `response`, with the reason): empty, cut off at
`max_new_tokens`, leaking the prompt ("reference answer", "as an AI", ...), failing the answer check
(the reference's final number must appear in the rewrite), and exact duplicates of an earlier rewrite.
Bad input rows (empty, too short to split, longer than the teacher's context) go to `rejects/` with
their reason.

Resumable: each processed batch is written atomically to `parts/` as soon as it is judged, and a rerun
skips every id already there, so after a crash only the missing rows are generated again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from core import manifest, models, storage
from core.batching import cached_tokenizer
from core.domains import check_domain, domains_in, only_domain
from core.errors import ConfigError, check_range
from core.progress import Progress
from core.runtime import RunConfig, default_threads
from core.stage import Outcome, Stage, run_stage
from training.distillation.teacher import (
    Backend,
    GenerationSettings,
    TeacherConfig,
    TransformersTeacher,
    build_vllm_processor,
    eos_ids,
)

logger = logging.getLogger(__name__)

Recipe = Literal["rewrite", "continuation"]

REWRITE_TEMPLATE = (
    "Below is an instruction and a reference answer. Write your own answer to the instruction, using the "
    "reference answer as a guide but in your own words. Reply with the answer only.\n\n"
    "### Instruction:\n{instruction}\n\n### Reference answer:\n{reference}"
)
CONTINUATION_TEMPLATE = (
    "Below are the beginning of a text and its original continuation. Rewrite the continuation in your own "
    "words so that it follows the beginning. Reply with the continuation only.\n\n"
    "### Beginning:\n{prefix}\n\n### Original continuation:\n{reference}"
)
DEFAULT_LEAK_PHRASES = [
    "reference answer",
    "original continuation",
    "### instruction",
    "### beginning",
    "as an ai",
    "as a language model",
    "in my own words",
]

# Reasons a row never reaches the teacher (rejects/), and reasons a rewrite is not used (distilled/).
INPUT_REASONS = ("empty_input", "too_short", "too_long")
FILTER_REASONS = ("empty", "cut_off", "leak", "answer_mismatch", "duplicate")

PART_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("recipe", pa.string()),
        ("domain", pa.string()),
        ("prompt", pa.string()),
        ("original", pa.string()),
        ("teacher", pa.string()),
        ("accepted", pa.bool_()),
        ("reason", pa.string()),
        ("response", pa.string()),
        ("teacher_prompt", pa.string()),
        ("teacher_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)
# What `prepare_batch` emits; the teacher adds `teacher`, `teacher_tokens`, `finish_reason`.
PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("recipe", pa.string()),
        ("domain", pa.string()),
        ("prompt", pa.string()),
        ("original", pa.string()),
        ("teacher_prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("check_number", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass
class DistillConfig(RunConfig, GenerationSettings):
    # Greedy output does not depend on these: they change how a run executes, not what it produces.
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {
        "actors",
        "gpus",
        "batch_size",
        "max_batch_tokens",
        "part_rows",
    }

    data: str = ""
    """Input: a curated stage's output directory (its curated/ is read), or Parquet files, a directory or a glob."""
    domain: str | None = None
    """Rewrite this domain's rows only (unset: every row; a curate output of a multi-domain seeds file holds
    several domains)."""
    teacher: str = "smollm2-135m"
    """Teacher model: an embedded name (smollm2-135m), a Hugging Face directory, a .gguf file, a Hub id
    (org/name or org/name@revision) or an s3:// prefix."""
    backend: Backend = "transformers"
    """`transformers` (CPU or one GPU, batched generate on Ray actors) or `vllm` (GPU, ray.data.llm)."""
    out: str = ""
    """Output directory, local or s3://: distilled/, rejects/, parts/ (resume state), manifest.json."""
    recipe: Literal["auto", "rewrite", "continuation"] = "auto"
    """`rewrite` for instruction/response rows, `continuation` for raw text; auto picks from the columns."""
    instruction_column: str = "instruction"
    """Column holding the instruction (rewrite recipe)."""
    response_column: str = "response"
    """Column holding the reference response (rewrite recipe)."""
    text_column: str = "text"
    """Column holding the document (continuation recipe)."""
    prefix_fraction: float = 0.5
    """continuation: share of the document's window (in characters, cut at a space) given as the prefix."""
    max_document_tokens: int = 512
    """continuation: each document is windowed to its first this many tokens before it is split."""
    min_document_tokens: int = 16
    """continuation: documents shorter than this cannot be split into prefix and continuation (too_short)."""
    context_length: int = 0
    """Teacher context in tokens (prompt + max_new_tokens must fit); 0 takes the model's own."""
    answer_check: Literal["auto", "numbers", "none"] = "auto"
    """`numbers`: the reference's final number must appear in the rewrite. auto: only for rows whose domain
    mentions math or whose reference carries a `####` final answer (GSM8K style)."""
    leak_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_LEAK_PHRASES))
    """A rewrite containing any of these (case-insensitive) leaks the prompt and is rejected."""
    part_rows: int = 256
    """Rows per resumable part file: a crash loses at most the parts in flight, a rerun redoes only those."""
    limit: int | None = None
    """Process at most this many input rows (unset: all); for demos and smoke runs."""
    actors: int = 1
    """transformers: teacher actors; vllm: engine replicas (concurrency)."""

    def __post_init__(self) -> None:
        for name in ("data", "out", "teacher"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), f"is required: pass --{name}")
        check_range("prefix_fraction", self.prefix_fraction, ge=0.05, le=0.95)
        check_range("min_document_tokens", self.min_document_tokens, ge=2)
        check_range("max_document_tokens", self.max_document_tokens, ge=2)
        if self.max_document_tokens < self.min_document_tokens:
            raise ConfigError(
                "max_document_tokens",
                self.max_document_tokens,
                f"must be >= min_document_tokens={self.min_document_tokens}",
            )
        check_range("part_rows", self.part_rows, ge=1)
        check_range("context_length", self.context_length, ge=0, hint="0: the teacher's own")
        check_range("limit", self.limit, ge=1, optional=True, hint="or unset for every row")
        if self.backend == "vllm" and self.gpus:
            raise ConfigError("gpus", self.gpus, "is for the transformers backend; vLLM takes GPUs itself")
        self.teacher_config()

    def teacher_config(self) -> TeacherConfig:
        generation = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationSettings)}
        try:
            return TeacherConfig(model=self.teacher, backend=self.backend, actors=self.actors, **generation)
        except ConfigError as error:  # name the flag the user gave
            field_name = {"actors": "actors", "model": "teacher"}.get(error.field, error.field)
            raise ConfigError(field_name, error.value, error.fix) from None


# --- pure core: prompts, splitting, filters ----------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSettings:
    """What the prepare task needs; small and picklable."""

    teacher: str
    recipe: Recipe
    instruction_column: str
    response_column: str
    text_column: str
    prefix_fraction: float
    max_document_tokens: int
    min_document_tokens: int
    context_length: int
    max_new_tokens: int
    answer_check: str
    storage_options: storage.StorageOptions | None = None
    """Reach a teacher on S3 (its tokenizer files)."""


def render_prompt(tokenizer, user_text: str) -> str:
    """The teacher's input text: the user turn through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text + "\n\n"


def split_document(text: str, fraction: float) -> tuple[str, str]:
    """Cut a document into (prefix, continuation) at the space nearest `fraction` of its characters."""
    target = int(len(text) * fraction)
    before, after = text.rfind(" ", 0, target + 1), text.find(" ", target)
    candidates = [position for position in (before, after) if 0 < position < len(text) - 1]
    cut = min(candidates, key=lambda position: abs(position - target)) if candidates else target
    return text[:cut].strip(), text[cut:].strip()


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _canonical_number(token: str) -> str | None:
    try:
        value = float(token.replace(",", ""))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def final_number(text: str) -> str | None:
    """The last number in `text` (after a GSM8K `####` marker when there is one), canonicalised."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


def contains_number(text: str, number: str) -> bool:
    return any(_canonical_number(token) == number for token in _NUMBER.findall(text))


def needs_answer_check(mode: str, domain: str | None, reference: str) -> bool:
    if mode == "numbers":
        return True
    if mode == "none":
        return False
    return "math" in (domain or "").lower() or "####" in reference


def judge(
    teacher_text: str | None, finish_reason: str | None, check_number: str | None, leak_phrases: list[str]
) -> str:
    """Why a rewrite is not used, or "" when it is. Filters run in a fixed order; the first failure names it."""
    text = (teacher_text or "").strip()
    if not text:
        return "empty"
    if finish_reason == "length":
        return "cut_off"
    lowered = text.lower()
    if any(phrase.lower() in lowered for phrase in leak_phrases):
        return "leak"
    if check_number is not None and not contains_number(text, check_number):
        return "answer_mismatch"
    return ""


def row_id(values: list[str]) -> str:
    return hashlib.sha1("\x1f".join(values).encode()).hexdigest()[:16]


def prepare_rows(rows: list[dict[str, Any]], spec: PrepareSettings, tokenizer) -> list[dict[str, Any]]:
    """Input rows -> teacher inputs (rendered prompt and its ids), or a reject reason. Never raises on bad data."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        domain = row.get("domain")
        domain = None if domain is None else str(domain)
        if spec.recipe == "rewrite":
            instruction = str(row.get(spec.instruction_column) or "").strip()
            reference = str(row.get(spec.response_column) or "").strip()
            student_prompt, user_text = (
                instruction,
                REWRITE_TEMPLATE.format(instruction=instruction, reference=reference),
            )
            reason = "" if instruction and reference else "empty_input"
            key = [instruction, reference]
        else:
            text = str(row.get(spec.text_column) or "").strip()
            key = [text]
            window_ids = tokenizer(text, add_special_tokens=False).input_ids[: spec.max_document_tokens] if text else []
            window = tokenizer.decode(window_ids, skip_special_tokens=True).strip()
            student_prompt, reference = split_document(window, spec.prefix_fraction)
            user_text = CONTINUATION_TEMPLATE.format(prefix=student_prompt, reference=reference)
            if not text:
                reason = "empty_input"
            elif len(window_ids) < spec.min_document_tokens or not student_prompt or not reference:
                reason = "too_short"
            else:
                reason = ""
        teacher_prompt = render_prompt(tokenizer, user_text)
        prompt_ids = tokenizer(teacher_prompt, add_special_tokens=not has_template).input_ids if not reason else []
        if not reason and len(prompt_ids) + spec.max_new_tokens > spec.context_length:
            reason, prompt_ids = "too_long", []
        check = final_number(reference) if needs_answer_check(spec.answer_check, domain, reference) else None
        out.append(
            {
                "id": str(row["id"]) if row.get("id") is not None else row_id(key),
                "recipe": spec.recipe,
                "domain": domain,
                "prompt": student_prompt,
                "original": reference,
                "teacher_prompt": teacher_prompt,
                "prompt_ids": prompt_ids,
                "check_number": check,
                "reason": reason,
            }
        )
    return out


# --- Ray Data tasks ----------------------------------------------------------------------------------------


def prepare_batch(batch: pa.Table, spec: PrepareSettings, done_ids: frozenset[str]) -> pa.Table:
    """Ray Data task: input rows -> PREPARED_SCHEMA rows, skipping ids that an earlier run already wrote."""
    rows = prepare_rows(batch.to_pylist(), spec, cached_tokenizer(spec.teacher, spec.storage_options))
    rows = [row for row in rows if row["id"] not in done_ids]
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def keep_reason(batch: pa.Table, rejected: bool) -> pa.Table:
    """Rows that go to the teacher (rejected=False) or straight to rejects (rejected=True)."""
    reasons = batch.column("reason").to_pylist()
    keep = [i for i, reason in enumerate(reasons) if bool(reason) == rejected]
    return batch.take(pa.array(keep, type=pa.int64()))


def judge_batch(batch: pa.Table, leak_phrases: list[str]) -> pa.Table:
    """Ray Data task: generated rows -> PART_SCHEMA rows with `accepted`, `reason` and the `response` to train on."""
    out = []
    for row in batch.to_pylist():
        if row.get("reason"):  # rejected before the teacher: no generation
            reason, teacher = row["reason"], None
        else:
            teacher = (row.get("teacher") or "").strip()
            reason = judge(teacher, row.get("finish_reason"), row.get("check_number"), leak_phrases)
        out.append(
            {
                **{name: row.get(name) for name in PART_SCHEMA.names},
                "teacher": teacher,
                "accepted": not reason,
                "reason": reason,
                "response": row["original"] if reason else teacher,
            }
        )
    return pa.Table.from_pylist(out, schema=PART_SCHEMA)


def write_part(batch: pa.Table, parts_dir: str, options: storage.StorageOptions) -> pa.Table:
    """Ray Data task: write one batch as one part file, atomically; return its counts.

    The name is a hash of the batch's ids, so a task that Ray retries overwrites its own file.
    """
    if batch.num_rows == 0:
        return pa.table({"rows": [0], "generated": [0], "generated_tokens": [0]})
    batch = batch.select(PART_SCHEMA.names).cast(PART_SCHEMA)
    name = row_id(batch.column("id").to_pylist())
    storage.write_parquet_atomic(batch, storage.join(parts_dir, f"part-{name}.parquet"), options)
    tokens = [count or 0 for count in batch.column("teacher_tokens").to_pylist()]
    generated = sum(1 for reason in batch.column("reason").to_pylist() if reason not in INPUT_REASONS)
    return pa.table({"rows": [batch.num_rows], "generated": [generated], "generated_tokens": [sum(tokens)]})


# --- the stage ---------------------------------------------------------------------------------------------


@dataclass
class DistillPlan:
    """What validation found, so the run itself starts from checked facts."""

    config: DistillConfig
    inputs: list[storage.FileInfo]
    recipe: Recipe
    context_length: int
    digest: str


DATA_READS = {"curate": "curated", "reselect": "curated"}
"""--data may name a curate (or re-select) output root: its curated/ is read (never its scored/ or rejects/)."""


def input_files(data: str, options: storage.StorageOptions) -> list[storage.FileInfo]:
    files = manifest.input_files(data, field="data", reads=DATA_READS, options=options, suffixes=(".parquet",))
    if not files:
        raise ConfigError("data", data, "holds no *.parquet file; pass a curated output directory or Parquet files")
    return files


def teacher_context(teacher: str, options: storage.StorageOptions | None = None) -> int:
    """The teacher's context window, from its config.json (max_position_embeddings); no weights are read."""
    values = models.model_config(teacher, options, field="teacher")
    return int(values.get("max_position_embeddings") or 2048)


def plan(config: DistillConfig) -> DistillPlan:
    """Check everything that can be checked without Ray: inputs, columns, teacher, context."""
    options = config.storage_options()
    inputs = input_files(config.data, options)
    check_domain(config.domain, domains_in(inputs, options), config.data, mixed=True)
    with storage.open_read(inputs[0].uri, options) as handle:
        columns = set(pq.read_schema(handle).names)
    has_pairs = {config.instruction_column, config.response_column} <= columns
    recipe = config.recipe
    if recipe == "auto":
        if has_pairs:
            recipe = "rewrite"
        elif config.text_column in columns:
            recipe = "continuation"
        else:
            raise ConfigError(
                "data",
                config.data,
                f"has neither {config.instruction_column}/{config.response_column} nor {config.text_column} "
                f"columns (found {sorted(columns)}); set --instruction-column/--response-column or --text-column",
            )
    if recipe == "rewrite" and not has_pairs:
        raise ConfigError("recipe", recipe, f"needs {config.instruction_column} and {config.response_column} columns")
    if recipe == "continuation" and config.text_column not in columns:
        raise ConfigError("recipe", recipe, f"needs a {config.text_column} column")
    models.model_info(config.teacher, options, field="teacher")
    model_context = teacher_context(config.teacher, options)
    context = config.context_length or model_context
    if context > model_context:
        raise ConfigError("context_length", context, f"exceeds the teacher's {model_context} positions")
    if config.max_new_tokens >= context:
        raise ConfigError("max_new_tokens", config.max_new_tokens, f"must be below the context of {context} tokens")
    # The teacher's identity (its files, objects or Hub commit): a changed teacher rewrites again.
    digest = config.digest([*inputs, *models.model_inputs(config.teacher, options, "teacher")], recipe=recipe,
                           context=context)  # fmt: skip
    return DistillPlan(config, inputs, recipe, context, digest)  # type: ignore[arg-type]


def resumed_ids(out: str, options: storage.StorageOptions) -> set[str]:
    """Ids already written to `parts/` by an interrupted run of this same config (core.stage keeps `parts/`
    only for that run; any other run starts from an empty output)."""
    parts_dir = storage.join(out, "parts")
    if not storage.exists(parts_dir, options):
        return set()
    part_files = [info.uri for info in storage.expand(parts_dir, options) if info.uri.endswith(".parquet")]
    done: set[str] = set()
    for uri in part_files:
        with storage.open_read(uri, options) as handle:
            done.update(pq.read_table(handle, columns=["id"]).column("id").to_pylist())
    logger.info("resuming in %s: %d rows already distilled in %d parts", out, len(done), len(part_files))
    return done


def _distill(config: DistillConfig, checked: DistillPlan, timer: manifest.Timer) -> Outcome:
    """Stage 2b's work: generate what an interrupted run left, judge, finalize (core.stage does the rest)."""
    options = config.storage_options()
    done_ids = resumed_ids(config.out, options)
    spec = _prepare_spec(config, checked)
    parts_dir = storage.join(config.out, "parts")
    source = storage.arrow_target([info.uri for info in checked.inputs], options)
    with timer("distill"):
        prepared = _read_prepared(source, spec, done_ids, config)
        streams, pending = _part_streams(prepared, config)
        # Counted as each part is written (every part_rows rows), whichever backend generates.
        with Progress("distill generate", pending, "rows") as progress:
            written = [
                _judge_and_write(stream, config.leak_phrases, parts_dir, options, progress) for stream in streams
            ]
    run_counts = _run_counts(written, resumed_rows=len(done_ids))
    with timer("finalize"):
        counts = finalize(config.out, options)
    seconds = timer.timings["distill"]
    counts.update(run_counts, generated_tokens_per_s=round(run_counts["generated_tokens"] / max(seconds, 1e-9), 2))
    _log_distilled(config.out, counts, run_counts["generated_rows"])
    return Outcome(counts, {"recipe": checked.recipe, "teacher": config.teacher, "backend": config.backend})


DISTILL: Stage[DistillConfig, DistillPlan] = Stage(
    "distill", plan, _distill, reads=lambda config: [config.data, config.teacher], keep=("parts",)
)


def run_distill(config: DistillConfig) -> dict[str, Any]:
    """Run stage 2b end to end and return its manifest (core.stage.run_stage: skips a finished run and resumes
    an interrupted one of the same config from its parts)."""
    return run_stage(DISTILL, config)


def _prepare_spec(config: DistillConfig, checked: DistillPlan) -> PrepareSettings:
    """The prepare task's settings: the config's, with the recipe and context that validation settled."""
    return PrepareSettings(
        teacher=config.teacher,
        recipe=checked.recipe,
        instruction_column=config.instruction_column,
        response_column=config.response_column,
        text_column=config.text_column,
        prefix_fraction=config.prefix_fraction,
        max_document_tokens=config.max_document_tokens,
        min_document_tokens=config.min_document_tokens,
        context_length=checked.context_length,
        max_new_tokens=config.max_new_tokens,
        answer_check=config.answer_check,
        storage_options=config.storage_options(),
    )


def _read_prepared(source: dict[str, Any], spec: PrepareSettings, done_ids: set[str], config: DistillConfig):
    """The input rows (at most `limit`) as teacher inputs or input rejects, less those an earlier run wrote.

    Materialized because both routes out of it (teacher, rejects) read it.
    """
    import ray

    data = ray.data.read_parquet(source["path"], filesystem=source["filesystem"])
    if config.domain is not None:
        data = data.map_batches(only_domain, fn_args=(config.domain,), batch_format="pyarrow", num_cpus=0.25)
    if config.limit:
        data = data.limit(config.limit)
    return data.map_batches(
        prepare_batch,
        fn_kwargs={"spec": spec, "done_ids": frozenset(done_ids)},
        batch_format="pyarrow",
        batch_size=config.batch_size * 4,
        num_cpus=0.25,
    ).materialize()


def _part_streams(prepared, config: DistillConfig) -> tuple[list, int]:
    """The streams of rows to judge: the teacher's generations (when rows are pending), then the input rejects;
    and the number of rows the teacher is to generate."""
    to_teacher = prepared.map_batches(
        keep_reason, fn_kwargs={"rejected": False}, batch_format="pyarrow", num_cpus=0.25
    ).materialize()
    pending = to_teacher.count()
    # One block per part: a teacher task then writes its part as soon as its rows are judged.
    streams = [
        _generate(to_teacher.repartition(math.ceil(pending / config.part_rows)), config.teacher_config(), config)
    ]
    if not pending:
        streams = []  # everything was generated by an earlier run: no teacher to start
    streams.append(
        prepared.map_batches(keep_reason, fn_kwargs={"rejected": True}, batch_format="pyarrow", num_cpus=0.25)
    )
    return streams, pending


def _judge_and_write(
    stream, leak_phrases: list[str], parts_dir: str, options: storage.StorageOptions, progress: Progress
):
    """Judge one stream's rows and write them to part files; returns a frame of per-part counts (see write_part).

    The counts reach the driver part by part, and `progress` counts the generated rows as they do."""
    import pandas as pd

    judged = stream.map_batches(
        judge_batch,
        fn_kwargs={"leak_phrases": leak_phrases},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
    )
    written = judged.map_batches(
        write_part,
        fn_kwargs={"parts_dir": parts_dir, "options": options},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
    )
    frames = []
    for frame in written.iter_batches(batch_format="pandas", batch_size=None):
        progress.add(int(frame["generated"].sum()) if len(frame) else 0)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _run_counts(written: list, resumed_rows: int) -> dict[str, int]:
    """What this run itself generated (resumed rows were generated by an earlier one), from write_part's counts."""
    written = [frame for frame in written if len(frame)]  # a stream with no rows left yields no columns
    return {
        "generated_rows": int(sum(frame["generated"].sum() for frame in written)),
        "generated_tokens": int(sum(frame["generated_tokens"].sum() for frame in written)),
        "resumed_rows": resumed_rows,
    }


def _log_distilled(out: str, counts: dict[str, Any], generated_rows: int) -> None:
    logger.info(
        "distilled %d rows (%d accepted, %d kept the original; %d bad inputs) into %s; generated %d rows this run",
        counts["rows"],
        counts["accepted"],
        counts["rows"] - counts["accepted"],
        counts["input_rejects"],
        out,
        generated_rows,
    )


def _generate(rows, teacher: TeacherConfig, config: DistillConfig):
    """Rows with `prompt_ids` -> the same rows plus the teacher's generation, on the configured backend."""
    import ray

    options = config.storage_options()
    teacher = dataclasses.replace(teacher, storage_options=options)
    if teacher.backend == "vllm":
        tokenizer = cached_tokenizer(teacher.model, options)
        # An s3:// prefix or a Hub id goes to ray.data.llm as it is: each engine's node fetches it itself.
        source, revision = models.engine_source(teacher.model, options)
        if revision:
            teacher = dataclasses.replace(teacher, engine_kwargs={**teacher.engine_kwargs, "revision": revision})
        processor = build_vllm_processor(teacher, source, PREPARED_SCHEMA.names, eos_ids(tokenizer))
        return processor(rows)
    threads = teacher.threads or default_threads(teacher.actors, teacher.cpus, config.ray_address)
    return rows.map_batches(
        TransformersTeacher,
        fn_constructor_args=(teacher, threads),
        compute=ray.data.ActorPoolStrategy(size=teacher.actors),
        num_cpus=teacher.cpus,
        num_gpus=teacher.gpus or None,
        batch_size=teacher.batch_size,
        batch_format="pyarrow",
    )


def finalize(out: str, options: storage.StorageOptions) -> dict[str, Any]:
    """Parts -> distilled/ (with exact-duplicate rewrites rejected) and rejects/; returns the counts.

    A rewrite identical to one of a row with a smaller id is a duplicate: that row keeps its original.
    Parts are left as they are, so finalizing again gives the same result.
    """
    parts_dir = storage.join(out, "parts")
    part_files = [info.uri for info in storage.expand(parts_dir, options) if info.uri.endswith(".parquet")]
    first_by_text: dict[str, str] = {}
    for uri in part_files:
        with storage.open_read(uri, options) as handle:
            table = pq.read_table(handle, columns=["id", "teacher", "accepted"])
        for row_key, text, accepted in zip(*(table.column(n).to_pylist() for n in table.column_names), strict=True):
            if accepted:
                digest = hashlib.sha1(text.encode()).hexdigest()
                if digest not in first_by_text or row_key < first_by_text[digest]:
                    first_by_text[digest] = row_key
    keepers = set(first_by_text.values())
    reasons: dict[str, int] = {}
    counts = {"rows": 0, "accepted": 0, "input_rejects": 0}
    for uri in part_files:
        with storage.open_read(uri, options) as handle:
            rows = pq.read_table(handle).to_pylist()
        distilled, rejects = [], []
        for row in rows:
            if row["accepted"] and row["id"] not in keepers:
                row.update(accepted=False, reason="duplicate", response=row["original"])
            if row["reason"]:
                reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
            (rejects if row["reason"] in INPUT_REASONS else distilled).append(row)
        name = uri.rsplit("/", 1)[1]
        if distilled:
            table = pa.Table.from_pylist(distilled, schema=PART_SCHEMA)
            storage.write_parquet_atomic(table, storage.join(out, "distilled", name), options)
        if rejects:
            table = pa.Table.from_pylist(rejects, schema=PART_SCHEMA).select(
                ["id", "recipe", "domain", "reason", "original"]
            )
            storage.write_parquet_atomic(table, storage.join(out, "rejects", name), options)
        counts["rows"] += len(distilled)
        counts["accepted"] += sum(1 for row in distilled if row["accepted"])
        counts["input_rejects"] += len(rejects)
    counts["reasons"] = dict(sorted(reasons.items()))  # type: ignore[assignment]
    return counts
