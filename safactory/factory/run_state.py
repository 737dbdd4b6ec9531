"""What a closed-loop run must remember to resume after a crash: `OUT/state.json`.

The state is rewritten atomically (temp file, fsync, rename) at every milestone:
the stage reached (`warm_start`, `rl`, `distill`, `done`), the run id, the summary
built so far (evaluations, gate decisions) and the versions deployed. Model
weights, optimiser state and the step reached inside a stage live in checkpoints
(`safactory.evolve.checkpoint`); trajectories, consumption and lineage in the store.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
STAGES = ("warm_start", "rl", "distill", "done")


@dataclass
class RunState:
    run_id: str
    stage: str = "warm_start"
    summary: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    def save(self, out: Path) -> None:
        tmp = out / f".{STATE_FILE}.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / STATE_FILE)

    @staticmethod
    def exists(out: Path) -> bool:
        """Whether `out` holds a saved run state."""
        return (out / STATE_FILE).exists()

    @classmethod
    def load(cls, out: Path) -> RunState:
        path = out / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{out} holds no {STATE_FILE}: it is not a run directory that can be resumed; "
                f"start a run in it with `safactory run CONFIG --out {out}`"
            )
        return cls(**json.loads(path.read_text()))

    def reached(self, stage: str) -> bool:
        """Whether the run has got past the start of `stage`."""
        return STAGES.index(self.stage) > STAGES.index(stage)
