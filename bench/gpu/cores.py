"""The stage cores on an accelerator against the same cores on the CPU in fp32: agreement, throughput, MFU.

Imports no Ray, DeepSpeed or vLLM: each check calls a stage's pure core (the code its Ray adapter runs)
on models built from a config with seeded random weights, once on the CPU in fp32 (the reference) and
once on `--device` in `--dtype` (the candidate), and compares what comes out. Agreement between two
devices needs no trained weights; the init scale is raised so that next-token choices are decided
(not near-ties), as they are in a trained model.

That raised init also makes the random model amplify rounding through its layers far more than a trained
one does: in bf16 it strays from fp32 several times further than SmolLM2 does (docs/results.md, "GPU
checks"). So where a check's candidate runs in `--dtype`, the device in fp32 is held to the CPU in fp32
(the kernels and the code path), and the device in `--dtype` to the CPU in `--dtype` (the rounding).

| check | core | agreement asked for |
|---|---|---|
| encode | `curation.encode.DocumentEncoder` (truncated forward, SAE, rate pooling) | fp32: per-document cosine |
| | | >= 0.99, per-seed top-N overlap >= 95%; `--dtype`: within 0.02 and 5 points of the CPU's |
| SAE training | `curation.sae.model.SAETrainer` (fp32 on both) | FVU curve within 0.02 (absolute) at every step |
| pruning | `training.pruning.importance.taylor_importance` | kept structures at a 30% cut overlap >= 95% |
| teacher | `training.distillation.teacher.BatchedGenerator`, greedy | identical text on >= 90% of rows in fp32 |
| MMLU | `training.evaluation.likelihood.score_items` | fp32: identical predictions on >= 98% of questions; |
| | | `--dtype`: at most 3 points fewer than the CPU's |
| training | `training.finetuning.losses.causal_lm_loss`, AdamW, bf16 autocast | loss curve within 2% (relative) |

MFU is 2 x parameters run x tokens per second (6 x for a training step) over the device's bf16 peak
(`bench.measure`); for encode the parameters run are those of the truncated forward. Greedy text is
compared in fp32 on both sides: in bf16 a decoded token can flip where two candidates are within
rounding, and every later token then differs, so the share of identical rows in the candidate dtype is
reported (the device's and the CPU's), not asserted.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.measure import flops_per_token, mfu, timed

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5),
    "1b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
}  # fmt: skip


@dataclass
class CheckResult:
    name: str
    agreement: dict[str, float]
    passed: bool
    tokens_per_s: float
    flops_per_token: float
    detail: str = ""

    def mfu(self, peak: float | None) -> float | None:
        return mfu(self.tokens_per_s, self.flops_per_token, peak)


@dataclass
class Setup:
    model_dir: str
    layer: int
    docs: list[list[int]]
    """Token-id lists of the synthetic corpus: topic-biased word draws, so that selection has structure."""
    topics: np.ndarray
    device: str
    dtype: torch.dtype
    cpu_rounding: bool = True
    """Also run the CPU in `dtype`, to hold the device's rounding against it (False: throughput runs)."""


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over `vocab_size` ids: <unk>, <pad>, <s>, </s> are ids 0 to 3 and the words w0,
    w1, ... take the rest, so any id from 4 up is one word and a text of such words is one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - 4)]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"], vocab_size=len(words) + 4)
    tokenizer.train_from_iterator([" ".join(words)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_model_dir(root: Path, shape: str, seed: int = 0) -> str:
    """A Llama from SHAPES[shape] with seeded random weights, and a word-level tokenizer over its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    fast = word_tokenizer(dims["vocab_size"])
    config = LlamaConfig(
        **dims, max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.08,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    directory = root / shape
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


def synthetic_corpus(vocab: int, docs: int, topics: int = 4, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """`docs` documents of 24 to 160 tokens; 70% of each document's words come from its topic's band."""
    rng = np.random.default_rng(seed)
    band = max(8, (vocab - 4) // (topics * 4))
    labels = rng.integers(0, topics, size=docs)
    corpus = []
    for topic in labels:
        length = int(rng.integers(24, 160))
        own = rng.integers(4 + topic * band, 4 + (topic + 1) * band, size=length)
        anywhere = rng.integers(4, vocab, size=length)
        corpus.append(np.where(rng.random(length) < 0.7, own, anywhere).tolist())
    return corpus, labels


# encode ------------------------------------------------------------------------------------------


def build_encoder(setup: Setup, device: str, dtype: torch.dtype, sae):
    """The encoder the curate stage builds for `device` and `dtype` (bf16: autocast over fp32 weights)."""
    from curation.encode import DocumentEncoder, EncoderSettings

    name = str(dtype).removeprefix("torch.")
    spec = EncoderSettings(model=setup.model_dir, sae_dir=None, layer=setup.layer, device=device, dtype=name)
    return DocumentEncoder(spec, sae=sae.to(device))


def per_seed_top(vectors: torch.Tensor, seed_rows: list[int], top_n: int) -> set[int]:
    """The union of each seed's top-N documents by cosine (the paper's rule), seeds excluded."""
    from curation.encode import cosine_scores

    scores = cosine_scores(vectors, vectors[seed_rows])
    scores[seed_rows] = -2.0
    return {int(row) for column in range(len(seed_rows)) for row in scores[:, column].topk(top_n).indices}


def _vector_agreement(setup: Setup, expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(smallest per-document cosine, per-seed top-N overlap) of two encodings of the same documents."""
    seed_rows = [int(np.flatnonzero(setup.topics == t)[0]) for t in range(int(setup.topics.max()) + 1)]
    top_n = max(4, len(setup.docs) // 20)
    before, after = per_seed_top(expected, seed_rows, top_n), per_seed_top(got, seed_rows, top_n)
    return float((expected * got).sum(dim=1).min()), len(before & after) / len(before)


def check_encode(setup: Setup) -> CheckResult:
    """Asserted: the device in fp32 agrees with the CPU in fp32 (its kernels and code path are right), and
    the device in `dtype` strays from fp32 no further than the CPU in `dtype` does. How far bf16 strays is a
    property of the model: a random model with raised init amplifies rounding through its layers, far more
    than a trained one (docs/results.md, "GPU checks"), so it is reported, not held to a fixed bar."""
    from core.models import load_model
    from curation.sae.model import SAEConfig, TopKSAE

    full_model = load_model(setup.model_dir)  # its shape and the weights a truncated forward multiplies by
    hidden = full_model.config.hidden_size
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=hidden, expansion_factor=4, k=32, layer=setup.layer))
    reference = build_encoder(setup, "cpu", torch.float32, sae)
    sae.fit_normalizer(reference.activations(setup.docs[:64]))
    expected = reference.encode(setup.docs)
    on_device = build_encoder(setup, setup.device, torch.float32, sae).encode(setup.docs)
    exact = _vector_agreement(setup, expected, on_device)
    on_cpu = (-1.0, 0.0)  # nothing to hold the device to, without the CPU's own rounding
    if setup.cpu_rounding:
        on_cpu = _vector_agreement(setup, expected, build_encoder(setup, "cpu", setup.dtype, sae).encode(setup.docs))
    candidate = build_encoder(setup, setup.device, setup.dtype, sae)
    candidate.encode(setup.docs[:8])  # warm-up: kernels, allocator
    got, seconds = timed(lambda: candidate.encode(setup.docs), setup.device)
    rounded = _vector_agreement(setup, expected, got)
    tokens = sum(len(doc) for doc in setup.docs)
    flops = flops_per_token(full_model, setup.layer + 1) + 2 * 2 * hidden * sae.cfg.num_latents
    name = str(setup.dtype).removeprefix("torch.")
    agreement = {
        "min cosine fp32": exact[0], "overlap fp32": exact[1],
        f"min cosine {name}": rounded[0], f"overlap {name}": rounded[1],
    }  # fmt: skip
    if setup.cpu_rounding:
        agreement.update({f"CPU {name}: min cosine": on_cpu[0], f"CPU {name}: overlap": on_cpu[1]})
    passed = exact[0] >= 0.99 and exact[1] >= 0.95 and rounded[0] >= on_cpu[0] - 0.02 and rounded[1] >= on_cpu[1] - 0.05
    return CheckResult("encode", agreement, passed, tokens / seconds, flops)


# SAE training -----------------------------------------------------------------------------------


def check_sae_training(setup: Setup, steps: int = 30, batch: int = 1024) -> CheckResult:
    from curation.sae.model import SAEConfig, SAETrainer, TopKSAE

    d_in = 256 if setup.device != "cpu" else 64  # the CPU run of the check itself stays short

    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(64, d_in, generator=generator)
    data = torch.randn(steps * batch, 64, generator=generator) @ mixing  # low-rank, so the SAE can learn it

    def curve(device: str) -> tuple[list[float], float]:
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d_in=d_in, expansion_factor=8, k=32), device=device)
        sae.fit_normalizer(data[:4096].to(device))
        trainer = SAETrainer(sae)
        chunks = data.to(device).split(batch)
        return timed(lambda: [trainer.step(chunk)["fvu"] for chunk in chunks], device)

    expected, _ = curve("cpu")
    got, seconds = curve(setup.device)
    gap = max(abs(a - b) for a, b in zip(expected, got, strict=True))
    flops = 6 * 2 * d_in * d_in * 8  # encoder and decoder, forward and backward
    agreement = {"largest FVU gap": gap, "final FVU": got[-1]}
    return CheckResult("SAE training (fp32)", agreement, gap <= 0.02, steps * batch / seconds, flops)


# pruning ----------------------------------------------------------------------------------------


def _importance(setup: Setup, device: str, dtype: torch.dtype, batches):
    from core.models import load_model
    from training.pruning.importance import taylor_importance
    from training.pruning.structures import layout_of

    model = load_model(setup.model_dir, dtype=dtype, device=device)
    return timed(lambda: taylor_importance(model, layout_of(model.config), batches), device), model


def _kept(scores: torch.Tensor, cut: float) -> set[int]:
    flat = scores.flatten()
    keep = flat.numel() - int(flat.numel() * cut)
    return set(flat.topk(keep).indices.tolist())


def check_pruning(setup: Setup) -> CheckResult:
    from core.batching import pad_right

    ids, mask = pad_right(setup.docs[:32], pad_id=1)
    batches = [(ids[start : start + 8], mask[start : start + 8]) for start in range(0, len(ids), 8)]
    (expected, _), _ = _importance(setup, "cpu", torch.float32, batches)
    (got, seconds), model = _importance(setup, setup.device, setup.dtype, batches)

    def overlap(before: torch.Tensor, after: torch.Tensor) -> float:
        kept = _kept(before.float().cpu(), 0.3)
        return len(kept & _kept(after.float().cpu(), 0.3)) / len(kept)

    group_share, channel_share = overlap(expected.groups, got.groups), overlap(expected.channels, got.channels)
    agreement = {"kept KV groups overlap": group_share, "kept MLP channels overlap": channel_share}
    passed = group_share >= 0.95 and channel_share >= 0.95
    flops = flops_per_token(model, training=True)
    return CheckResult("pruning importance", agreement, passed, int(mask.sum()) / seconds, flops)


# teacher ----------------------------------------------------------------------------------------


def _generations(setup: Setup, device: str, dtype: str, prompts: list[list[int]], new_tokens: int):
    from training.distillation.teacher import BatchedGenerator, TeacherConfig

    config = TeacherConfig(model=setup.model_dir, max_new_tokens=new_tokens, dtype=dtype, max_batch_tokens=65536)
    generator = BatchedGenerator(config, device=device)
    generator.generate(prompts[:4])  # warm-up
    return timed(lambda: generator.generate(prompts), device), generator.model


def check_teacher(setup: Setup, rows: int = 48, new_tokens: int = 32) -> CheckResult:
    prompts = [doc[:48] for doc in setup.docs[:rows]]
    dtype = "bfloat16" if setup.dtype == torch.bfloat16 else "float32"
    (expected, _), _ = _generations(setup, "cpu", "float32", prompts, new_tokens)
    (same_dtype, _), _ = _generations(setup, setup.device, "float32", prompts, new_tokens)
    (got, seconds), model = _generations(setup, setup.device, dtype, prompts, new_tokens)
    (on_cpu, _), _ = _generations(setup, "cpu", dtype, prompts, new_tokens)

    def identical(outputs) -> list[bool]:
        return [a.text == b.text for a, b in zip(expected, outputs, strict=True)]

    share = sum(identical(same_dtype)) / rows
    differ = [i for i, same in enumerate(identical(same_dtype)) if not same]
    agreement = {"identical rows (fp32)": share, f"identical rows ({dtype})": sum(identical(got)) / rows,
                 f"CPU {dtype}: identical rows": sum(identical(on_cpu)) / rows}  # fmt: skip
    tokens = sum(len(p) for p in prompts) + sum(g.tokens for g in got)
    detail = f"fp32 rows that differ: {differ[:10]}" if differ else ""
    return CheckResult("teacher (greedy)", agreement, share >= 0.90, tokens / seconds, flops_per_token(model), detail)


# MMLU scoring -----------------------------------------------------------------------------------


def check_mmlu(setup: Setup, questions: int = 96) -> CheckResult:
    """As for encode: the device in fp32 must predict what the CPU in fp32 does, and the device in `dtype`
    (weights in `dtype`, as the evaluate stage loads them) must not flip more predictions than the CPU in
    `dtype` does."""
    from core.models import load_model
    from training.evaluation.likelihood import PackedItem, score_items

    rng = np.random.default_rng(2)
    reference = load_model(setup.model_dir)
    vocab = reference.config.vocab_size
    items = [
        PackedItem(rng.integers(4, vocab, size=int(rng.integers(40, 120))).tolist(),
                   [rng.integers(4, vocab, size=int(rng.integers(1, 6))).tolist() for _ in range(4)])
        for _ in range(questions)
    ]  # fmt: skip
    expected = score_items(reference, items, pad_id=1).argmax(axis=1)

    def same(device: str, dtype: torch.dtype) -> float:
        predicted = score_items(load_model(setup.model_dir, dtype=dtype, device=device), items, pad_id=1).argmax(axis=1)
        return float((expected == predicted).mean())

    exact, on_cpu = same(setup.device, torch.float32), same("cpu", setup.dtype)
    candidate = load_model(setup.model_dir, dtype=setup.dtype, device=setup.device)
    got, seconds = timed(lambda: score_items(candidate, items, pad_id=1).argmax(axis=1), setup.device)
    rounded = float((expected == got).mean())
    name = str(setup.dtype).removeprefix("torch.")
    agreement = {"identical fp32": exact, f"identical {name}": rounded, f"CPU {name}: identical": on_cpu}
    tokens = sum(item.length for item in items)
    passed = exact >= 0.98 and rounded >= on_cpu - 0.03
    return CheckResult("MMLU scoring", agreement, passed, tokens / seconds, flops_per_token(candidate))


# training step ----------------------------------------------------------------------------------


def _loss_curve(setup: Setup, device: str, autocast: torch.dtype | None, batches) -> tuple[list[float], object, float]:
    """The loss per step, the model, and the seconds that steps 2.. took (the load and the first step, with
    its kernel choices and optimizer state allocation, not counted)."""
    from core.models import load_model
    from training.finetuning.losses import causal_lm_loss

    torch.manual_seed(0)
    model = load_model(setup.model_dir, device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses, started = [], 0.0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        with torch.autocast(device.split(":")[0], dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss, _ = causal_lm_loss(logits, ids.masked_fill(mask == 0, -100))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step
        started = started or time.perf_counter()
    return losses, model, time.perf_counter() - started


def check_training(setup: Setup, steps: int = 8) -> CheckResult:
    from core.batching import pad_right

    ids, mask = pad_right(setup.docs[: steps * 4], pad_id=1)
    batches = [(ids[i : i + 4], mask[i : i + 4]) for i in range(0, steps * 4, 4)]
    expected, _, _ = _loss_curve(setup, "cpu", None, batches)
    autocast = setup.dtype if setup.dtype != torch.float32 else None
    got, model, seconds = _loss_curve(setup, setup.device, autocast, batches)
    gap = max(abs(a - b) / abs(a) for a, b in zip(expected, got, strict=True))
    flops = flops_per_token(model, training=True)
    tokens = int(mask[4:].sum())  # steps 2..
    return CheckResult("training step", {"largest relative loss gap": gap}, gap <= 0.02, tokens / seconds, flops)


CHECKS = {
    "encode": check_encode,
    "sae": check_sae_training,
    "prune": check_pruning,
    "teacher": check_teacher,
    "mmlu": check_mmlu,
    "train": check_training,
}


def run_core_checks(
    shape: str, device: str, dtype: torch.dtype, docs: int, only: list[str], cpu_rounding: bool = True
) -> list[CheckResult]:
    """Every check of `only` on a model of `shape`, the candidate on `device` in `dtype`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must mean fp32 on both sides
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_model_dir(Path(work), shape)
        vocab = SHAPES[shape]["vocab_size"]
        corpus, topics = synthetic_corpus(vocab, docs)
        layer = SHAPES[shape]["num_hidden_layers"] // 2
        setup = Setup(model_dir, layer, corpus, topics, device, dtype, cpu_rounding)
        return [_run_check(name, setup) for name in only]


def _run_check(name: str, setup: Setup) -> CheckResult:
    """One check; one that raises is reported as failed, with its error, and the others still run (on a
    first run on new hardware, one broken path must not hide what the rest measure)."""
    try:
        return CHECKS[name](setup)
    except Exception as error:  # noqa: BLE001 - reported in the results, with the traceback on stderr
        traceback.print_exc()
        if setup.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return CheckResult(name, {}, False, float("nan"), 0.0, f"raised {type(error).__name__}: {error}"[:300])


def format_results(results: list[CheckResult], peak: float | None) -> list[str]:
    lines = [f"{'check':<22} {'agreement':<58} {'tokens/s':>12} {'MFU':>7}  result"]
    for result in results:
        agreement = ", ".join(f"{name} {value:.4f}" for name, value in result.agreement.items())
        mfu = result.mfu(peak)
        mfu_text = f"{100 * mfu:6.2f}%" if mfu is not None and math.isfinite(mfu) else "    n/a"
        verdict = "PASS" if result.passed else "FAIL"
        lines.append(f"{result.name:<22} {agreement:<58} {result.tokens_per_s:>12,.0f} {mfu_text}  {verdict}")
        if result.detail:
            lines.append(f"{'':<22} {result.detail}")
    return lines


def as_dict(result: CheckResult, peak: float | None) -> dict:
    return {**dataclasses.asdict(result), "mfu": result.mfu(peak)}
