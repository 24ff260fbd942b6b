"""Studies built on the pipeline's graph and runner: the replication of the method's central question
(`experiments/replication/`). Each builds its steps with `pipeline.graph.Graph`, runs them with
`pipeline.runner.run_steps` (cached and resumable like the pipeline), and writes its own report."""
