"""The closed loop with its rollouts on an OpenAI-compatible server: every version is published to it."""

import copy

from safactory.config import load_config
from safactory.data.store import TrajectoryStore
from safactory.factory.loop import Factory
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, load_model
from safactory.policy.server import create_policy_app
from tests.factory_runs import ARITH

STEPS = 3


def test_rollouts_on_a_served_policy(serve, tmp_path):
    model, tokenizer = build_tiny(TinyModelSpec(64, 2, 4, 128), seed=123)  # other weights than the run's
    served = LocalPolicy(copy.deepcopy(model), PlainTextChat(tokenizer), seed=0)
    server = serve(create_policy_app(served, model_name="tiny"))
    overrides = [
        *ARITH,
        f"rollout.endpoint=openai:{server.url}#tiny",
        "sft.enabled=false",
        f"rl.steps={STEPS}",
        "rl.tasks_per_step=4",
        "rl.group_size=4",
        "rl.eval_every=0",
        "rl.drop_equal_groups=false",
        "rl.temperature=1.5",
        "gate.enabled=false",
    ]
    out = tmp_path / "run"
    summary = Factory(load_config("examples/arith.yaml", overrides), out).run()

    # the server was sent the run's starting weights (v1), then one version per RL step
    assert served.version == 1 + STEPS
    assert summary["heldout"]["final"]["policy_version"] == 1 + STEPS
    store = TrajectoryStore.in_dir(out)
    rollouts = store.query(run_id=summary["run_id"], kind="rollout")
    # eta=1: groups admitted one version ahead may finish (and be stored) before the stop
    assert STEPS * 4 * 4 <= len(rollouts) <= (STEPS + 1) * 4 * 4
    assert store.count(run_id=summary["run_id"], kind="rollout") == len(rollouts)
    # token-exact traces came back through the API, with the versions the server reported
    for traj in rollouts:
        for step in traj.steps:
            tr = step.trace
            assert tr is not None and tr.prompt_ids and tr.completion_ids and tr.logprobs
            assert len(tr.completion_ids) == len(tr.logprobs)
    assert {v for t in rollouts for v in t.policy_versions()} <= set(range(1, 1 + STEPS + 1))
    assert max(v for t in rollouts for v in t.policy_versions()) > 1
    store.close()
    published = sorted(p.name for p in (out / "published" / "policy").iterdir())
    assert published[-1] == f"v{1 + STEPS:06d}" and len(published) <= 2
    # what the server serves now is what the run saved as its final model
    final, _ = load_model(out / "model")
    for key, value in final.state_dict().items():
        assert served.model.state_dict()[key].equal(value)
