"""EnvRegistry: installed env plugins (entry points of the group `safactory.envs`)."""

from __future__ import annotations

from typing import Any

import pytest

import safactory.sim.env as env_module
from safactory.sim.env import EnvEntry, EnvRegistry, EnvSpec


class FakeEntryPoint:
    def __init__(self, name: str, plugin: Any) -> None:
        self.name = name
        self.plugin = plugin

    def load(self) -> Any:
        if isinstance(self.plugin, Exception):
            raise self.plugin  # the plugin's module cannot be imported
        return self.plugin


def registers(env_id: str) -> Any:
    def plugin(registry: EnvRegistry) -> None:
        registry.register(env_id, EnvEntry(factory=object, tasks=object, spec=EnvSpec(id=env_id, version="1")))

    return plugin


def broken(registry: EnvRegistry) -> None:
    raise RuntimeError("plugin setup failed")


def test_a_failing_plugin_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = [
        FakeEntryPoint("import_fails", ImportError("guess_env needs numpy>=3")),
        FakeEntryPoint("first", registers("first")),
        FakeEntryPoint("call_fails", broken),
        FakeEntryPoint("second", registers("second")),
    ]
    monkeypatch.setattr(env_module, "entry_points", lambda group: plugins if group == "safactory.envs" else [])
    registry = EnvRegistry()
    with pytest.warns(RuntimeWarning) as warned:
        assert registry.get("first").spec == EnvSpec(id="first", version="1")
    messages = [str(w.message) for w in warned]
    assert any("'import_fails'" in m and "ImportError: guess_env needs numpy>=3" in m for m in messages)
    assert any("'call_fails'" in m and "RuntimeError: plugin setup failed" in m for m in messages)
    assert registry.get("second").spec == EnvSpec(id="second", version="1")
    assert registry.ids() == ["first", "second"]
    with pytest.raises(KeyError, match="failed to load: import_fails .*ImportError.*call_fails"):
        registry.get("guess")
