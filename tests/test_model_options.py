"""Every command that loads a model takes the same models and placement: `train` (tiny, smollm2 or a model
directory; LoRA with an adapter and a merged model), `rollout --policy`, `serve-policy` and `run`
(`--device` / `--dtype`). The HF model here is a random-init tiny Llama with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.store import TrajectoryStore
from safactory.evolve.checkpoint import ADAPTER_WEIGHTS, latest_checkpoint
from safactory.jobs.train import JOB_FILE, OfflineTrainer
from safactory.policy.local import LocalPolicy
from safactory.policy.models import load_policy_model
from safactory.policy.server import load_served_policy
from tests.real_tokenizers import random_llama, smollm2_tokenizer


def invoke(*args: str) -> tuple[int, str]:
    """Run `safactory ARGS` in-process; the exit code and the output with typer's boxes flattened."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A standard HF chat-model directory: a random-init tiny Llama saved with SmolLM2's tokenizer."""
    directory = tmp_path_factory.mktemp("smollm2-tiny")
    tokenizer = smollm2_tokenizer()
    random_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> str:
    """A store holding 8 episodes of arith's scripted expert, stored by `safactory rollout`."""
    db = tmp_path_factory.mktemp("demos") / "demos.db"
    code, said = invoke("rollout", "--env", "arith", "--policy", "scripted", "--episodes", "8", "--db", str(db))
    assert code == 0, said
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def hf_rollouts(hf_dir, tmp_path_factory) -> str:
    """A store of 4 episodes (2 groups of 2) that the HF model played, token traces included."""
    db = tmp_path_factory.mktemp("rollouts") / "r.db"
    args = ["rollout", "--env", "arith", "--policy", str(hf_dir), "--episodes", "4", "--group-size", "2"]
    code, said = invoke(*args, "--db", str(db), "--max-tokens", "8", "--max-turns", "2")
    assert code == 0, said
    return f"sqlite:///{db}"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).state_dict()


# ---- safactory train -------------------------------------------------------------------------


def test_train_a_lora_adapter_on_an_hf_chat_model_and_merge_it(hf_dir, demos, tmp_path):
    out = tmp_path / "job"
    args = ["train", "--db", demos, "--out", str(out), "--mode", "sft", "--kind", "rollout", "--model", str(hf_dir)]
    args += ["--lora-r", "4", "--merge", "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1"]
    code, said = invoke(*args)
    assert code == 0, said
    assert "done: step 2" in said and (out / "model" / "config.json").is_file()

    # checkpoints hold the adapter only, its base recorded as the model the job started from
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert (checkpoint / ADAPTER_WEIGHTS).is_file() and not (checkpoint / "model.safetensors").exists()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert adapter["base_model_name_or_path"] == str(hf_dir.resolve())
    job = json.loads((out / JOB_FILE).read_text())
    assert job["lora_r"] == 4 and job["merge"] and job["model"] == str(hf_dir.resolve())

    # the merged model is a standard HF directory; only the adapted projections moved
    assert AutoTokenizer.from_pretrained(out / "model", local_files_only=True).chat_template
    merged, base = weights(out / "model"), weights(hf_dir)
    assert merged.keys() == base.keys()
    moved = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    # the adapter on its base (as `load_policy_model` loads it) is the merged model
    ids = torch.tensor([smollm2_tokenizer().encode("What is 3 + 4?")])
    with torch.no_grad():
        from_adapter = load_policy_model(str(out / "adapter")).model(ids).logits
        from_merged = load_policy_model(str(out / "model")).model(ids).logits
    assert torch.allclose(from_adapter, from_merged, atol=1e-5)

    # resuming the finished job trains nothing more and writes the same models again
    code, said = invoke("train", "--out", str(out), "--resume")
    assert code == 0, said
    assert "done: step 2" in said and '"step": 3' not in said
    again = weights(out / "model")
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    store = TrajectoryStore(demos)
    assert [c["version"] for c in store.checkpoints(job["consumer"])] == [1, 2]
    store.close()


def test_a_tiny_lora_job_keeps_its_random_base_so_the_adapter_loads_again(demos, tmp_path):
    out = tmp_path / "job"
    args = ["train", "--db", demos, "--out", str(out), "--kind", "rollout", "--model", "tiny", "--seed", "3"]
    code, said = invoke(*args, "--lora-r", "2", "--lora-alpha", "2", "--merge", "--steps", "1", "--batch-size", "4")
    assert code == 0, said
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = str((out / "base").resolve())
    assert adapter["base_model_name_or_path"] == base and adapter["lora_alpha"] == 2
    checkpoint = latest_checkpoint(out / "checkpoints")  # an adapter of the same base, loadable as it is
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        from_adapter = load_policy_model(str(out / "adapter")).model(ids).logits
        from_merged = load_policy_model(str(out / "model")).model(ids).logits
        from_base = load_policy_model(str(out / "base")).model(ids).logits
    assert torch.allclose(from_adapter, from_merged, atol=1e-5) and not torch.allclose(from_merged, from_base)


def test_opd_with_an_hf_teacher_loaded_like_the_student(hf_dir, hf_rollouts, tmp_path):
    """The teacher is the student's own starting model: a zero-init adapter makes them agree exactly."""
    out = tmp_path / "job"
    args = ["train", "--db", hf_rollouts, "--out", str(out), "--mode", "opd", "--model", str(hf_dir)]
    code, said = invoke(*args, "--teacher", str(hf_dir), "--lora-r", "2", "--steps", "1", "--batch-size", "2")
    assert code == 0, said
    step = json.loads(said[said.index("{") : said.index("}") + 1])
    assert step["step"] == 1 and step["trajectories"] == 4 and abs(step["reverse_kl"]) < 1e-5


def test_train_option_mistakes_are_usage_errors(hf_dir, demos, tmp_path):
    base = ["train", "--db", demos, "--out", str(tmp_path / "job"), "--kind", "rollout", "--model", str(hf_dir)]
    code, said = invoke(*base, "--merge")
    assert code == 2 and "--merge" in said and "--lora-r" in said
    code, said = invoke(*base, "--dtype", "float8")
    assert code == 2 and "float8" in said and "bfloat16" in said
    code, said = invoke(*base, "--device", "nowhere")
    assert code == 2 and "not a torch device" in said
    code, said = invoke(*base[:-1], str(tmp_path / "missing"))
    assert code == 2 and "model directory" in said
    assert not (tmp_path / "job").exists()


def test_an_older_train_json_resumes_with_the_defaults_of_the_new_fields(demos, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    old = {"db": demos, "out": str(out), "mode": "sft", "model": "tiny", "kind": "rollout", "steps": 1}
    old |= {"batch_size": 4, "checkpoint_every": 1, "consumer": "train-old"}
    (out / JOB_FILE).write_text(json.dumps(old))
    trainer = OfflineTrainer.resume(out, log=lambda _: None)
    job = trainer.job
    assert (job.device, job.dtype, job.lora_r, job.lora_alpha, job.merge) == ("cpu", "auto", 0, None, False)
    result = trainer.run()
    assert result["step"] == 1 and "adapter" not in result and not (out / "adapter").exists()


# ---- safactory rollout --policy ----------------------------------------------------------------


def test_rollout_runs_an_hf_model_directory_in_the_dtype_asked_for(hf_dir, tmp_path):
    db = tmp_path / "r.db"
    args = ["rollout", "--env", "arith", "--policy", str(hf_dir), "--episodes", "2", "--db", str(db)]
    code, said = invoke(*args, "--dtype", "float32", "--device", "cpu", "--max-tokens", "8", "--max-turns", "2")
    assert code == 0, said
    store = TrajectoryStore(f"sqlite:///{db}")
    trajectories = list(store.iter())
    run = store.run_ids()
    store.close()
    assert len(trajectories) == 2 and len(run) == 1
    assert all(s.trace is not None and s.trace.completion_ids for t in trajectories for s in t.steps)

    code, said = invoke(*args, "--dtype", "float8")
    assert code == 2 and "float8" in said and "float32" in said
    code, said = invoke(*args, "--device", "nowhere")
    assert code == 2 and "not a torch device" in said

    # --dtype reaches the model: the same episodes sampled in bfloat16 get other behaviour log-probs
    half = tmp_path / "half.db"
    code, said = invoke(*args[:-1], str(half), "--dtype", "bfloat16", "--max-tokens", "8", "--max-turns", "2")
    assert code == 0, said
    first = {}
    for path in (db, half):
        store = TrajectoryStore(f"sqlite:///{path}")
        first[path] = min(store.iter(), key=lambda t: t.task.id).steps[0].trace
        store.close()
    assert first[db].prompt_ids == first[half].prompt_ids
    assert first[db].logprobs[0] != first[half].logprobs[0]


def test_rollout_policy_specs_name_smollm2():
    code, said = invoke("rollout", "--help")
    assert code == 0 and "smollm2" in said and "--device" in said and "--dtype" in said


# ---- safactory serve-policy -----------------------------------------------------------------------


def test_serve_policy_loads_the_model_in_the_dtype_and_on_the_device_asked_for(hf_dir):
    policy = load_served_policy(hf_dir, device="cpu", dtype="bfloat16")
    assert isinstance(policy, LocalPolicy)
    assert policy.device == torch.device("cpu")
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_served_policy(hf_dir).model.parameters()} == {torch.float32}  # auto on the CPU
    with pytest.raises(ValueError, match="use one of auto, float32, bfloat16, float16"):
        load_served_policy(hf_dir, dtype="half-ish")
    with pytest.raises(ValueError, match="not a torch device"):
        load_served_policy(hf_dir, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_served_policy(hf_dir, device="cuda")


def test_serve_policy_refuses_a_bad_dtype_before_loading_anything(tmp_path):
    code, said = invoke("serve-policy", "--model", str(tmp_path / "missing"), "--dtype", "double")
    assert code == 2 and "double" in said


# ---- safactory run -----------------------------------------------------------------------------

QUICK_RUN = ["env.train_tasks=4", "env.test_tasks=4", "sft.enabled=false", "rl.enabled=false"]
QUICK_RUN += ["logging.report=false", "logging.tensorboard=false"]


def test_run_device_and_dtype_become_model_overrides(tmp_path):
    """They are the last overrides: they win over a --set of the same field."""
    out = tmp_path / "run"
    sets = [arg for o in [*QUICK_RUN, "model.device=auto", "model.dtype=bfloat16"] for arg in ("--set", o)]
    code, said = invoke("run", "examples/arith.yaml", "--out", str(out), *sets, "--device", "cpu", "--dtype", "float32")
    assert code == 0, said
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["device"] == "cpu" and saved["model"]["dtype"] == "float32"
    assert json.loads((out / "summary.json").read_text())["phases"]["init"]

    code, said = invoke("run", "--resume", str(out), "--device", "cpu")
    assert code == 2 and "resumed" in said
    code, said = invoke("run", "examples/arith.yaml", "--out", str(tmp_path / "other"), "--dtype", "float64")
    assert code == 2 and "float64" in said and not (tmp_path / "other").exists()
