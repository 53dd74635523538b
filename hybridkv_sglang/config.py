"""HybridKVConfig: every knob of the method, validated once at start-up.

The config reaches SGLang's spawned scheduler processes through the environment variable
``HYBRIDKV_CONFIG`` (JSON text or a path to a JSON file), because SGLang has no generic custom
server arguments and children inherit the environment. Policies never see this object: the
runtime turns it into plain values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridkv_sglang.policy import build_policy
from hybridkv_sglang.policy.classify import dynamic_fraction_cap

ENV_VAR = "HYBRIDKV_CONFIG"
REQUEST_PARAMS_KEY = "hybridkv"
"""A request's own settings: ``sampling_params.custom_params["hybridkv"]`` (``/generate``) or
``custom_params`` in the OpenAI API's body (``extra_body`` in the OpenAI client)."""

PolicyName = Literal[
    "hybridkv",
    "snapkv",
    "streaming",
    "all_static",
    "all_dynamic",
    "adakv",
    "pyramidkv",
    "flashcache",
    "lookm",
]
StorageMode = Literal["in_place", "compact"]
StaticPriority = Literal["text", "focus"]
DynamicTopK = Literal["fixed", "budget"]
DynamicCap = Literal["fixed", "budget"]
DecodeKernel = Literal["auto", "triton", "torch"]
BoundPrecision = Literal["kv", "uint8"]


_Model = TypeVar("_Model", bound=BaseModel)


class HybridKVConfigError(ValueError):
    """A configuration value is out of range; raised at start-up, before any request is served."""


class HybridKVConfig(BaseModel):
    """Per-request KV compression after multimodal prefill (DESIGN §2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="false serves every request dense (plugin idle)")
    policy: PolicyName = Field(
        "hybridkv",
        description="hybridkv (the method) or a baseline run by the same machinery: snapkv, "
        "streaming, all_static, all_dynamic, adakv, pyramidkv, flashcache, lookm (needs "
        "storage compact)",
    )
    budget: float = Field(
        0.1,
        description="fraction of the prompt's dense KV bytes a request reads per decode step "
        "(kept entries and retrieval metadata), in (0, 1]; in compact storage also about what "
        "it holds on the device",
    )
    budget_tokens: int | None = Field(
        None, description="absolute per-head budget in tokens; overrides `budget` when set"
    )
    theta: float = Field(0.9, description="attention mass a window row's focus set must reach")
    window: int = Field(
        32,
        description="observation window: last prompt tokens, kept by every head (at most the "
        "per-head budget of the request: floors scale down with the budget)",
    )
    sink: int = Field(4, description="first prompt tokens, kept within what the window leaves")
    chunk_size: int = Field(16, description="tokens per retrieval chunk of dynamic heads")
    top_k_chunks: int = Field(8, description="chunks a dynamic head retrieves per decode step")
    bound_channels: int | None = Field(
        16,
        ge=1,
        description="key channels a dynamic head's chunk bounds cover (the r with the largest "
        "query-weighted key range in the observation window; None: all D). The bounds cost "
        "2 x r values per chunk of chunk_size tokens, read every step and held on the device: "
        "r / (D x chunk_size) of the head's KV at kv precision",
    )
    bound_precision: BoundPrecision = Field(
        "uint8",
        description="chunk bounds in the KV dtype (kv) or as 8-bit codes rounded outward per "
        "(head, channel) (uint8: 1 byte a value, still a bound; plus 12 bytes of channel id, "
        "offset and scale per bounded channel and head)",
    )
    max_dynamic_fraction: float = Field(
        0.5,
        description="cap on the fraction of (layer, kv head) pairs classified dynamic (at budget "
        "0.1 when dynamic_cap is budget)",
    )
    pool_kernel: int = Field(7, description="max-pool width smoothing static-head scores (odd)")
    static_priority: StaticPriority = Field(
        "focus",
        description="static heads keep sink + window, then: focus (the head's own focus set "
        "first, then text, then visual tokens) or text (text tokens before visual, the design's "
        "text prior)",
    )
    dynamic_top_k: DynamicTopK = Field(
        "budget",
        description="chunks a dynamic head retrieves per step: budget (at most top_k_chunks, "
        "capped so a dynamic head reads no more than the mean per-head budget, at least one "
        "chunk) or fixed (top_k_chunks whatever the budget, the design)",
    )
    dynamic_window_share: float = Field(
        0.25,
        description="share of the per-head budget a dynamic head's resident window may take "
        "(at most `window`); the rest retrieves chunks. 1.0: the static heads' window, which "
        "under tight budgets leaves dynamic heads nothing to retrieve",
    )
    dynamic_cap: DynamicCap = Field(
        "budget",
        description="budget: at most max_dynamic_fraction of the heads are dynamic at budget "
        "0.1, more (up to all) as the budget tightens, in inverse proportion; fixed: "
        "max_dynamic_fraction at every budget (the design)",
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

    decode_kernel: DecodeKernel = Field(
        "auto",
        description="decode attention over the folded tables: triton (SGLang's own Triton decode "
        "kernel and the table kernels; no host plan, CUDA-graph safe), torch (the reference "
        "twins; the CPU path) or auto (triton on GPUs, torch on CPU)",
    )
    decode_max_kv_splits: int = Field(
        64,
        ge=1,
        le=256,
        description="most KV splits of one folded row; rows get splits in proportion to their "
        "length so that a step launches about 16 programs per GPU core",
    )
    decode_table_entries: int | None = Field(
        None,
        ge=1,
        description="folded entries one layer's decode table may hold in CUDA graphs (int64 "
        "each); default 2 x the largest graph batch x the context length, twice SGLang's own "
        "index buffer; a batch needing more decodes without a graph",
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

    @field_validator("min_prompt_tokens", "host_tier_mib")
    @classmethod
    def _non_negative(cls, v: float, info: Any) -> float:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _policy_accepts_values(self) -> HybridKVConfig:
        """The policy validates its own hyper-parameters; building it once checks them all."""
        policy = build_policy(self.policy, **self.policy_values())
        if policy.merges_evicted and self.storage != "compact":
            raise ValueError(
                f"policy {self.policy!r} merges evicted KV into kept KV, which only compact "
                f"storage can hold (the prefix slots are shared with the radix cache); set "
                f"storage='compact', got {self.storage!r}"
            )
        return self

    POLICY_FIELDS: ClassVar[tuple[str, ...]] = (
        "budget",
        "budget_tokens",
        "theta",
        "window",
        "sink",
        "chunk_size",
        "top_k_chunks",
        "bound_channels",
        "bound_precision",
        "max_dynamic_fraction",
        "pool_kernel",
        "static_priority",
        "dynamic_top_k",
        "dynamic_window_share",
        "dynamic_cap",
    )

    def most_dynamic_fraction(self) -> float:
        """The largest share of dynamic heads a request at the server's budget can have (sizes
        the chunk-bound pools); an absolute ``budget_tokens`` may be any fraction of a prompt."""
        if self.budget_tokens is not None and self.dynamic_cap == "budget":
            return 1.0 if self.max_dynamic_fraction > 0 else 0.0
        return dynamic_fraction_cap(self.max_dynamic_fraction, self.budget, self.dynamic_cap)

    def policy_values(self) -> dict[str, Any]:
        """The policy's hyper-parameters as plain values (policies never see this object)."""
        return {name: getattr(self, name) for name in self.POLICY_FIELDS}

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


class RequestSettings(BaseModel):
    """What one request may set for itself: its budget, or no compression at all."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    enabled: bool | None = None
    budget: float | None = None
    budget_tokens: int | None = None


def _validated(model: type[_Model], values: Any, source: str) -> _Model:
    """``values`` as ``model``; a ``HybridKVConfigError`` reading ``"<source>: <problems>"``."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise HybridKVConfigError(f"{source}: {problems}") from None


def _describe(error: Any) -> str:
    """One pydantic error as "field: message" (a range error keeps its own wording)."""
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {message}" if where else message
