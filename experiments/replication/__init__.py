"""The replication: does a pruned model recover more on FineScope-curated data than on random data?

One spec (:class:`ReplicationSpec`, YAML) names the domains of the packaged labelled corpus (each with its
`meta.topic`), the documents per arm, the trials and the two ablations. The graph, every step cached and
resumable like the pipeline's (`ROOT/pipeline.json`), so it may be run in parts:

    holdout -> sae/tN -> curate/tN -> arm/D/finescope-tN --.
            -> arm/D/oracle -------------------------------+-> union/D -> distill/D -> train/<arm> --.
            -> arm/random-tN -----------------------------> union/random -> distill/random -> ...    |
    arm/D/finescope-t0 -> prune/D ------------------------------------------------------------+-> finetune/D/<arm>
    finetune/D/* -> evaluate/D/domain, evaluate/D/general -> ROOT/replication.md

- **Held-out sets** are drawn from the labelled corpus before anything else: per domain `heldout`
  documents of its topic, and `general_heldout` of any topic. The pool every arm draws from is the rest
  (`pool` documents), so no curator chose a held-out document and no arm trained on one.
- **Arms** get `budget` documents each, the same pruned model (pruned on FineScope's trial-0 documents),
  the same hyper-parameters and the same number of optimizer steps: `finescope` (the curator's best for
  the domain), `random` (a seeded draw from the pool, shared by the domains), `oracle` (a seeded draw of
  the pool's documents labelled with the domain's topic: what a perfect curator would pick). Trials
  re-seed the SAE, the random draw and fine-tuning. References: the base and pruned models, the
  unpruned model fine-tuned on FineScope data (`unpruned`), and the pruned model fine-tuned on
  FineScope's raw text instead of the teacher's rewrites (`undistilled`).
- **The teacher** rewrites each document once per group of arms (the random arms; each domain's; the
  coordinates ablation's), since greedy decoding rewrites a document the same way whichever arm holds
  it, and each arm trains on its own rows of its group's rewrites. Groups keep the domains apart, so the
  job runs one domain at a time (`--only evaluate/mathematics`).
- **Ablations** on one domain: the pruning ratio (`ablation_ratios` with `ratio`) and the SAE's input
  coordinates (`ablation_coords`: K chosen by the Jacobian on the seeds, against all of them), each
  fine-tuned the same way.

`experiments/replication/report.py` turns the evaluations into the tables, tests and plots; `data.py` holds
the data steps (held-out sets, arms, their union, each arm's rewrites), `spec.py` the spec, `graph.py`
the graph (built with `pipeline.graph.Graph`, run by `pipeline.runner.run_steps`), `run.py` the job.
"""

from experiments.replication.graph import build_replication
from experiments.replication.run import ReplicationJobConfig, run_replication, run_replication_job
from experiments.replication.spec import ReplicationSpec, arm_labels, load_replication_spec

__all__ = [
    "ReplicationJobConfig",
    "ReplicationSpec",
    "arm_labels",
    "build_replication",
    "load_replication_spec",
    "run_replication",
    "run_replication_job",
]
