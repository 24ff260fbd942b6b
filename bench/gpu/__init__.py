"""Checks for a machine with a GPU: `python -m bench.gpu.check` (each stage's core, or the whole pipeline,
against the CPU in fp32), `python -m bench.gpu.encode` (the encode path's attention kernels and micro-batch
size) and `python -m bench.gpu.teacher_check` (the vLLM teacher). At the paper's scale (docs/gpu.md):
`python -m bench.gpu.width` (encode at 1B and 8B width), `bench.gpu.prune_scale` (pruning an 8B model),
`bench.gpu.train_scale` (fine-tuning steps) and `bench.gpu.scale` (all three in one process).

`bench.gpu.check`'s core mode and `bench.gpu.cores` import no Ray, DeepSpeed or vLLM: a lent GPU machine may
have only torch and transformers. Nothing in this package imports them at module level.
"""
