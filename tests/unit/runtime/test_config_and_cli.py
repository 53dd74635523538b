"""HybridKVConfig validation and the hybridkv-serve argument split."""

from __future__ import annotations

import json

import pytest

from hybridkv_sglang.cli import build_parser, resolve, server_environment
from hybridkv_sglang.config import ENV_VAR, HybridKVConfig, HybridKVConfigError

BAD_VALUES = [
    ("budget", 0.0, "budget must be in (0, 1]"),
    ("budget", 1.5, "budget must be in (0, 1]"),
    ("budget_tokens", 0, "budget_tokens must be >= 1"),
    ("theta", 0.0, "theta must be in (0, 1]"),
    ("window", 0, "window must be >= 1"),
    ("sink", -1, "sink must be >= 0"),
    ("chunk_size", 0, "chunk_size must be >= 1"),
    ("top_k_chunks", 0, "top_k_chunks must be >= 1"),
    ("max_dynamic_fraction", 1.2, "max_dynamic_fraction must be in [0, 1]"),
    ("pool_kernel", 4, "pool_kernel must be odd"),
    ("min_prompt_tokens", -5, "min_prompt_tokens must be >= 0"),
    ("host_tier_mib", -1.0, "host_tier_mib must be >= 0"),
    ("storage", "paged", "storage"),
    ("policy", "h2o", "policy"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_VALUES)
def test_bad_value_names_the_field_and_range(field, value, message):
    with pytest.raises(HybridKVConfigError) as err:
        HybridKVConfig.parse(json.dumps({field: value}))
    assert message in str(err.value)
    assert ENV_VAR in str(err.value)


def test_unknown_field_is_refused():
    with pytest.raises(HybridKVConfigError, match="budgett"):
        HybridKVConfig.parse('{"budgett": 0.2}')


def test_parse_reads_json_text_or_a_file(tmp_path):
    path = tmp_path / "hybridkv.json"
    path.write_text('{"budget": 0.2, "policy": "snapkv"}')
    assert HybridKVConfig.parse(str(path)) == HybridKVConfig.parse(path.read_text())
    assert HybridKVConfig.parse(str(path)).policy == "snapkv"
    with pytest.raises(HybridKVConfigError, match="neither"):
        HybridKVConfig.parse(str(tmp_path / "missing.json"))


def test_from_env_round_trips(monkeypatch):
    config = HybridKVConfig(budget=0.25, window=8, visual_only=False)
    monkeypatch.setenv(ENV_VAR, config.to_env())
    assert HybridKVConfig.from_env() == config
    monkeypatch.delenv(ENV_VAR)
    assert HybridKVConfig.from_env() == HybridKVConfig()


def test_policy_values_are_plain_and_complete():
    values = HybridKVConfig(budget=0.3).policy_values()
    assert values["budget"] == 0.3 and "storage" not in values and "enabled" not in values


def test_every_config_field_has_a_flag():
    help_text = build_parser().format_help()
    for name in HybridKVConfig.model_fields:
        assert "--hybridkv-" + name.replace("_", "-") in help_text


def test_resolve_splits_flags_and_sets_the_backend(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    config, rest = resolve(
        ["--model-path", "m", "--hybridkv-budget", "0.2", "--hybridkv-visual-only", "false"]
    )
    assert config.budget == 0.2 and config.visual_only is False
    assert rest == ["--model-path", "m", "--attention-backend", "hybridkv"]


def test_flags_override_a_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "c.json"
    path.write_text('{"budget": 0.3, "window": 8}')
    config, _ = resolve(["--hybridkv-config", str(path), "--hybridkv-window", "16"])
    assert (config.budget, config.window) == (0.3, 16)


def test_another_attention_backend_is_refused():
    with pytest.raises(HybridKVConfigError, match="--attention-backend flashinfer"):
        resolve(["--model-path", "m", "--attention-backend", "flashinfer"])
    _, rest = resolve(["--attention-backend=hybridkv"])
    assert rest == ["--attention-backend=hybridkv"]


def test_bad_flag_value_is_refused_with_the_range():
    with pytest.raises(HybridKVConfigError, match=r"budget must be in \(0, 1\], got 3.0"):
        resolve(["--hybridkv-budget", "3"])


def test_cpu_device_gets_sglang_cpu_environment(monkeypatch):
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    env = server_environment(HybridKVConfig(), ["--device", "cpu"])
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and json.loads(env[ENV_VAR])["budget"] == 0.1
    assert "SGLANG_USE_CPU_ENGINE" not in server_environment(HybridKVConfig(), ["--device", "cuda"])
