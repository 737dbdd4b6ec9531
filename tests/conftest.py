"""Shared fixtures: a tiny model, its chat renderer, a policy on it."""

from __future__ import annotations

import copy
import uuid

import pytest
import torch

from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny
from safactory.sim.envs.arith import ArithTasks
from tests.pg_server import PostgresServer, find_bindir

SMALL = TinyModelSpec(hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=512)


@pytest.fixture
def sharp():
    """The tiny model with its matrices re-drawn wider: greedy continuations differ per prompt, some end."""
    model, tok = build_tiny(SMALL, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tok


def perturbed(model):
    """A copy of `model` with noise added to every weight: other weights of the same shape."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return other


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


def running_postgres():
    """Start a real PostgreSQL server of its own, yield it, stop it; a skip where none is installed."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries on this machine (set SAFACTORY_PG_BINDIR)")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session, or a skip where none is installed."""
    yield from running_postgres()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store URL: SQLite in tmp_path, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def serve():
    """Start apps on background uvicorn servers (loopback, free port); all stop after the test."""
    from safactory.policy.server import BackgroundServer

    servers: list[BackgroundServer] = []

    def start(app) -> BackgroundServer:
        server = BackgroundServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
