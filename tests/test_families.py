"""Every stage's model code on a tiny checkpoint of every family users bring (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3 text, Phi-3): the truncated forward curation and SAE training read, the teacher's batched
decoding, the fine-tuning worker's step under DeepSpeed, and the evaluation task's packed scoring. Pruning
runs on every family in tests/training/test_prune.py; the stages' Ray wiring is the same for any model and
is tested on the tiny Llama elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_TEXTS

from core.models import load_tokenizer
from tests.training.pruning_models import FAMILIES, save_family_model

pytestmark = pytest.mark.timeout(300)


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer, the kind these families ship: transformers loads a Qwen2 checkpoint's
    tokenizer as its own class, which reads a BPE tokenizer.json (and not a word-level one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|s|>", "<|/s|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator([*TINY_TEXTS, " ".join(f"w{i}" for i in range(200))], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", bos_token="<|s|>",
                                   eos_token="<|/s|>")  # fmt: skip


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    tokenizer = byte_level_tokenizer()
    return {family: save_family_model(family, tokenizer, root / family) for family in FAMILIES}


def _full_hidden(model_dir: str, ids: list[list[int]], layer: int) -> list[torch.Tensor]:
    """Each document's hidden states after block `layer`, from a plain full forward, one document at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([row]), output_hidden_states=True).hidden_states[layer + 1][0] for row in ids]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_truncated_forward_and_the_sae_read_every_family(family, family_dirs, one_torch_thread):
    """Curation and SAE training read block `layer`'s output through the truncated forward, batched and padded:
    it equals a full forward's hidden state there, document by document, and an SAE trains on it."""
    from curation.encode import DocumentEncoder, EncoderSettings
    from curation.sae.model import SAEConfig, train_sae

    settings = EncoderSettings(model=family_dirs[family], sae_dir=None, layer=1, skip_positions=0)
    encoder = DocumentEncoder(settings)
    ids = [encoder.tokenizer(text, add_special_tokens=False)["input_ids"] for text in TINY_TEXTS]
    expected = _full_hidden(family_dirs[family], ids, layer=1)
    batched = {tuple(rows): (hidden, mask) for rows, hidden, mask in encoder.hidden_batches(ids)}
    for rows, (hidden, mask) in batched.items():
        for position, row in enumerate(rows):
            got = hidden[position][mask[position].bool()]
            torch.testing.assert_close(got, expected[row], atol=1e-4, rtol=1e-4)
    activations = encoder.activations(ids)
    sae, summary = train_sae([activations] * 4, SAEConfig(d_in=activations.shape[1], expansion_factor=2, k=4),
                             normalizer_tokens=8, log_every=2)  # fmt: skip
    assert summary["steps"] == 4 and all(torch.isfinite(p).all() for p in sae.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_teachers_batched_decoding_equals_lone_generate_on_every_family(family, family_dirs, one_torch_thread):
    """Distillation's teacher decodes rows of different lengths together in its slot cache; each row must be
    what `generate` writes for that prompt alone."""
    from training.distillation.teacher import BatchedGenerator, TeacherConfig

    generator = BatchedGenerator(TeacherConfig(model=family_dirs[family], max_new_tokens=6, batch_size=4))
    words = " ".join(TINY_TEXTS).split()
    prompts = [generator.tokenizer(" ".join(words[i : i + 2 + (5 * i) % 9])).input_ids for i in range(6)]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            output = generator.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generator.generation_config
            )
        expected.append(generator.finish(output[0, len(prompt) :].tolist()))
    assert generator.generate(prompts) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_the_evaluation_task_scores_every_family_as_separate_forwards_do(family, family_dirs, one_torch_thread):
    """Evaluation packs a question's four choices into one row with a 4-D mask; each choice's log-likelihood
    must equal that of a plain forward of context plus choice (the packing must hold for every family's
    attention: sliding windows, softcapping, per-head norms)."""
    from training.evaluation.evaluate import ModelTask, evaluate_model

    context = "the heart pumps blood and"
    choices = [" cells divide", " kings and empires", " w7 w8", " the cat sat on the mat"]
    task = ModelTask(label=family, model=family_dirs[family], contexts={0: [context]}, choices=[choices],
                     documents={"d": [" ".join(TINY_TEXTS)]}, max_tokens=64, window=16, stride=8,
                     max_batch_tokens=512, dtype="float32", device="cpu", threads=1)  # fmt: skip
    result = evaluate_model(task)
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(family_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    for index, choice in enumerate(choices):
        choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + choice_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:][-len(choice_ids) :]
        expected = logprobs[-len(choice_ids) :].gather(1, targets[:, None]).sum().item()
        assert result["mmlu"][0]["logprob"][0][index] == pytest.approx(expected, abs=1e-3)
    assert result["ppl"]["d"]["tokens"].sum() > 0 and torch.isfinite(torch.tensor(result["ppl"]["d"]["nll"])).all()


TRAIN_PROBE = r"""
import json, os, sys
import torch
import deepspeed  # noqa: F401
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # one rank: no collective to speed up
from core.storage import StorageOptions
from training.finetuning import worker
from training.finetuning.config import FinetuneConfig, LoopConfig
from training.finetuning.sft_data import Example, collate, encode_example
from training.finetuning.step_clock import StepClock

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
losses = {}
for family, model_dir in json.loads(sys.argv[1]).items():
    config = FinetuneConfig(model=model_dir, data="unused.parquet", out="unused", zero_stage=2, threads=1,
                            micro_batch=2, lr=1e-2, warmup_steps=0, lora_r=4 if family == "phi3" else 0)
    loop = LoopConfig(config, model_dir, None, 4, StorageOptions(), "")
    model, tokenizer = worker._build_model(loop)
    engine = worker._build_engine(model, loop, 1)
    rows = [("the heart pumps", " blood and cells divide"), ("prime numbers and", " the proof of a theorem")]
    batch = collate([Example(*encode_example(tokenizer, p, r, 32)) for p, r in rows], tokenizer.pad_token_id)
    losses[family] = [float(worker._train_step(engine, None, [batch], loop, StepClock())[0]) for _ in range(4)]
    if family == "phi3":  # LoRA's default targets reach the fused projections
        adapted = sorted({name.split(".")[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")})
        losses["phi3_adapted"] = adapted
print("LOSSES " + json.dumps(losses))
"""


def test_the_fine_tuning_worker_trains_every_family_under_deepspeed(family_dirs, tmp_path):
    """The fine-tuning worker's own model build, DeepSpeed engine (ZeRO-2, gloo, one rank) and step on each
    family: the loss falls over four steps on the same batch (Phi-3 with LoRA, whose q/k/v live in one fused
    projection)."""
    from conftest import free_port

    script = tmp_path / "probe.py"
    script.write_text(TRAIN_PROBE)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), json.dumps(family_dirs), str(free_port())], env=env,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("LOSSES ")]
    assert lines, done.stderr[-4000:]
    losses = json.loads(lines[-1][len("LOSSES ") :])
    assert losses.pop("phi3_adapted") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert set(losses) == set(FAMILIES)
    for family, curve in losses.items():
        assert all(map(lambda value: value == value and abs(value) < 1e6, curve)), (family, curve)
        assert curve[-1] < curve[0], (family, curve)
