"""The replication: does a pruned model recover more on FineScope-curated data than on other curators' data,
on random data, and how far is it from the oracle's?

One spec (:class:`ReplicationSpec`, YAML) names the domains of the packaged labelled corpus (each with its
`meta.topic`), the documents per arm, the trials, the doses, the pilot ratios and the ablations. The graph,
every step cached and resumable like the pipeline's (`ROOT/pipeline.json`), so it may be run in parts:

    holdout -> arm/calibration -> prune/<ratio> ---------------------------------------------.
            -> sae/tN -> curate/tN ---> arm/D/finescope-tN --.                                |
            -> rank/{bm25,minilm,dense} -> arm/D/<m>-tN -----+-> union/D/tN -> distill/D/tN -+-> train/D/<arm>
            -> arm/D/{oracle,topic25,topic50}-tN ------------'                          |    |   -> finetune/D/<arm>
            -> arm/D/oracle-t<first> -> union/pilot/D -> distill/pilot/D ---------------+    |
            -> arm/D/random-tN -> union/random/tN -> distill/random/tN ------------------+-> train/random-tN
                                                                                             -> finetune/random-tN
    finetune/* -> evaluate/D/tN/{domain,general}, evaluate/D/reference/{domain,general},
                  evaluate/pilot/r<ratio>/D -> ROOT/replication.md

A part is one trial of one domain (`--only evaluate/D/tN`; the first trial with `evaluate/D/reference`) or
the pilot (`--only evaluate/pilot`): each needs nothing of another trial, so it runs alone on a fresh
machine in about an hour. A step's cache does not outlast its machine (its key holds its input files'
times); with `ship` set, each run copies what the report reads of every finished step (evaluations'
results.json, arms' selection.json, fine-tunes' manifest.json) to the same path under `ship`, in the
repository, and the report reads each file from ROOT, else from `ship`: it holds every part shipped so far.

- **Held-out sets** are drawn from the labelled corpus before anything else: `general_heldout` documents of
  every topic in proportion (the domains' topics included, at least one each), then per domain `heldout`
  documents of its topic. The pool every arm draws from is the rest (`pool` documents), so no curator
  chose a held-out document and no arm trained on one.
- **One pruned model** (`prune/<ratio>`) for every domain and arm, pruned at `ratio` on `calibration`
  documents drawn at random from the pool (`arm/calibration`, seed `split_seed`): documents no arm favours.
- **Arms**, per domain and trial N, `budget` documents each, fine-tuned once per trial with seed N, the same
  hyper-parameters and the same number of optimizer steps: `finescope-tN` (the curator's best for the
  domain, SAE trained with seed N), `bm25-tN`, `minilm-tN`, `dense-tN` (the alternatives of
  curation/baselines.py, ranked once from the same seeds, so the same documents every trial), `random-tN`
  (a seeded draw from the pool: the same for every domain, so fine-tuned once, `finetune/random-tN`),
  `oracle-tN` (a seeded draw of the pool's documents labelled with the domain's topic) and the doses
  `topic25-tN`, `topic50-tN` (that share of the trial's oracle draw, the rest off-topic documents of its
  random draw). References: the base and pruned models, the unpruned model fine-tuned on FineScope's
  trial-0 data (`unpruned`), and the pruned model fine-tuned on its raw text instead of the teacher's
  rewrites (`undistilled`). `spec.arm_labels` lists the domain evaluations' labels in the report's order.
- **Evaluations**, per domain and held-out set: each trial's (`pruned` and the trial's arms) and the
  references' (`base`, `pruned`, `unpruned`, `undistilled`), merged by the report into one evaluation of
  every model; the domain-set ones score the continuation task too. Every part prunes the base model again,
  so the report checks that the parts' pruned models agree (`pruned_agreement`) and says so where they don't.
- **selection.json**: beside its rows (`ROOT/arms/D/<label>/`), each arm writes `{"arm", "domain", "trial",
  "docs", "on_topic", "oracle_overlap"}`: the share of its documents labelled with the domain's topic, and
  the share in that trial's oracle draw.
- **The teacher** rewrites each document once per group, each group within one trial: the trial's random
  draw (`distill/random/tN`), each domain's other arms of the trial (`distill/D/tN`, less the random draw's
  documents), with a pilot each domain's first-trial oracle (`distill/pilot/D`, which the domain's first
  group leaves out), the coordinates ablation's (`distill/coords`, less the first trial's); an arm's rows
  take each rewrite from its group's pass or the one that covers it. Greedy decoding rewrites a document
  the same way whichever arm holds it, and the groups let one trial of one domain run without the others
  (`--only evaluate/mathematics/t1`).
- **Pilot** (`pilot_ratios`): per ratio, `prune/<ratio>` on the same calibration documents, the first
  trial's random arm (`finetune/pilot/r<ratio>/random`) and each domain's oracle
  (`finetune/pilot/r<ratio>/D/oracle`), evaluated as `evaluate/pilot/r<ratio>/D` with labels base, pruned,
  random, oracle; `<ratio>` is written with two decimals (`r0.50`). At `ratio` itself the main
  `random-t<first>` and `oracle-t<first>` fine-tunes serve. The layout's `pilot` maps ratio -> domain ->
  results.json, for the report to pick the ratio where data matters most.
- **Ablations** on one domain, against the same calibration pruning: the pruning ratio (`ablation_ratios`
  with `ratio`) and the SAE's input coordinates (`ablation_coords`: K chosen by the Jacobian on the seeds,
  against all of them), each fine-tuned on FineScope's first-trial documents.

Cost on 2 CPU cores (docs/replication.md, "How to run it", for each part): the pilot about 0.6 h, the first
trial of every domain with the references about 2.0 h, each other trial about 1.7 h; 6 parts, about 9.4
hours when each runs on a fresh machine, most of it the 124 fine-tunes at about 1.6 min each and the
evaluations with the continuation task.

`experiments/replication/report.py` turns the evaluations into the tables, tests and plots; `data.py` holds
the data steps (held-out sets, rankings, arms, their union, each arm's rewrites), `spec.py` the spec,
`graph.py` the graph (built with `pipeline.graph.Graph`, run by `pipeline.runner.run_steps`), `run.py` the job.
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
