"""Installed is not enabled: every hook passes SGLang's result through until this process opens
a hybridkv session, and a stock server is started without the plugin."""

from __future__ import annotations

from array import array
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
from hybridkv_sglang.runtime.hooks.scheduler import (
    add_to_internal_state,
    cap_prefix_for_window,
    compact_after_checkpoint,
    count_compact_slots,
    record_forward_batch,
    release_request,
)
from hybridkv_sglang.runtime.session import current
from hybridkv_sglang.runtime.session.compressed_requests import CompressedRequest
from hybridkv_sglang.runtime.session.scheduler_session import SchedulerSession
from hybridkv_sglang.runtime.session.stats import HybridKVStats
from hybridkv_sglang.testing.server import PLUGIN_GROUP, PLUGIN_NAME, stock_environment

PROMPT_LEN = 400


@pytest.fixture(params=[False, True], ids=["stock", "hybridkv"])
def active(request: pytest.FixtureRequest) -> SchedulerSession | None:
    """The session hooks reach, or ``None``: a process without the hybridkv backend."""
    if not request.param:
        return None
    opened = SchedulerSession(HybridKVConfig(window=32, min_prompt_tokens=128), HybridKVStats())
    current.open_session(opened)
    return opened


def _image_req(rid: str = "r") -> Req:
    req = Req(rid, "", array("q", range(PROMPT_LEN)), SamplingParams(max_new_tokens=4))
    item = MultimodalDataItem(modality=Modality.IMAGE, offsets=[(10, 265)])
    req.multimodal_inputs = MultimodalInputs(mm_items=[item])
    return req


class FakeStorage:
    """Compact storage that counts what the session asks of it."""

    live_slots = 5
    host_tier = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    def compact(self, *args: object) -> None:
        self.calls.append("compact")

    def release(self, *args: object) -> None:
        self.calls.append("release")


def test_a_unit_test_starts_in_a_process_serving_nothing():
    assert current.current_session() is None and current.launch_config() is None


def test_record_forward_batch(active):
    req = _image_req()
    req.full_untruncated_fill_ids = req.origin_input_ids
    req.extend_end = PROMPT_LEN
    batch = SimpleNamespace(reqs=[req], forward_mode=ForwardMode.EXTEND)
    forward_batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, rids=[req.rid])
    assert record_forward_batch(forward_batch, object, batch, None) is forward_batch
    if active is not None:
        record = active.extend_batches.find(forward_batch.rids)
        assert record is not None and record.finishes_prefill == (True,)


def test_add_to_internal_state(active):
    result = SimpleNamespace(internal_state={"max_total_num_tokens": 8192})
    assert add_to_internal_state(result, None) is result
    assert ("hybridkv" in result.internal_state) is (active is not None)
    assert result.internal_state["max_total_num_tokens"] == 8192


def test_cap_prefix_for_window(active):
    req = _image_req()
    sglang_cap = req._compute_max_prefix_len(PROMPT_LEN)
    capped = cap_prefix_for_window(sglang_cap, req, PROMPT_LEN)
    assert capped == (sglang_cap if active is None else PROMPT_LEN - 32)


def test_release_request(active):
    if active is not None:
        active.requests.add(CompressedRequest("r", 3, layout=object()))
    result = object()
    assert release_request(result, _image_req("r"), None) is result
    if active is not None:
        assert active.requests.entry("r") is None


def test_compact_after_checkpoint_reaches_the_session(active):
    storage = FakeStorage()
    if active is not None:
        active.compact_storage = storage
        layout = SimpleNamespace(prompt_len=PROMPT_LEN, merge_evicted=False)
        active.requests.add(CompressedRequest("r", 3, layout=layout))
    result = object()
    req = _image_req("r")
    req.finished = lambda: True  # not eligible: stays in place, storage untouched
    assert compact_after_checkpoint(result, req, None) is result
    assert storage.calls == []


def test_count_compact_slots(active):
    if active is not None:
        active.compact_storage = FakeStorage()
    expected = (10, 2) if active is None else (10 + FakeStorage.live_slots, 2)
    assert count_compact_slots((10, 2)) == expected


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
