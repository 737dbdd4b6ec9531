"""Inference: the Policy protocol, local HF inference, endpoint clients, chat formats and servers.

What a policy author needs: `Policy`, `Completion`, `SamplingParams`, `PolicyError`;
ready policies: `LocalPolicy` (in-process, exact token ids and log-probs),
`EndpointPolicy` (any OpenAI-compatible server), `RandomPolicy`; `make_policy` turns a
`--policy` spec into one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safactory._exports import lazy_exports

if TYPE_CHECKING:
    from safactory.policy.base import Completion, Policy, PolicyError, SamplingParams
    from safactory.policy.endpoint import EndpointPolicy
    from safactory.policy.local import LocalPolicy
    from safactory.policy.random import RandomPolicy
    from safactory.policy.specs import make_policy

_EXPORTS = {
    "Completion": "safactory.policy.base",
    "EndpointPolicy": "safactory.policy.endpoint",
    "LocalPolicy": "safactory.policy.local",
    "Policy": "safactory.policy.base",
    "PolicyError": "safactory.policy.base",
    "RandomPolicy": "safactory.policy.random",
    "SamplingParams": "safactory.policy.base",
    "make_policy": "safactory.policy.specs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
