"""The whole method as one job: SAE -> curate -> split -> prune -> distill -> fine-tune -> evaluate.

One spec file (YAML, :class:`PipelineSpec`) names the base model, the corpus, the seeds, the domains, the
pruning ratios, the teacher and its backend, and a storage root; each stage's own settings go under its
name (`sae:`, `curate:`, `prune:`, `distill:`, `finetune:`, `evaluate:`) with the same keys as that
stage's job flags. Every config is built and checked before anything runs, so a bad value fails at once
and names `stage.field`.

Steps form a graph, not a chain. Per domain `d` and ratio `r`:

    sae -> curate -> split/d -> prune/d/r ------------------> finetune/d/r --------> evaluate/d
                             -> distill/d ----------------/                     /
                             -> distill-random/d -> finetune-random/d/r -------/

Every graph-shaped job builds its graph with `pipeline.graph.Graph` and runs it with
`pipeline.runner.run_steps`: the pipeline here, and the studies in `experiments/`.

`split/d` cuts the curated rows of `d` into train and held-out by a hash of each row's id (stable as the
corpus grows), and draws the random control: as many corpus documents, none of them curated for `d`,
as the train split has. The held-out rows give the domain perplexity; the control fine-tune (same
budget, random data of the same size) shows what the curation itself is worth.

A step's key hashes its config and the stage hashes of the steps it reads. `ROOT/pipeline.json` records
each finished step's key and its stage's manifest hash; a step whose key and manifest still match is
skipped without loading anything. Any other step is handed to its stage, which skips itself when its
own manifest (config plus input files) still matches, resumes from what it left after a crash
(distillation parts, fine-tuning checkpoints), or redoes it. Changing one stage's setting therefore
reruns that stage and exactly the steps downstream of it.
"""

from pipeline.graph import Graph, Step, step_key
from pipeline.runner import GraphJobConfig, PipelineJobConfig, run_pipeline, run_pipeline_job, run_steps
from pipeline.spec import DomainSpec, PipelineSpec, load_spec
from pipeline.steps import build_steps

__all__ = [
    "DomainSpec",
    "Graph",
    "GraphJobConfig",
    "PipelineJobConfig",
    "PipelineSpec",
    "Step",
    "build_steps",
    "load_spec",
    "run_pipeline",
    "run_pipeline_job",
    "run_steps",
    "step_key",
]
