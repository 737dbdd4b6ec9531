"""One-shot jobs beside the loop: `rollout` (episodes into the store), `train` (on stored data, resumable),
`export` (JSONL, Parquet, TRL, token-level RL rows, and back). `safactory.rollout` and
`safactory.RolloutJob` are the rollout job's public names."""
