"""The plan contract, the policy registry and each baseline's defining invariant."""

from __future__ import annotations

import pytest
import torch
from policy_testlib import dense_attention

from hybridkv_sglang.policy import (
    POLICIES,
    CompressionPlan,
    LayerObservation,
    build_policy,
    dynamic_head_budget,
    retrievable_chunk_range,
    uniform_head_budget,
)
from hybridkv_sglang.policy.classify import (
    dynamic_fraction_cap,
)
from hybridkv_sglang.policy.hyperparameters import declared_hyperparameters

L, HKV, G, D = 3, 4, 2, 16
CHEAP = {"bound_channels": 4, "bound_precision": "uint8"}
"""A chunk index of 8 bytes a chunk (four 8-bit channels) and 48 a head, before scratch."""
FULL = {"bound_channels": None, "bound_precision": "kv"}
"""The design's index: every channel in the key dtype, ``1/C`` of a head's KV."""


def _request(
    n: int, seed: int = 0, n_text: int = 40
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per layer: window queries [32, H_q, D] and keys [N, H_kv, D]; heads of mixed sharpness."""
    gen = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for _ in range(L):
        k = torch.randn(n, HKV, D, generator=gen)
        q = torch.randn(32, HKV * G, D, generator=gen)
        q[:, : G * 2] *= 6.0  # kv heads 0, 1: sharp -> small focus; 2, 3: diffuse
        qs.append(q)
        ks.append(k)
    is_text = torch.zeros(n, dtype=torch.bool)
    is_text[:n_text] = True
    is_text[-32:] = True
    return qs, ks, is_text


def _plan(name: str, n: int = 400, **kw: object) -> CompressionPlan:
    qs, ks, is_text = _request(n)
    gen = torch.Generator().manual_seed(100)
    vs = [torch.randn(n, HKV, D, generator=gen) for _ in range(L)]  # read by flashcache only
    policy = build_policy(name, **kw)
    obs = [
        policy.observe_layer(layer, qs[layer], ks[layer], D**-0.5, vs[layer]) for layer in range(L)
    ]
    return policy.finalize(obs[::-1], is_text)  # any order


def _check_contract(plan: CompressionPlan) -> None:
    rows, n = plan.num_rows, plan.prompt_len
    assert plan.kept_indptr.shape == (rows + 1,) and plan.kept_indptr.dtype == torch.int64
    assert plan.kept_positions.dtype == torch.int32
    assert int(plan.kept_indptr[0]) == 0 and int(plan.kept_indptr[-1]) == plan.kept_entries()
    prefix_end, tail_start = plan.resident_bounds()
    resident = [*range(prefix_end), *range(tail_start, n)]
    assert set(range(plan.sink)) | set(range(n - plan.window, n)) <= set(resident)
    for layer in range(plan.num_layers):
        for head in range(plan.num_kv_heads):
            pos = plan.kept_positions_of(layer, head)
            assert torch.all(pos.diff() > 0) and int(pos.min()) >= 0 and int(pos.max()) < n
            if plan.is_dynamic[layer, head]:
                assert pos.tolist() == resident
                assert int(plan.budgets[layer, head]) == plan.dynamic_read_per_step()
            else:
                assert pos.numel() == int(plan.budgets[layer, head])
    assert (plan.chunk_kmin is None) == (not plan.has_dynamic)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
def test_every_policy_honours_the_contract(name: str, budget: float) -> None:
    plan = _plan(name, budget=budget)
    assert plan.policy == name
    _check_contract(plan)


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_hybridkv_within_budget_and_cap(budget: float) -> None:
    n = 400
    plan = _plan("hybridkv", n=n, budget=budget)
    assert int(plan.budgets.sum()) <= uniform_head_budget(n, budget, None) * L * HKV
    assert int(plan.is_dynamic.sum()) <= L * HKV // 2
    assert plan.has_dynamic  # the diffuse heads exceed b_mean
    assert plan.chunk_kmin is not None and plan.chunk_kmin.shape == (L, HKV, 25, D)
    # The sharp heads (0, 1) are the static ones.
    assert not plan.is_dynamic[:, :2].any()


def test_streaming_keeps_exactly_sink_and_recent() -> None:
    n = 400
    plan = _plan("streaming", n=n, budget=0.1, sink=4)
    recent = n - (40 - 4)
    for r in range(plan.num_rows):
        row = plan.kept_positions[plan.kept_indptr[r] : plan.kept_indptr[r + 1]]
        assert row.tolist() == [*range(4), *range(recent, n)]


def test_snapkv_uniform_budgets_window_plus_top_votes() -> None:
    n = 400
    plan = _plan("snapkv", n=n, budget=0.2)
    assert torch.all(plan.budgets == 80) and not plan.has_dynamic
    for layer in range(L):
        for head in range(HKV):
            assert set(range(n - 32, n)) <= set(plan.kept_positions_of(layer, head).tolist())


def test_snapkv_has_no_text_prior_hybridkv_has() -> None:
    """Text tokens with zero votes: hybridkv's text prior keeps them before any visual token,
    snapkv never."""
    n = 400
    qs, ks, _ = _request(n)
    is_text = torch.zeros(n, dtype=torch.bool)
    is_text[100:140] = True
    text = set(range(100, 140))
    for name in ("hybridkv", "snapkv"):
        prior = {"static_priority": "text"} if name == "hybridkv" else {}
        policy = build_policy(name, budget=0.25, max_dynamic_fraction=0.0, **prior)
        obs = []
        for layer in range(L):
            o = policy.observe_layer(layer, qs[layer], ks[layer], D**-0.5)
            scores = o.scores.clone()
            scores[:, 100:140] = 0.0
            obs.append(LayerObservation(layer, n, o.focus_size, scores, o.costs))
        plan = policy.finalize(obs, is_text)
        for layer in range(L):
            for h in range(HKV):
                kept_text = len(text & set(plan.kept_positions_of(layer, h).tolist()))
                b = int(plan.budgets[layer, h])
                assert kept_text == (min(b - 36, 40) if name == "hybridkv" else 0)


def _index_entries(
    n: int, window: int, chunk: int, sink: int = 4, selected: int = 1, **index: object
) -> int:
    """What stage 2 charges a dynamic head for its chunk index at these shapes."""
    first, end = retrievable_chunk_range(n, sink, window, chunk)
    policy = build_policy("hybridkv", **index)  # type: ignore[arg-type]
    return policy.costs(D, torch.float32).index_entries(end - first, selected)


def test_all_static_and_all_dynamic_types() -> None:
    static = _plan("all_static", budget=0.1)
    assert not static.has_dynamic and static.chunk_kmin is None
    # b_mean 80; the full index (22 chunks of 128 bytes, entries of 128) costs 24 entries:
    # (80 - 48 - 24) // 16 = 0 chunks, so no head can be dynamic
    assert _index_entries(400, 32, 16, **FULL) == 24
    assert not _plan("all_dynamic", budget=0.2, **FULL).has_dynamic
    # the cheap index costs 4 entries: (80 - 48 - 4) // 16 = 1 chunk
    dynamic = _plan("all_dynamic", budget=0.2, **CHEAP)
    assert dynamic.is_dynamic.all() and dynamic.top_k_chunks == 1
    assert torch.all(dynamic.budgets == dynamic_head_budget(400, 4, 32, 16, 1))
    assert dynamic.kept_entries() == L * HKV * (16 + 400 - 368)  # [0, 16) and [368, 400)


@pytest.mark.parametrize(
    "n,budget,k",
    [(400, 0.2, 1), (400, 0.5, 9), (400, 1.0, 21), (1200, 0.1, 4), (1200, 0.05, 1), (400, 0.1, 0)],
)
def test_all_dynamic_reads_within_the_budget(n: int, budget: float, k: int) -> None:
    """Equal-budget ablation: a dynamic head's entries and chunk index cost <= b_mean, at most
    one chunk short of it."""
    plan = _plan("all_dynamic", n=n, budget=budget, top_k_chunks=8, **CHEAP)
    b_mean = uniform_head_budget(n, budget, None)
    _check_contract(plan)
    assert plan.stats()["read_fraction"] <= budget + 1e-9
    if k == 0:  # not one chunk fits: pruned like all_static, at most B (or every head's floor)
        assert not plan.has_dynamic
        assert int(plan.budgets.sum()) <= max(b_mean, 36) * L * HKV
        return
    assert plan.is_dynamic.all() and plan.top_k_chunks == k  # top_k_chunks=8 is ignored
    first, end = plan.retrievable_chunks
    cost = plan.dynamic_read_per_step() + _index_entries(n, plan.window, 16, selected=k, **CHEAP)
    assert cost <= b_mean and (cost > b_mean - 16 or k == end - first)


@pytest.mark.parametrize("n,budget", [(400, 0.1), (400, 0.2), (1200, 0.1), (1200, 0.2)])
def test_hybridkv_budget_top_k_caps_dynamic_reads(n: int, budget: float) -> None:
    """dynamic_top_k='budget' (the default): k <= top_k_chunks and a dynamic head reads within
    max(b_mean, resident + one chunk); 'fixed' reads top_k_chunks chunks whatever the budget."""
    b_mean = uniform_head_budget(n, budget, None)
    fixed = _plan("hybridkv", n=n, budget=budget, max_dynamic_fraction=1.0, dynamic_top_k="fixed")
    capped = _plan("hybridkv", n=n, budget=budget, max_dynamic_fraction=1.0)
    _check_contract(capped)
    assert fixed.top_k_chunks == 8
    assert 1 <= capped.top_k_chunks <= 8
    index = _index_entries(n, 32, 16)
    assert capped.dynamic_read_per_step() + index <= max(
        b_mean, dynamic_head_budget(n, 4, 32, 16, 1) + index
    )
    assert int(capped.budgets.sum()) <= b_mean * L * HKV
    # Cheaper dynamic heads leave the static heads at least as much.
    assert capped.is_dynamic.sum() >= fixed.is_dynamic.sum()


TUNED = {  # docs/quality-diagnosis.md's configuration for the tile-task model
    "sink": 0,
    "chunk_size": 4,
    "top_k_chunks": 64,
    "static_priority": "focus",
    "dynamic_top_k": "budget",
}


@pytest.mark.parametrize(
    "n,budget,fits",
    [(335, 0.1, 0), (359, 0.1, 0), (400, 0.05, 0), (1200, 0.1, 14), (1200, 0.2, 39)],
)
def test_tuned_config_reads_within_the_budget(n: int, budget: float, fits: int) -> None:
    """No sink, 4-token chunks, dynamic heads with the static heads' window: the resident set is
    the window rounded out to a chunk border (nothing before it); a dynamic head retrieves the
    ``fits`` chunks that its chunk index leaves of b_mean (at least one, then the static heads
    pay for it), and the request reads at most B in bytes."""
    b_mean = uniform_head_budget(n, budget, None)
    plan = _plan(
        "hybridkv",
        n=n,
        budget=budget,
        dynamic_window_share=1.0,
        dynamic_cap="fixed",
        **TUNED,
        **CHEAP,
    )
    _check_contract(plan)
    window = min(32, b_mean)
    prefix_end, tail_start = plan.resident_bounds()
    assert plan.sink == 0 and prefix_end == 0 and window <= n - tail_start < window + 4
    assert plan.top_k_chunks == max(1, fits)
    if b_mean < 32:  # the window scales down to b_mean: every head keeps exactly the window
        assert not plan.has_dynamic and torch.all(plan.budgets == b_mean)
        assert plan.stats()["read_fraction"] <= budget + 1e-9
        return
    assert int(plan.budgets.sum()) <= b_mean * L * HKV
    assert plan.stats()["read_fraction"] <= budget + 1e-9
    assert plan.dynamic_read_per_step() == n - tail_start + max(1, fits) * 4
    if fits:
        index = _index_entries(n, window, 4, sink=0, selected=fits, **CHEAP)
        assert plan.has_dynamic and plan.dynamic_read_per_step() + index <= b_mean


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("n", [150, 340, 700])
@pytest.mark.parametrize("dynamic_window_share", [1.0, 0.25])
@pytest.mark.parametrize("index", [FULL, CHEAP], ids=["full-index", "cheap-index"])
def test_no_policy_reads_more_than_its_budget(
    name: str, budget: float, n: int, dynamic_window_share: float, index: dict
) -> None:
    """Floors (sink, window, the dynamic heads' resident set) scale down with the budget and
    dynamic heads pay for their chunk index: at every budget a request reads at most
    ``b_mean / N`` of its prompt's KV bytes per decode step."""
    plan = _plan(
        name,
        n=n,
        budget=budget,
        window=32,
        sink=4,
        dynamic_window_share=dynamic_window_share,
        **index,
    )
    _check_contract(plan)
    stats = plan.stats()
    b_mean = uniform_head_budget(n, budget, None)
    assert stats["budget_fraction"] == b_mean / n
    assert stats["read_bytes_per_step"] <= b_mean * L * HKV * stats["entry_bytes"]
    assert stats["read_fraction"] <= b_mean / n + 1e-12 and not stats["over_budget"]
    assert plan.sink + plan.window <= b_mean


def test_dynamic_window_share_buys_retrieval_under_a_tight_budget() -> None:
    """At b_mean 40 the whole window and the chunk index leave a dynamic head less than a chunk
    (the static heads pay for the one it reads); a quarter of the budget as its resident window
    (the default) leaves, after its 16-token-chunk index (5 entries), one chunk within b_mean,
    while static heads keep the window."""
    tight = {"n": 400, "budget": 0.1, "max_dynamic_fraction": 1.0, "sink": 0, **CHEAP}
    whole = _plan("hybridkv", dynamic_window_share=1.0, **tight)
    assert whole.dynamic_read_per_step() + _index_entries(400, 32, 16, sink=0, **CHEAP) > 40
    plan = _plan("hybridkv", dynamic_window_share=0.25, **tight)
    _check_contract(plan)
    assert plan.has_dynamic and plan.window == 10 and plan.top_k_chunks == 1
    prefix_end, tail_start = plan.resident_bounds()
    assert (prefix_end, 400 - tail_start) == (0, 16)
    assert plan.dynamic_read_per_step() + _index_entries(400, 10, 16, sink=0, **CHEAP) <= 40
    for layer, head in (~plan.is_dynamic).nonzero().tolist():
        assert plan.kept_positions_of(layer, head).tolist() == list(range(368, 400))
    assert plan.stats()["read_fraction"] <= 0.1 + 1e-9


def test_focus_priority_keeps_visual_focus_of_static_heads() -> None:
    """static_priority='focus' keeps each static head's focus set when its budget allows."""
    plan = _plan("hybridkv", budget=0.2, static_priority="focus")
    qs, ks, _ = _request(400)
    policy = build_policy("hybridkv", budget=0.2, static_priority="focus")
    for layer in range(L):
        obs = policy.observe_layer(layer, qs[layer], ks[layer], D**-0.5)
        assert obs.focus_set is not None and torch.equal(obs.focus_set.sum(-1), obs.focus_size)
        for h in range(HKV):
            if plan.is_dynamic[layer, h]:
                continue
            kept = set(plan.kept_positions_of(layer, h).tolist())
            members = set(obs.focus_set[h].nonzero().flatten().tolist())
            resident = set(range(4)) | set(range(400 - 32, 400))
            room = int(plan.budgets[layer, h]) - len(resident)
            assert len(members - resident - kept) == max(0, len(members - resident) - room)


def test_all_static_budgets_follow_focus() -> None:
    plan = _plan("all_static", budget=0.3)
    focus, budgets = plan.focus_size.flatten(), plan.budgets.flatten()
    for i in range(plan.num_rows):
        for j in range(plan.num_rows):
            if focus[i] > focus[j]:
                assert budgets[i] >= budgets[j]


def test_full_budget_attention_over_kept_equals_dense() -> None:
    """budget = 1: attention of decode queries over each head's kept set is dense attention."""
    n = 300
    plan = _plan("hybridkv", n=n, budget=1.0)
    gen = torch.Generator().manual_seed(9)
    keys = torch.randn(n, HKV, D, generator=gen)
    values = torch.randn(n, HKV, D, generator=gen)
    q = torch.randn(5, HKV, G, D, generator=gen)
    for layer in range(L):
        for h in range(HKV):
            kept = plan.kept_positions_of(layer, h).long()
            for t in range(5):
                full = dense_attention(q[t, h], keys[:, h], values[:, h], D**-0.5)
                sel = dense_attention(q[t, h], keys[kept, h], values[kept, h], D**-0.5)
                torch.testing.assert_close(sel, full, atol=1e-10, rtol=0)


def test_selected_attention_differs_when_compressed() -> None:
    """The check above can fail: at 10 % the kept set misses mass and the output moves."""
    n = 300
    plan = _plan("streaming", n=n, budget=0.1)
    gen = torch.Generator().manual_seed(9)
    keys, values = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    q = torch.randn(G, D, generator=gen)
    kept = plan.kept_positions_of(0, 0).long()
    full = dense_attention(q, keys, values, D**-0.5)
    sel = dense_attention(q, keys[kept], values[kept], D**-0.5)
    assert (sel - full).norm() > 1e-3 * full.norm()


@pytest.mark.parametrize("budget,window,sink", [(1.0, 10, 0), (0.5, 5, 0), (0.1, 1, 0)])
def test_window_and_sink_are_clamped_to_the_head_budget(
    budget: float, window: int, sink: int
) -> None:
    policy = build_policy("hybridkv", budget=budget, window=32, sink=4)
    n = 10
    gen = torch.Generator().manual_seed(0)
    obs = policy.observe_layer(0, torch.randn(10, 2, 8, generator=gen), torch.randn(n, 1, 8), 1.0)
    plan = policy.finalize([obs], torch.ones(n, dtype=torch.bool))
    assert (plan.window, plan.sink) == (window, sink)
    assert plan.kept_positions.tolist() == list(range(n - window, n))


def test_layer_helpers_agree_with_rows() -> None:
    plan = _plan("hybridkv", budget=0.2)
    for layer in range(L):
        rows = plan.rows_for_layer(layer)
        indptr, pos = plan.layer_csr(layer)
        assert indptr.shape == (HKV + 1,) and int(indptr[0]) == 0
        assert torch.equal(indptr.diff(), plan.kept_counts().flatten()[rows])
        for h in range(HKV):
            assert torch.equal(pos[indptr[h] : indptr[h + 1]], plan.kept_positions_of(layer, h))


def test_stats_read_fraction() -> None:
    plan = _plan("hybridkv", budget=0.2, dynamic_top_k="fixed", **CHEAP)
    s = plan.stats()
    n_dyn = int(plan.is_dynamic.sum())
    assert n_dyn > 0
    static_kept = int(plan.kept_counts()[~plan.is_dynamic].sum())
    entries = static_kept + n_dyn * dynamic_head_budget(400, 4, 32, 16, 8)
    # 22 chunks of 4 uint8 channels, their parameters, 8 candidates in one block and 8 selected
    index = n_dyn * (22 * 2 * 4 + 4 * 12 + 8 * 8 + 8 * 4)
    dense = L * HKV * 400 * 2 * D * 4
    assert s["dynamic_heads"] == n_dyn and s["static_heads"] == L * HKV - n_dyn
    assert s["read_entries_fraction"] == pytest.approx(entries / (L * HKV * 400))
    assert s["read_fraction"] == pytest.approx((entries * 2 * D * 4 + index) / dense)
    assert s["index_fraction"] == pytest.approx(index / dense)
    assert s["device_fraction_compact"] == s["read_fraction"]
    assert s["device_fraction_in_place"] == pytest.approx(1 + index / dense)
    assert s["host_fraction_compact"] == pytest.approx(n_dyn / (L * HKV))
    assert 0 < s["read_fraction"] <= 0.2 + 1e-9


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("nope", {}, "unknown policy"),
        ("hybridkv", {"bugdet": 0.1}, "unknown hyper-parameter"),
        ("hybridkv", {"budget": 0.0}, "budget"),
        ("snapkv", {"budget_tokens": 0}, "budget_tokens"),
        ("streaming", {"pool_kernel": 4}, "pool_kernel"),
        ("all_dynamic", {"window": 0}, "window"),
        ("hybridkv", {"theta": 1.2}, "theta"),
        ("hybridkv", {"max_dynamic_fraction": -0.1}, "max_dynamic_fraction"),
        ("all_static", {"static_priority": "visual"}, "static_priority"),
        ("hybridkv", {"dynamic_top_k": "auto"}, "dynamic_top_k"),
    ],
)
def test_build_policy_rejects_bad_values(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_policy(name, **kw)


def test_finalize_rejects_inconsistent_observations() -> None:
    qs, ks, is_text = _request(100)
    policy = build_policy("hybridkv")
    o0 = policy.observe_layer(0, qs[0], ks[0], 1.0)
    o2 = policy.observe_layer(2, qs[1], ks[1], 1.0)
    with pytest.raises(ValueError, match="one observation per layer"):
        policy.finalize([o0, o2], is_text)
    with pytest.raises(ValueError, match="is_text"):
        policy.finalize([o0], is_text[:-1])
    with pytest.raises(ValueError, match="at least one"):
        policy.finalize([], is_text)


def test_every_policy_class_of_the_package_is_registered() -> None:
    """Discovery: each concrete policy (a class naming itself) of every module is registered."""
    import importlib
    import inspect
    import pkgutil

    import hybridkv_sglang.policy as package
    from hybridkv_sglang.policy import CompressionPolicy

    named = {
        cls.name: cls
        for info in pkgutil.iter_modules(package.__path__)
        for _, cls in inspect.getmembers(importlib.import_module(f"{package.__name__}.{info.name}"))
        if inspect.isclass(cls) and issubclass(cls, CompressionPolicy) and "name" in cls.__dict__
    }
    named.pop("base")
    assert named == POLICIES and next(iter(POLICIES)) == "hybridkv"


def test_register_policy_refuses_a_taken_or_missing_name() -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    from hybridkv_sglang.policy import SnapKVPolicy, register_policy

    @dataclass(frozen=True)
    class Impostor(SnapKVPolicy):
        name: ClassVar[str] = "snapkv"

    @dataclass(frozen=True)
    class Nameless(SnapKVPolicy):
        pass

    with pytest.raises(ValueError, match="taken by SnapKVPolicy"):
        register_policy(Impostor)
    with pytest.raises(TypeError, match="own `name"):
        register_policy(Nameless)
    assert POLICIES["snapkv"] is SnapKVPolicy


def test_config_accepts_every_registered_policy() -> None:
    from typing import get_args

    from hybridkv_sglang.config import HybridKVConfig, PolicyName

    assert set(get_args(PolicyName)) == set(POLICIES)
    for name, cls in POLICIES.items():
        storage = "compact" if cls.merges_evicted else "in_place"
        assert HybridKVConfig(policy=name, storage=storage).policy == name


def test_config_fields_and_request_settings_follow_the_declarations() -> None:
    """One config field per declared hyper-parameter (default, description, range check with
    the policy's own message); a request may set exactly the per-request ones."""
    from hybridkv_sglang.config import HybridKVConfig, HybridKVConfigError, RequestSettings
    from hybridkv_sglang.policy.registry import all_hyperparameters

    declared = all_hyperparameters()
    per_request = {name for name, (d, _) in declared.items() if d.spec.per_request}
    assert per_request == {"budget", "budget_tokens"}
    assert set(RequestSettings.model_fields) == {"enabled", *per_request}
    for name, (d, owners) in declared.items():
        info = HybridKVConfig.model_fields[name]
        assert info.default == d.default and d.spec.doc in (info.description or "")
        if d.spec.ge is not None and isinstance(d.spec.ge, int):
            with pytest.raises(HybridKVConfigError, match=f"{name} must be"):
                HybridKVConfig.validated({"policy": owners[0], name: d.spec.ge - 1}, "test")
    assert HybridKVConfig.model_fields["pyramid_beta"].description.startswith("pyramidkv only:")
    for name, cls in POLICIES.items():
        storage = "compact" if cls.merges_evicted else "in_place"
        values = HybridKVConfig(policy=name, storage=storage).policy_values()
        assert set(values) == set(declared_hyperparameters(cls))


def test_policy_package_does_not_import_sglang() -> None:
    import subprocess
    import sys

    code = "import sys, hybridkv_sglang.policy; assert 'sglang' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("budget,cap", [(0.2, 0.25), (0.1, 0.5), (0.05, 1.0), (0.02, 1.0)])
def test_budget_scaled_cap_lets_more_heads_retrieve_as_the_budget_tightens(
    budget: float, cap: float
) -> None:
    """dynamic_cap='budget' (the default): max_dynamic_fraction 0.5 at 10 %, in inverse
    proportion to the budget elsewhere (at most every head); 'fixed' keeps 0.5."""
    assert dynamic_fraction_cap(0.5, budget, "budget") == pytest.approx(cap)
    assert dynamic_fraction_cap(0.5, budget, "fixed") == 0.5
    cheap = {**TUNED, "chunk_size": 16, **CHEAP}
    plan = _plan("hybridkv", n=1200, budget=budget, **cheap)
    assert int(plan.is_dynamic.sum()) <= int(cap * L * HKV + 1e-9)
    fixed = _plan("hybridkv", n=1200, budget=budget, dynamic_cap="fixed", **cheap)
    assert int(fixed.is_dynamic.sum()) <= L * HKV // 2
    if budget == 0.05:
        assert int(plan.is_dynamic.sum()) > int(fixed.is_dynamic.sum())
    if budget == 0.02:  # b_mean 24 cannot pay a 12-entry index and a 16-token chunk
        assert not plan.has_dynamic and not fixed.has_dynamic
