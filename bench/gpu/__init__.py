"""Checks for a machine with a GPU: `python -m bench.gpu.check` (each stage's core, or the whole pipeline,
against the CPU in fp32), `python -m bench.gpu.encode` (the encode path's attention kernels and micro-batch
size) and `python -m bench.gpu.teacher_check` (the vLLM teacher).

`bench.gpu.check`'s core mode and `bench.gpu.cores` import no Ray, DeepSpeed or vLLM: a lent GPU machine may
have only torch and transformers. Nothing in this package imports them at module level.
"""
