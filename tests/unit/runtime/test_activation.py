"""Installed is not enabled: every hook passes SGLang's result through until this process runs
the ``hybridkv`` backend, and a stock server is started without the plugin."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
from sglang.srt.managers.schedule_batch import (
    Modality,
    MultimodalDataItem,
    MultimodalInputs,
    Req,
)
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams

from hybridkv_sglang.config import ENV_VAR, HybridKVConfig
from hybridkv_sglang.runtime import activation, compaction, prefill_tracking, window_prefill
from hybridkv_sglang.runtime.compaction import (
    compact_after_checkpoint,
    count_compact_slots,
    release_compact,
)
from hybridkv_sglang.runtime.compressed_requests import CompressedRequest, CompressedRequests
from hybridkv_sglang.runtime.prefill_tracking import find_extend_batch, record_extend_batch
from hybridkv_sglang.runtime.stats import add_to_internal_state
from hybridkv_sglang.runtime.window_prefill import cap_prefix_for_window
from hybridkv_sglang.testing.server import PLUGIN_GROUP, PLUGIN_NAME, stock_environment

PROMPT_LEN = 400


@pytest.fixture(params=[False, True], ids=["inactive", "active"])
def active(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(activation, "_active", request.param)
    return request.param


def _image_req(rid: str = "r") -> Req:
    req = Req(rid, "", array("q", range(PROMPT_LEN)), SamplingParams(max_new_tokens=4))
    item = MultimodalDataItem(modality=Modality.IMAGE, offsets=[(10, 265)])
    req.multimodal_inputs = MultimodalInputs(mm_items=[item])
    return req


class FakeStorage:
    """Compact storage that counts what the hooks ask of it."""

    live_slots = 5
    host_tier = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    def compact(self, *args: object) -> None:
        self.calls.append("compact")

    def release(self, *args: object) -> None:
        self.calls.append("release")


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> FakeStorage:
    fake = FakeStorage()
    monkeypatch.setattr(compaction, "_storage", fake)
    return fake


@pytest.fixture
def compressed(monkeypatch: pytest.MonkeyPatch) -> CompressedRequests:
    table = CompressedRequests()
    monkeypatch.setattr(compaction, "COMPRESSED", table)
    return table


def test_the_unit_suite_runs_active():
    assert activation.is_active()


def test_record_extend_batch(active, monkeypatch):
    monkeypatch.setattr(prefill_tracking, "_pending", OrderedDict())
    req = _image_req()
    req.full_untruncated_fill_ids = req.origin_input_ids
    req.extend_end = PROMPT_LEN
    batch = SimpleNamespace(reqs=[req], forward_mode=ForwardMode.EXTEND)
    forward_batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, rids=[req.rid])
    assert record_extend_batch(forward_batch, object, batch, None) is forward_batch
    record = find_extend_batch(forward_batch.rids)
    if active:
        assert record is not None and record.finishes_prefill == (True,)
    else:
        assert record is None and not prefill_tracking._pending


def test_add_to_internal_state(active):
    result = SimpleNamespace(internal_state={"max_total_num_tokens": 8192})
    assert add_to_internal_state(result, None) is result
    assert ("hybridkv" in result.internal_state) is active
    assert result.internal_state["max_total_num_tokens"] == 8192


def test_cap_prefix_for_window(active, monkeypatch):
    monkeypatch.setattr(window_prefill, "_config", HybridKVConfig(window=32, min_prompt_tokens=128))
    req = _image_req()
    sglang_cap = req._compute_max_prefix_len(PROMPT_LEN)
    capped = cap_prefix_for_window(sglang_cap, req, PROMPT_LEN)
    assert capped == (PROMPT_LEN - 32 if active else sglang_cap)


def test_release_compact(active, compressed):
    compressed.add(CompressedRequest("r", 3, layout=object()))
    result = object()
    assert release_compact(result, _image_req("r"), None) is result
    assert (compressed.entry("r") is None) is active


def test_compact_after_checkpoint(active, storage, monkeypatch):
    table = SimpleNamespace(asked=[])
    monkeypatch.setattr(compaction, "COMPRESSED", SimpleNamespace(entry=table.asked.append))
    result = object()
    assert compact_after_checkpoint(result, _image_req("r"), None) is result
    assert table.asked == (["r"] if active else [])
    assert storage.calls == []


def test_count_compact_slots(active, storage):
    assert count_compact_slots((10, 2)) == ((10 + storage.live_slots, 2) if active else (10, 2))


# Stock means stock ------------------------------------------------------------------------------


def test_the_plugin_is_installed_under_the_name_stock_excludes():
    names = {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    assert names[PLUGIN_NAME] == "hybridkv_sglang.runtime.plugin:register"


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        (None, None),  # unset: every installed plugin but hybridkv
        ("", None),  # empty means unset to SGLang
        ("hybridkv", ","),  # nothing left: a value that names no plugin
        ("other, hybridkv", "other"),
        ("other", "other"),
    ],
)
def test_stock_environment_excludes_the_plugin(listed, expected):
    base = {"PATH": "/bin", ENV_VAR: '{"budget": 0.1}'}
    if listed is not None:
        base["SGLANG_PLUGINS"] = listed
    given = dict(base)
    env = stock_environment(base)
    installed = sorted(ep.name for ep in entry_points(group=PLUGIN_GROUP) if ep.name != PLUGIN_NAME)
    assert env["SGLANG_PLUGINS"] == (expected or ",".join(installed) or ",")
    assert ENV_VAR not in env and env["PATH"] == "/bin"
    assert base == given  # the caller's mapping is untouched


@pytest.mark.parametrize("listed", [None, "hybridkv"])
def test_sglang_loads_no_hybridkv_under_the_stock_environment(listed, monkeypatch):
    """SGLang's own plugin filter, fed the stock value (entry points are not imported here)."""
    import sglang.srt.plugins as plugins

    def discovered(group: str) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(name=ep.name, value=ep.value, dist=None, load=lambda: print)
            for ep in entry_points(group=group)
        ]

    base = {} if listed is None else {"SGLANG_PLUGINS": listed}
    monkeypatch.setenv("SGLANG_PLUGINS", stock_environment(base)["SGLANG_PLUGINS"])
    monkeypatch.setattr(plugins, "entry_points", discovered)
    loaded = plugins.load_plugins_by_group(PLUGIN_GROUP)
    assert PLUGIN_NAME not in loaded
    others = {ep.name for ep in entry_points(group=PLUGIN_GROUP)} - {PLUGIN_NAME}
    assert set(loaded) == (others if listed is None else set())
