"""Shared fixtures: a tiny model, its chat renderer, a policy on it."""

from __future__ import annotations

import copy

import pytest

from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny
from safactory.sim.envs.arith import ArithTasks

SMALL = TinyModelSpec(hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=512)


@pytest.fixture
def tiny():
    return build_tiny(SMALL, seed=0)


@pytest.fixture
def chat(tiny):
    return PlainTextChat(tiny[1])


@pytest.fixture
def policy(tiny, chat):
    return LocalPolicy(copy.deepcopy(tiny[0]), chat, seed=0)


@pytest.fixture
def arith_tasks():
    return ArithTasks()
