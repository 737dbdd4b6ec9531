"""The closed loop on a Hugging Face chat model: Qwen3's real tokenizer and template (tools rendered by
the template, `<tool_call>` JSON parsed), a random-init Qwen3-shaped model, LoRA; and `kill -9` + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from safactory.cli import app
from safactory.config import load_config
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.factory.loop import Factory
from tests.factory_runs import ARITH
from tests.real_tokenizers import qwen3_tokenizer, random_qwen3
from tests.test_resume import rl_step

HF_RUN = [
    *[o for o in ARITH if not o.startswith("model.")],
    "model.kind=hf",
    "model.lora.r=8",
    "env.train_tasks=40",
    "env.test_tasks=6",
    "rollout.max_tokens_per_turn=24",
    "sft.demos=12",
    "sft.batch_size=4",
    "sft.max_steps=2",
    "sft.probe_every=2",
    "sft.probe_tasks=4",
    "sft.target_success=1.0",
    "rl.tasks_per_step=2",
    "rl.group_size=2",
    "rl.temperature=1.0",
    "rl.drop_equal_groups=false",
    "rl.eval_every=0",
    "rl.ref_kl=0.05",
]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A random-init Qwen3-shaped model saved with Qwen3's tokenizer: a standard HF directory."""
    directory = tmp_path_factory.mktemp("qwen3-tiny")
    tokenizer = qwen3_tokenizer()
    random_qwen3(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.timeout(900)  # ~40 s alone; a 150k vocabulary makes it the slowest of its kind on busy cores
def test_the_loop_trains_a_lora_adapter_on_an_hf_chat_model(qwen3_dir, tmp_path):
    out = tmp_path / "run"
    config = load_config("examples/arith.yaml", [*HF_RUN, f"model.path={qwen3_dir}", "rl.steps=2"])
    summary = Factory(config, out).run()
    assert summary["rl"]["steps"] == 2
    # the deployed model is a standard HF directory (adapter merged), the adapter is saved on its own too
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").chat_template
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(qwen3_dir) and adapter["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    differs = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert differs and all("proj" in k for k in differs)  # only adapted projections moved
    # rollouts were rendered with the template's tool block and carry token traces
    store = TrajectoryStore.in_dir(out)
    rollouts = store.query(kind="rollout")
    assert rollouts and all(s.trace is not None for t in rollouts for s in t.steps)
    prompt = rollouts[0].steps[0].trace.prompt_ids
    assert "# Tools" in qwen3_tokenizer().decode(prompt)  # Qwen3's own tools section
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r.get("phase") == "rl"]
    assert all("rollout/prefix_breaks" in r and r["train/kl_ref"] is not None for r in rl_rows)
    store.close()


@pytest.mark.timeout(900)
def test_kill_9_then_resume_with_an_hf_lora_model(qwen3_dir, tmp_path):
    steps, kill_after = 8, 3
    out = tmp_path / "run"
    args = ["run", "examples/arith.yaml", "--out", str(out), "--set", f"model.path={qwen3_dir}"]
    for o in [*HF_RUN, f"rl.steps={steps}", "checkpoint_every=1"]:
        args += ["--set", o]
    cli = "from safactory.cli import app; app()"
    proc = subprocess.Popen([sys.executable, "-c", cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while rl_step(out) < kill_after:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert rl_step(out) < steps and not (out / "summary.json").exists()
    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["rl"]["steps"] == steps
    store = TrajectoryStore.in_dir(out)
    assert verify(store).ok
    run_id = store.run_ids()[0]
    rollouts = store.query(run_id=run_id, kind="rollout")
    assert len({t.id for t in rollouts}) == len(rollouts)
    assert set(Counter(t.group_id for t in rollouts).values()) == {2}
    assert store.consumed_count(run_id, run_id=run_id, kind="rollout") == steps * 2 * 2
    versions = [c["version"] for c in store.checkpoints(run_id)]
    assert versions == list(range(len(versions)))
    store.close()
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
