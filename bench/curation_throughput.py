"""Tokens per second of the curation encode stage, against its floor and against the naive path.

Measured in one process, on real Wikipedia summaries from the demo corpus:

- **encode**: `DocumentEncoder.encode` with a Top-K SAE (truncated forward, input coordinates, SAE, pooling),
  length-batched as the library does (timed per micro-batch: `encode` on the documents of one
  `length_batches` group over the whole sample, which its own length batching leaves whole);
- **floor**: the bare `TruncatedForward` on exactly the same micro-batches, already padded, nothing else;
- **naive**: the full model (loaded separately, not truncated) at batch size 1 with
  `output_hidden_states=True`, taking `hidden_states[layer + 1]` and mean-pooling it;
- **encode bf16**: the same `encode` with the truncated forward's matmuls in bfloat16 (`--dtype bfloat16`
  of the jobs: bf16 autocast over float32 weights on a CPU); its target is >= 2x the fp32 floor, with every
  document's vector within cosine 0.99 of the fp32 one and the per-seed top-10 selections (the demo seeds,
  over the sampled documents) overlapping >= 95%;
  `--emulate-bf16`, on a CPU without native bf16 (where bf16 kernels are emulated and far too slow for a
  large sample), measures the agreement alone, with CPU bf16 autocast emulated in float32 (`EmulatedBF16`):
  the inputs and outputs of the ops autocast runs in bf16 are rounded to bf16 around a float32 kernel;
  `--untimed-bf16` measures the agreement alone too, but on autocast's own bf16 kernels (on such a CPU,
  oneDNN's emulation: about 6x slower than float32 on an AVX2 EPYC, 13 minutes for the 1,000 documents);
- **fixed-32** (for information): the truncated forward on fixed batches of 32 documents in sample order,
  each padded to its longest document, to show what length bucketing buys.

Only real tokens count, never padding. Each method is timed in units (a micro-batch, or one document for
the naive path), the methods interleaved unit by unit, over several rounds after a warm-up
(`bench.measure.best_of_rounds`). A method's tokens/s is its tokens over the sum of each unit's fastest
round: on a shared machine, noise only ever adds time, and per-unit minima shed it far better than a best
whole round. The median round is shown as well.
Targets: encode >= 0.85 x floor and >= 2 x naive. This is a benchmark, not a test; absolute numbers on a
shared machine mean little, the ratios are the point.

The defaults (48 documents, 8 for the naive path) keep a run within about 5 minutes on a 2-core machine.
The curation job encodes 256 documents per call (`CurateConfig.batch_size`), where length bucketing has
more rows to sort and pads less: pass `--docs 256` for numbers representative of the pipeline.

    .venv/bin/python -m bench.curation_throughput
    .venv/bin/python -m bench.curation_throughput --docs 256 --naive-docs 48 --json /tmp/throughput.json
    .venv/bin/python -m bench.curation_throughput --docs 1000 --repeats 1 --sae runs/demo/sae --emulate-bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bench.measure import Rounds, bench_parser, best_of_rounds, settings_of, write_json
from core.batching import length_batches, pad_right, tokenize_texts
from core.models import DEFAULT_MODEL, load_model, model_info
from core.placement import bf16_matmul_speedup
from curation.demo_corpus import load_summaries
from curation.encode import DocumentEncoder, EncoderSettings, mean_pool, pooling_mask
from curation.sae.model import SAEConfig, TopKSAE

NAME = "curation_throughput"
TARGET_VS_FLOOR = 0.85
TARGET_VS_NAIVE = 2.0
TARGET_BF16 = 2.0  # bf16 encode against the fp32 floor
TARGET_COSINE = 0.99  # every document's bf16 vector against its fp32 one
TARGET_OVERLAP = 0.95  # per-seed top-N selections, bf16 against fp32
SELECT_TOP = 10
FIXED_BATCH_SIZE = 32
SAMPLE_SEED = 0
WARMUP_DOCS = 8
NORMALIZER_DOCS = 16

PaddedBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Method:
    """One way of encoding a fixed set of documents, as timed units (a micro-batch, or one document)."""

    name: str
    units: list[Callable[[], object]]
    unit_tokens: list[int]
    """Real (unpadded) tokens of each unit."""
    docs: int
    timing: Rounds | None = None
    """Its rounds, once timed (`run_rounds`)."""

    @property
    def tokens(self) -> int:
        return sum(self.unit_tokens)

    @property
    def round_seconds(self) -> list[float]:
        return self.timing.round_seconds()

    @property
    def best_tokens_per_s(self) -> float:
        """Tokens / the sum over units of each unit's fastest round: noise on a shared machine only adds time."""
        return self.tokens / self.timing.best()

    @property
    def median_tokens_per_s(self) -> float:
        return self.tokens / self.timing.median()


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name, HF directory or .gguf file")
    parser.add_argument("--layer", type=int, default=15, help="decoder layer read (ignored when --sae sets one)")
    parser.add_argument("--docs", type=int, default=48, help="documents sampled from the demo corpus")
    parser.add_argument("--max-tokens", type=int, default=256, help="each document is cut to this many tokens")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="rows x longest row per micro-batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--sae", default=None, help="SAE directory; default: a fresh TopKSAE(d_in=96, k=32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method, after one warm-up")
    parser.add_argument("--naive-docs", type=int, default=8, help="documents for the (slow) naive path")
    bf16 = parser.add_mutually_exclusive_group()  # how the bf16 encode runs, if at all
    bf16.add_argument("--no-bf16", action="store_true", help="skip the bf16 encode and its agreement")
    bf16.add_argument("--emulate-bf16", action="store_true", help="bf16 agreement only, bf16 emulated in fp32")
    bf16.add_argument("--untimed-bf16", action="store_true", help="bf16 agreement only, autocast's own kernels")
    return parser


def parse_args() -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args()
    for name in ("docs", "max_tokens", "max_batch_tokens", "threads", "repeats", "naive_docs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_batch_tokens < args.max_tokens:
        parser.error(f"--max-batch-tokens={args.max_batch_tokens} must be >= --max-tokens={args.max_tokens}")
    return args


def build_sae(args: argparse.Namespace) -> TopKSAE:
    """The SAE from --sae, or a fresh one over 96 fixed random coordinates (normaliser fitted later)."""
    if args.sae is not None:
        return TopKSAE.load(args.sae)
    hidden_size = model_info(args.model).hidden_size
    coords = sorted(random.Random(SAMPLE_SEED).sample(range(hidden_size), 96))
    torch.manual_seed(SAMPLE_SEED)
    return TopKSAE(SAEConfig(d_in=96, k=32, layer=args.layer, coords=coords))


def sample_documents(tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    """A fixed-seed sample of demo-corpus summaries as token lists (empty ones dropped)."""
    rows = load_summaries()
    texts = [row["text"] for row in random.Random(SAMPLE_SEED).sample(rows, min(count, len(rows)))]
    return [tokens for tokens in tokenize_texts(tokenizer, texts, max_tokens) if tokens]


def pad_groups(token_lists: Sequence[Sequence[int]], groups: list[list[int]], pad_id: int) -> list[PaddedBatch]:
    return [pad_right([token_lists[row] for row in rows], pad_id) for rows in groups]


def fixed_groups(count: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def padding_efficiency(token_lists: Sequence[Sequence[int]], groups: list[list[int]]) -> float:
    """Real tokens / tokens the forward actually runs on (rows x longest row, summed over micro-batches)."""
    real = sum(len(tokens) for tokens in token_lists)
    padded = sum(len(rows) * max(len(token_lists[row]) for row in rows) for rows in groups)
    return real / padded


@torch.inference_mode()
def naive_encode(full_model: nn.Module, token_lists: Sequence[Sequence[int]], layer: int, skip: int) -> torch.Tensor:
    """What one writes without thinking: whole model, one document at a time, keep one hidden state."""
    vectors = []
    for tokens in token_lists:
        ids, attention = pad_right([tokens], pad_id=0)
        hidden = full_model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        vectors.append(mean_pool(hidden[layer + 1], pooling_mask(attention, skip)))
    return torch.cat(vectors)


def whole_micro_batches(token_lists: list[list[int]], groups: list[list[int]], max_batch_tokens: int):
    """The documents of each micro-batch, checked to stay one micro-batch when `encode` batches them again."""
    group_docs = [[token_lists[row] for row in rows] for rows in groups]
    for docs in group_docs:
        if len(length_batches([len(tokens) for tokens in docs], max_batch_tokens)) != 1:
            raise RuntimeError("length_batches split one of its own micro-batches; the encode units would differ")
    return group_docs


def make_methods(
    encoder: DocumentEncoder,
    full_model: nn.Module,
    token_lists: list[list[int]],
    naive_lists: list[list[int]],
    bf16: DocumentEncoder | None = None,
) -> list[Method]:
    """The four measured methods on one document set, and the bf16 encode when given; padded batches are
    built here, outside the timing.

    The encode units are `encoder.encode` on the documents of one micro-batch of `length_batches` over the
    whole set, so that its own length batching cuts them into exactly the micro-batch the floor runs.
    """
    lengths = [len(tokens) for tokens in token_lists]
    groups = length_batches(lengths, encoder.spec.max_batch_tokens)
    fixed = fixed_groups(len(token_lists), FIXED_BATCH_SIZE)
    group_docs = whole_micro_batches(token_lists, groups, encoder.spec.max_batch_tokens)

    def forward(batch: PaddedBatch) -> Callable[[], object]:
        return lambda: encoder.forward(*batch)

    def group_tokens(row_groups: list[list[int]]) -> list[int]:
        return [sum(lengths[row] for row in rows) for rows in row_groups]

    def encode(name: str, chosen: DocumentEncoder) -> Method:
        units = [lambda docs=docs: chosen.encode(docs) for docs in group_docs]
        return Method(name, units, group_tokens(groups), len(token_lists))

    layer, skip = encoder.forward.layer, encoder.spec.skip_positions
    methods = [
        encode("encode (SAE, length-bucketed)", encoder),
        Method(
            "floor (truncated fwd, same batches)",
            [forward(batch) for batch in pad_groups(token_lists, groups, encoder.pad_id)],
            group_tokens(groups),
            len(token_lists),
        ),
        Method(
            "naive (full fwd, bs=1, hidden_states)",
            [lambda doc=doc: naive_encode(full_model, [doc], layer, skip) for doc in naive_lists],
            [len(doc) for doc in naive_lists],
            len(naive_lists),
        ),
        Method(
            f"truncated fwd, fixed batches of {FIXED_BATCH_SIZE}",
            [forward(batch) for batch in pad_groups(token_lists, fixed, encoder.pad_id)],
            group_tokens(fixed),
            len(token_lists),
        ),
    ]
    return methods if bf16 is None else [*methods, encode("encode bf16 (SAE, length-bucketed)", bf16)]


class EmulatedBF16(TorchFunctionMode):
    """CPU bf16 autocast, emulated in float32: the ops autocast runs in bf16 (matmuls, linear layers, attention)
    get their floating inputs rounded to bf16 and return bf16, computed by the float32 kernel. bf16 products
    are exact in float32 and native kernels accumulate in float32 too, so what differs is the order of the
    sums: the same kind of error, not the same bits."""

    LOW_PRECISION = frozenset({F.linear, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm,
                               torch.addmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__})  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.LOW_PRECISION:
            return func(*args, **kwargs)
        args = [bf16_round(value) for value in args]
        return func(*args, **{key: bf16_round(value) for key, value in kwargs.items()}).bfloat16()


def bf16_round(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.bfloat16().float()
    return value


class EmulatedBF16Encoder(DocumentEncoder):
    """A float32 `DocumentEncoder` whose forward runs under `EmulatedBF16` wherever the bf16 one would run under
    autocast (`spec.bf16_min_tokens` included)."""

    def matmul_precision(self, shortest: int) -> AbstractContextManager:
        return EmulatedBF16() if shortest >= self.spec.bf16_min_tokens else nullcontext()


def bf16_agreement(fp32: DocumentEncoder, bf16: DocumentEncoder, token_lists: list[list[int]]) -> dict:
    """Per-document cosine of the bf16 vectors to the fp32 ones, and the overlap of the per-seed top-10
    selections (the demo seeds) that each set of vectors makes over these documents. The seeds are encoded
    in fp32 for both, as `jobs.curate` does."""
    from core.storage import StorageOptions
    from curation.seeds import load_seeds

    seeds = load_seeds("jobs/seeds/demo.jsonl", StorageOptions())
    seed_lists = tokenize_texts(fp32.tokenizer, seeds.texts, max(len(tokens) for tokens in token_lists))
    seed_vectors = fp32.encode(seed_lists)
    chosen = {}
    vectors = {}
    for name, encoder in (("fp32", fp32), ("bf16", bf16)):
        vectors[name] = encoder.encode(token_lists)
        sims = vectors[name] @ seed_vectors.T  # (docs, seeds)
        top = min(SELECT_TOP, sims.shape[0])
        chosen[name] = {int(row) for column in sims.T for row in column.topk(top).indices}
    cosines = (vectors["fp32"] * vectors["bf16"]).sum(dim=1)
    overlap = len(chosen["fp32"] & chosen["bf16"]) / max(len(chosen["fp32"]), 1)
    return {
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
        "docs_below_0.99": int((cosines < TARGET_COSINE).sum()),
        "selection_overlap": overlap,
        "selected": len(chosen["fp32"]),
    }


def time_methods(methods: list[Method], repeats: int) -> None:
    """Time every unit of every method once per round, the methods interleaved unit by unit and their order
    rotating at every step (`bench.measure.best_of_rounds`), printing each round's totals."""

    def after_round(index: int, timings: dict[str, Rounds]) -> None:
        totals = ", ".join(f"{timings[method.name].round_seconds()[-1]:.1f}s" for method in methods)
        print(f"  round {index + 1}/{repeats}: {totals}", flush=True)

    timings = best_of_rounds({m.name: m.units for m in methods}, repeats, rotate=True, after_round=after_round)
    for method in methods:
        method.timing = timings[method.name]


@torch.inference_mode()
def truncation_error(encoder: DocumentEncoder, full_model: nn.Module, tokens: list[int]) -> float:
    """Max |truncated forward - full forward's hidden_states[layer + 1]| on one document (should be ~0)."""
    ids, attention = pad_right([tokens], encoder.pad_id)
    truncated = encoder.forward(ids, attention)
    full = full_model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
    return (truncated - full[encoder.forward.layer + 1]).abs().max().item()


def busy_note(threads: int) -> str | None:
    """A warning when other processes already load the CPUs, which makes every number here noisy."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load < 0.5:
        return None
    note = f"note: 1-min load average {load:.1f} on {cpus} CPUs before start: other processes share them"
    if threads == 1:
        return note + "; the numbers are noisy, rerun when the machine is idle."
    return note + (
        f". With --threads {threads} above the idle cores, small batches (the naive path most) slow down far "
        "more than large ones; compare with --threads 1."
    )


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report_bf16(bf16: Method | None, floor: Method, agreement: dict) -> tuple[dict, dict]:
    """The speed-up (None when bf16 was not timed: then only the agreement means anything) and the agreement,
    as (figures, ratios)."""
    speedup = None if bf16 is None else bf16.best_tokens_per_s / floor.best_tokens_per_s
    cosine_ok = agreement["cosine_min"] >= TARGET_COSINE
    overlap_ok = agreement["selection_overlap"] >= TARGET_OVERLAP
    ceiling = None
    if speedup is None:
        print("bf16 agreement only, no speed (--emulate-bf16 or --untimed-bf16)")
    else:
        print(f"bf16 encode / fp32 floor = {speedup:.2f}  (target >= {TARGET_BF16}) {mark(speedup >= TARGET_BF16)}")
        # The hardware's own ratio bounds the encode's: a CPU whose bf16 matmuls are no faster than fp32's
        # (a bf16 flag without AMX, say) cannot meet the target, and `--dtype auto` runs fp32 there.
        ceiling = bf16_matmul_speedup()
        print(f"bf16 / fp32 matmul on this CPU = {ceiling:.2f}  (what `--dtype auto` decides by)")
    print(
        f"bf16 vs fp32 vectors: cosine min {agreement['cosine_min']:.4f}, mean {agreement['cosine_mean']:.4f} "
        f"(target min >= {TARGET_COSINE}) {mark(cosine_ok)}; per-seed top-{SELECT_TOP} overlap "
        f"{agreement['selection_overlap']:.3f} of {agreement['selected']} (target >= {TARGET_OVERLAP}) "
        f"{mark(overlap_ok)}"
    )
    figures = {
        "bf16_agreement": agreement,
        "bf16_pass": {
            "speedup": None if speedup is None else speedup >= TARGET_BF16,
            "cosine": cosine_ok,
            "overlap": overlap_ok,
        },
    }
    return figures, {"bf16 encode / fp32 floor": speedup, "bf16 / fp32 matmul": ceiling}


def report(methods: list[Method], efficiency: dict[str, float]) -> tuple[dict, dict]:
    """Print the table and the ratios against the targets; return (figures, ratios)."""
    encode, floor, naive, fixed = methods[:4]
    header = f"{'method':<40} {'docs':>5} {'tokens':>7} {'best tok/s':>11} {'median tok/s':>13} {'x floor':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for method in methods:
        ratio = method.best_tokens_per_s / floor.best_tokens_per_s
        print(
            f"{method.name:<40} {method.docs:>5} {method.tokens:>7} {method.best_tokens_per_s:>11.0f} "
            f"{method.median_tokens_per_s:>13.0f} {ratio:>8.2f}"
        )
    vs_floor = encode.best_tokens_per_s / floor.best_tokens_per_s
    vs_naive = encode.best_tokens_per_s / naive.best_tokens_per_s
    bucketing_gain = floor.best_tokens_per_s / fixed.best_tokens_per_s
    print()
    print(f"encode / floor  = {vs_floor:.3f}  (target >= {TARGET_VS_FLOOR})  {mark(vs_floor >= TARGET_VS_FLOOR)}")
    print(f"encode / naive  = {vs_naive:.2f}   (target >= {TARGET_VS_NAIVE})   {mark(vs_naive >= TARGET_VS_NAIVE)}")
    print(
        f"padding efficiency (real / padded tokens): length-bucketed {efficiency['bucketed']:.3f}, "
        f"fixed batches of {FIXED_BATCH_SIZE} {efficiency['fixed']:.3f}; bucketing speed-up {bucketing_gain:.2f}x"
    )
    figures = {
        "methods": {
            m.name: {
                "docs": m.docs,
                "tokens": m.tokens,
                "round_seconds": m.round_seconds,
                "best_tokens_per_s": m.best_tokens_per_s,
                "median_tokens_per_s": m.median_tokens_per_s,
            }
            for m in methods
        },
        "padding_efficiency": efficiency,
        "pass": {"vs_floor": vs_floor >= TARGET_VS_FLOOR, "vs_naive": vs_naive >= TARGET_VS_NAIVE},
    }
    ratios = {"encode / floor": vs_floor, "encode / naive": vs_naive, "bucketing speed-up": bucketing_gain}
    return figures, ratios


def build_encoders(args: argparse.Namespace) -> tuple[TopKSAE, DocumentEncoder, DocumentEncoder | None]:
    """The SAE, the fp32 encoder over it, and the bf16 one (None with --no-bf16; emulated with --emulate-bf16)."""
    sae = build_sae(args)
    layer = sae.cfg.layer if args.sae is not None and sae.cfg.layer >= 0 else args.layer
    spec = EncoderSettings(
        model=args.model,
        sae_dir=None,
        layer=layer,
        coords=sae.cfg.coords or None,
        skip_positions=sae.cfg.skip_positions,
        max_batch_tokens=args.max_batch_tokens,
        threads=args.threads,
    )
    bf16 = None
    if not args.no_bf16:
        bf16_spec = dataclasses.replace(spec, dtype="bfloat16")
        bf16 = EmulatedBF16Encoder(spec, sae=sae) if args.emulate_bf16 else DocumentEncoder(bf16_spec, sae=sae)
    return sae, DocumentEncoder(spec, sae=sae), bf16


def prepare(args: argparse.Namespace, sae: TopKSAE, encoder: DocumentEncoder) -> list[list[int]]:
    """The sampled documents; a fresh SAE's normaliser fitted on them. Prints what is measured."""
    token_lists = sample_documents(encoder.tokenizer, args.docs, args.max_tokens)
    if args.sae is None:
        # A realistic normaliser: fitted on real activations of this layer and these coordinates.
        sae.fit_normalizer(encoder.activations(token_lists[:NORMALIZER_DOCS]))
    lengths = [len(tokens) for tokens in token_lists]
    print(
        f"model={args.model} layer={encoder.forward.layer} threads={torch.get_num_threads()} docs={len(token_lists)} "
        f"tokens={sum(lengths)} (mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}) "
        f"sae: d_in={sae.cfg.d_in} latents={sae.cfg.num_latents} k={sae.cfg.k}"
    )
    return token_lists


def main() -> None:
    args = parse_args()
    note = busy_note(args.threads)
    torch.set_num_threads(args.threads)
    sae, encoder, bf16 = build_encoders(args)
    # An emulated speed means nothing: time bf16 only where the kernels may be native.
    timed_bf16 = None if args.emulate_bf16 or args.untimed_bf16 else bf16
    full_model = load_model(args.model)
    token_lists = prepare(args, sae, encoder)
    naive_lists = token_lists[: args.naive_docs]
    if note is not None:
        print(note)
    layer = encoder.forward.layer
    error = truncation_error(encoder, full_model, token_lists[0])
    print(f"max |truncated - full hidden_states[{layer + 1}]| on one document: {error:.2e}")

    print("warm-up")
    time_methods(make_methods(encoder, full_model, token_lists[:WARMUP_DOCS], naive_lists[:2], timed_bf16), repeats=1)
    print("timed rounds")
    methods = make_methods(encoder, full_model, token_lists, naive_lists, timed_bf16)
    time_methods(methods, args.repeats)
    lengths = [len(tokens) for tokens in token_lists]
    efficiency = {
        "bucketed": padding_efficiency(token_lists, length_batches(lengths, args.max_batch_tokens)),
        "fixed": padding_efficiency(token_lists, fixed_groups(len(token_lists), FIXED_BATCH_SIZE)),
    }
    figures, ratios = report(methods, efficiency)
    figures = {"layer": layer, "truncation_error": error, "busy_note": note, **figures}
    if bf16 is not None:
        agreement = bf16_agreement(encoder, bf16, token_lists)
        bf16_figures, bf16_ratios = report_bf16(None if timed_bf16 is None else methods[4], methods[1], agreement)
        figures, ratios = {**figures, **bf16_figures}, {**ratios, **bf16_ratios}
    if args.json is not None:
        write_json(args.json, NAME, settings_of(args), figures, ratios)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
