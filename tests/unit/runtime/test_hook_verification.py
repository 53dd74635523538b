"""Every SGLang target the plugin patches is checked at start-up: present, patched with the
plugin's hook, and with the parameters the hook reads; anything else stops the launch, naming the
target and the SGLang version."""

from __future__ import annotations

import sys
import types
from collections import defaultdict
from importlib.metadata import version

import pytest
from sglang.srt.plugins.hook_registry import HookRegistry

from hybridkv_sglang.runtime.hooks.installation import Hook, HookInstallError, verify_hooks
from hybridkv_sglang.runtime.plugin import HOOKS

MODULE = "hybridkv_test_targets"


def _after(result, *args, **kwargs):
    return result


@pytest.fixture
def target_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module with one method to patch, and SGLang's registry emptied around the test."""
    module = types.ModuleType(MODULE)

    class Scheduler:
        def step(self, batch, budget):
            return batch

    module.Scheduler = Scheduler
    monkeypatch.setitem(sys.modules, MODULE, module)
    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setattr(HookRegistry, "_patched", set())
    return module


def _installed(hook: Hook) -> Hook:
    HookRegistry.register(hook.target, hook.function)
    HookRegistry.apply_hooks()
    return hook


def test_an_applied_hook_passes(target_module):
    verify_hooks([_installed(Hook(f"{MODULE}.Scheduler.step", _after, "after", ("self", "batch")))])


def test_a_renamed_target_stops_the_launch_naming_it_and_the_version(target_module):
    target_module.Scheduler.run = target_module.Scheduler.step
    del target_module.Scheduler.step
    hook = _installed(Hook(f"{MODULE}.Scheduler.step", _after, "after", ("self",)))
    with pytest.raises(HookInstallError) as err:
        verify_hooks([hook])
    assert f"target {MODULE}.Scheduler.step no longer exists" in str(err.value)
    assert f"SGLang {version('sglang')}" in str(err.value)


def test_a_target_patched_without_the_plugins_hook_is_refused(target_module):
    _installed(Hook(f"{MODULE}.Scheduler.step", _after, "after", ("self",)))
    other = Hook(f"{MODULE}.Scheduler.step", lambda result, *a, **k: result, "after", ("self",))
    with pytest.raises(HookInstallError, match=r"Scheduler\.step was not patched"):
        verify_hooks([other])


def test_a_changed_signature_is_refused(target_module):
    hook = _installed(Hook(f"{MODULE}.Scheduler.step", _after, "after", ("self", "forward_batch")))
    with pytest.raises(HookInstallError, match=r"takes \(self, batch, budget\), the hook reads"):
        verify_hooks([hook])


def test_the_hooks_the_plugin_reads_match_this_sglang():
    """The table's parameters are this SGLang's (the targets exist; not patched in this process)."""
    import inspect
    import pkgutil

    for hook in HOOKS:
        owner, name = hook.target.rsplit(".", 1)
        found = inspect.getattr_static(pkgutil.resolve_name(owner), name)
        found = inspect.unwrap(getattr(found, "__func__", found))
        parameters = tuple(inspect.signature(found).parameters)
        assert parameters[: len(hook.parameters)] == hook.parameters, hook.target
