"""Guards of the training side: no silent zero log-probs, the student's own log-probs in distillation,
the staleness bound at the trainer, and checkpoints rewritten at the same step without a gap."""

import copy
import os

import pytest

from safactory.evolve.checkpoint import latest_checkpoint, read_meta, save_checkpoint
from safactory.evolve.experience import TrainSequence, rl_sequences
from safactory.evolve.teacher import distill
from safactory.evolve.trainer import Trainer
from safactory.factory.online import group_fate
from safactory.types import Message, Step, Task, TokenTrace, Trajectory


def traced(logprobs: list[float] | None, versions: list[int] | None = None) -> Trajectory:
    trace = TokenTrace(prompt_ids=[1, 2], completion_ids=[3, 4], logprobs=logprobs, policy_versions=versions or [0])
    step = Step(index=0, action=Message(role="assistant", content="x"), trace=trace)
    return Trajectory(task=Task(id="t", env_id="e", split="train", prompt="p"), steps=[step], reward=1.0)


def test_rl_refuses_turns_recorded_without_behaviour_logprobs(tiny):
    known, unknown = rl_sequences(traced([-0.5, -0.25]))[0], rl_sequences(traced(None))[0]
    assert known.behaviour_known and not unknown.behaviour_known
    trainer = Trainer(copy.deepcopy(tiny[0]), lr=1e-3)
    with pytest.raises(ValueError, match="no behaviour log-probs"):
        trainer.train_step([known, unknown], "ppo")
    trainer.train_step([unknown], "sft")  # supervised learning does not need them


def test_distillation_compares_the_teacher_with_the_students_current_logprobs():
    seq = TrainSequence([1, 2, 3], [0, 1, 1], behaviour_logprobs=[0.0, -1.0, -1.0])
    teacher = [0.0, -1.0, -1.0]  # the stored (sampling) policy agreed with the teacher
    assert distill([seq], [teacher])["reverse_kl"] == 0.0
    seq.proximal_logprobs = [0.0, -0.2, -0.4]  # the student being trained does not
    stats = distill([seq], [teacher])
    assert stats["reverse_kl"] == pytest.approx(0.7) and seq.token_advantages == pytest.approx([0.0, -0.8, -0.6])


def test_the_trainer_drops_groups_older_than_the_staleness_bound_and_refused_ones():
    group = [traced([-1.0, -1.0], [4, 5]), traced([-1.0, -1.0], [5])]
    assert group_fate(group, version=5, eta=1, refused=set()) == "train"
    assert group_fate(group, version=6, eta=1, refused=set()) == "stale"  # its first tokens came from v4
    assert group_fate(group, version=6, eta=2, refused=set()) == "train"
    assert group_fate(group, version=5, eta=1, refused={4}) == "refused"


def test_rewriting_a_checkpoint_keeps_latest_on_a_complete_one(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    root = tmp_path / "ckpt"
    save_checkpoint(
        root, model=model, tokenizer=tokenizer, optimizer=None, version=1, parent_version=None, train_step=5
    )
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if str(src).startswith(str(root / ".tmp-")):
            raise KeyboardInterrupt("kill -9 here")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            root, model=model, tokenizer=tokenizer, optimizer=None, version=2, parent_version=1, train_step=5
        )
    monkeypatch.setattr(os, "replace", real_replace)
    latest = latest_checkpoint(root)  # the old step-5 is gone, the new copy is complete and found
    assert latest is not None and read_meta(latest).version == 2
    real_replace(latest, root / "step-000005")  # as if killed after the rename, before `latest` moved on
    latest = latest_checkpoint(root)
    assert latest == root / "step-000005" and read_meta(latest).version == 2
    save_checkpoint(root, model=model, tokenizer=tokenizer, optimizer=None, version=3, parent_version=2, train_step=5)
    assert latest_checkpoint(root) == root / "step-000005" and read_meta(root / "step-000005").version == 3
