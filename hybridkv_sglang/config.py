"""HybridKVConfig: every knob of the method, validated once at start-up.

The config reaches SGLang's spawned scheduler processes through the environment variable
``HYBRIDKV_CONFIG`` (JSON text or a path to a JSON file), because SGLang has no generic custom
server arguments and children inherit the environment. Policies never see this object: the
runtime turns it into plain values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from hybridkv_sglang.kernels.host_staging import MAX_STAGE_SLOTS
from hybridkv_sglang.policy import POLICIES, build_policy
from hybridkv_sglang.policy.classify import dynamic_fraction_cap
from hybridkv_sglang.policy.hyperparameters import declared_hyperparameters
from hybridkv_sglang.policy.registry import all_hyperparameters

ENV_VAR = "HYBRIDKV_CONFIG"
REQUEST_PARAMS_KEY = "hybridkv"
"""A request's own settings: ``sampling_params.custom_params["hybridkv"]`` (``/generate``) or
``custom_params`` in the OpenAI API's body (``extra_body`` in the OpenAI client)."""

PolicyName = Literal[tuple(POLICIES)]  # type: ignore[valid-type]
"""Every registered policy (``hybridkv_sglang.policy.POLICIES``)."""
HYPERPARAMETERS = all_hyperparameters()
"""Every registered policy's hyper-parameters: name -> (declaration, the policies declaring it)."""
StorageMode = Literal["in_place", "compact"]
DecodeKernel = Literal["auto", "triton", "torch"]


_Model = TypeVar("_Model", bound=BaseModel)


class HybridKVConfigError(ValueError):
    """A configuration value is out of range; raised at start-up, before any request is served."""


class _ConfigBase(BaseModel):
    """The server's own fields and every method of :data:`HybridKVConfig`, which adds one field
    per policy hyper-parameter (declared on the policy classes, read from the registry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="false serves every request dense (plugin idle)")
    policy: PolicyName = Field(
        "hybridkv",
        description="hybridkv (the method) or a baseline run by the same machinery: "
        + ", ".join(
            name + (" (needs storage compact)" if cls.merges_evicted else "")
            for name, cls in POLICIES.items()
            if name != "hybridkv"
        ),
    )
    min_prompt_tokens: int = Field(256, description="shorter prompts are served uncompressed")
    visual_only: bool = Field(True, description="compress only requests that carry images/video")
    storage: StorageMode = Field(
        "in_place",
        description="in_place: sparse reads over the dense prefix; compact: move kept KV into "
        "compact entries and release the dense prefix to the radix tree",
    )
    host_tier_mib: float = Field(
        1024.0,
        description="compact mode: pinned host buffer (MiB) holding dynamic heads' prompt KV; "
        "0 keeps dynamic heads' KV on the device",
    )
    staging_slack: float = Field(
        1.0,
        description="compact mode with a host tier: staging slots per dynamic head beyond one "
        "step's selected chunks, as a multiple of them (1.0: room for two steps' chunks, so a "
        "chunk selected again soon is not copied again). Each slot holds chunk_size KV entries "
        "on the device, counted in what the request holds",
    )

    decode_kernel: DecodeKernel = Field(
        "auto",
        description="decode attention over the folded tables: triton (the retrieval and "
        "folded-attention Triton kernels; no host plan, CUDA-graph safe), torch (the reference "
        "twins; the CPU path) or auto (triton on GPUs, torch on CPU)",
    )
    dense_below_crossover: bool = Field(
        True,
        description="on GPUs, a decode batch of in-place requests smaller than the device's "
        "measured crossover (runtime/decode/crossover.json; batch 8 on unknown GPUs) replays "
        "the wrapped backend's dense graph, which is faster there (full-cache answers); false "
        "decodes compressed requests sparse at every batch size (to measure answers)",
    )
    decode_max_kv_splits: int = Field(
        16,
        ge=1,
        le=256,
        description="most KV splits of one folded row when many rows run (raised to a fair share "
        "of the GPU when few do, at most 256); rows get splits in proportion to their length so "
        "that a step launches about 16 programs per GPU core (16: the best split count an H200 "
        "measured at batch 32, and what keeps the attention grid of large batches small)",
    )
    decode_metadata_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="decode metadata pool: fixed values (kept positions, compact entry ids) "
        "for this fraction of the KV pool's (token, layer, kv head) entries, 4 bytes each, "
        "counted before SGLang sizes its KV pool; 1.0 holds every request the KV pool can "
        "hold, a smaller pool may serve some requests dense",
    )

    @field_validator("min_prompt_tokens", "host_tier_mib", "staging_slack")
    @classmethod
    def _non_negative(cls, v: float, info: Any) -> float:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @field_validator(*HYPERPARAMETERS, check_fields=False)
    @classmethod
    def _in_range(cls, v: Any, info: Any) -> Any:
        """A hyper-parameter's bounds, as its policy states them (the same message)."""
        HYPERPARAMETERS[info.field_name][0].spec.check(info.field_name, v)
        return v

    @model_validator(mode="after")
    def _policy_accepts_values(self) -> HybridKVConfig:
        """Building the policy runs the checks no bound states (an odd ``pool_kernel``)."""
        policy = build_policy(self.policy, **self.policy_values())
        if policy.merges_evicted and self.storage != "compact":
            raise ValueError(
                f"policy {self.policy!r} merges evicted KV into kept KV, which only compact "
                f"storage can hold (the prefix slots are shared with the radix cache); set "
                f"storage='compact', got {self.storage!r}"
            )
        slots = self.max_stage_slots()
        if slots > MAX_STAGE_SLOTS:
            raise ValueError(
                f"staging_slack: (1 + staging_slack) x top_k_chunks = {slots} staging slots per "
                f"dynamic head, more than the staging kernel holds ({MAX_STAGE_SLOTS}); lower "
                f"staging_slack or top_k_chunks, or set host_tier_mib 0"
            )
        return self

    def max_stage_slots(self) -> int:
        """Staging slots of a host-tier dynamic head at most (0 without a host tier)."""
        if self.storage != "compact" or self.host_tier_mib <= 0:
            return 0
        return math.ceil((1 + self.staging_slack) * self.top_k_chunks)

    def most_dynamic_fraction(self) -> float:
        """The largest share of dynamic heads a request at the server's budget can have (sizes
        the chunk-bound pools); an absolute ``budget_tokens`` may be any fraction of a prompt."""
        if self.budget_tokens is not None and self.dynamic_cap == "budget":
            return 1.0 if self.max_dynamic_fraction > 0 else 0.0
        return dynamic_fraction_cap(self.max_dynamic_fraction, self.budget, self.dynamic_cap)

    def policy_values(self) -> dict[str, Any]:
        """The hyper-parameters the configured policy declares, as plain values (policies never
        see this object; another policy's fields wait unused)."""
        return {
            name: getattr(self, name) for name in declared_hyperparameters(POLICIES[self.policy])
        }

    def to_env(self) -> str:
        """JSON text for ``HYBRIDKV_CONFIG``, inherited by SGLang's spawned processes."""
        return self.model_dump_json()

    @classmethod
    def parse(cls, text: str, source: str = ENV_VAR) -> HybridKVConfig:
        """Parse JSON text or a path to a JSON file; errors name the field and the allowed range."""
        stripped = text.strip()
        if not stripped.startswith("{"):
            path = Path(stripped)
            if not path.is_file():
                raise HybridKVConfigError(
                    f"{source} must be JSON text or a path to a JSON file; {stripped!r} is neither"
                )
            stripped = path.read_text()
            source = f"{source} ({path})"
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise HybridKVConfigError(f"{source} is not valid JSON: {err}") from None
        return cls.validated(values, f"invalid hybridkv config in {source}")

    @classmethod
    def validated(cls, values: Any, source: str) -> HybridKVConfig:
        """``values`` as a config; an error reads ``"<source>: <field>: <what is wrong>"``."""
        return _validated(cls, values, source)

    def with_values(self, values: dict[str, Any], source: str) -> HybridKVConfig:
        """This config with ``values`` replaced, validated as a whole (see ``validated``)."""
        return self.validated({**self.model_dump(), **values}, source)

    def for_request(self, custom_params: Any) -> HybridKVConfig:
        """This config as one request asked for it (``custom_params["hybridkv"]``), validated
        like the server's own config; the server's config when the request asks nothing."""
        asked = custom_params.get(REQUEST_PARAMS_KEY) if isinstance(custom_params, dict) else None
        if asked is None:
            return self
        source = f"custom_params.{REQUEST_PARAMS_KEY}"
        request = _validated(RequestSettings, asked, f"invalid {source}")
        if request.enabled and not self.enabled:
            raise HybridKVConfigError(
                f"{source}.enabled: this server runs with enabled=false, so no request can be "
                "compressed; start it with enabled=true"
            )
        update = request.model_dump(exclude_unset=True)
        if "budget" in update and "budget_tokens" not in update:
            update["budget_tokens"] = None  # the request's ratio wins over the server's tokens
        return self.with_values(update, f"invalid {source}")

    @classmethod
    def from_env(cls) -> HybridKVConfig:
        """The config of this process: ``HYBRIDKV_CONFIG`` if set, else the defaults."""
        text = os.environ.get(ENV_VAR)
        return cls() if text is None or not text.strip() else cls.parse(text)


def _description(name: str) -> str:
    """A hyper-parameter's config description: its doc, its range, the policies that read it."""
    declared, owners = HYPERPARAMETERS[name]
    text = declared.spec.doc
    if declared.spec.choices is None and declared.spec.range_text():
        text += f" ({declared.spec.range_text()})"
    return text if set(owners) == set(POLICIES) else f"{', '.join(owners)} only: {text}"


HybridKVConfig = create_model(
    "HybridKVConfig",
    __base__=_ConfigBase,
    __module__=__name__,
    __doc__="Per-request KV compression after multimodal prefill (DESIGN §2): the server's "
    "fields, then every registered policy's hyper-parameters (``docs/policies.md``).",
    **{
        name: (declared.annotation, Field(declared.default, description=_description(name)))
        for name, (declared, _) in HYPERPARAMETERS.items()
    },
)


class _RequestSettingsBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    enabled: bool | None = None


RequestSettings = create_model(
    "RequestSettings",
    __base__=_RequestSettingsBase,
    __module__=__name__,
    __doc__="What one request may set for itself: no compression at all, or the "
    "hyper-parameters declared ``per_request`` (its budget).",
    **{
        name: (declared.annotation | None, None)
        for name, (declared, _) in HYPERPARAMETERS.items()
        if declared.spec.per_request
    },
)


def _validated(model: type[_Model], values: Any, source: str) -> _Model:
    """``values`` as ``model``; a ``HybridKVConfigError`` reading ``"<source>: <problems>"``."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise HybridKVConfigError(f"{source}: {problems}") from None


def _describe(error: Any) -> str:
    """One pydantic error as "field: message" (a range error keeps its own wording, which
    already starts with the field)."""
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {message}" if where and not message.startswith(f"{where} ") else message
