"""The demo's learning claim on one seed (slow: about 10 minutes on 2 CPU cores)."""

import json

import pytest

from safactory.config import load_config
from safactory.factory.loop import Factory


@pytest.mark.slow
def test_demo_learns_from_its_own_rollouts(tmp_path):
    Factory(load_config("examples/arith.yaml", ["seed=0"]), tmp_path).run()
    phases = json.loads((tmp_path / "summary.json").read_text())["phases"]
    assert phases["sft"]["success_rate"] > phases["init"]["success_rate"]
    assert phases["rl"]["success_rate"] >= phases["sft"]["success_rate"] + 0.1
