"""A prefix-cache hit still prefills the observation window.

Tokens served from the radix cache have no queries, so a turn whose new text is shorter than the
window (a follow-up question about the same images, a repeated prompt) would be planned from
fewer than ``w`` window rows. An AFTER hook on ``Req._compute_max_prefix_len`` caps the prefix
match of a request that will be compressed at ``N - w``: everything before the window is still
served from the tree, the last ``w`` tokens are prefilled again, and SGLang's own checkpoint frees
their duplicate slots. SGLang caps the matches of sliding-window models the same way
(``swa_reprefill_tail_tokens``). The cap runs in the scheduler process, where the backend factory
installs the config; servers without the ``hybridkv`` backend are untouched.
"""

from __future__ import annotations

from typing import Any

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.runtime.activation import is_active
from hybridkv_sglang.runtime.requests import dense_reason_of, span_tokens, visual_spans_of

_config: HybridKVConfig | None = None


def install(config: HybridKVConfig | None) -> None:
    """Set this scheduler process's config (``None``: never cap)."""
    global _config
    _config = config


def window_prefix_cap(prompt_len: int, visual_tokens: int, config: HybridKVConfig) -> int | None:
    """The longest prefix a request may take from the cache, or ``None`` when it stays dense."""
    if dense_reason_of(prompt_len, visual_tokens, config) is not None:
        return None
    return max(prompt_len - config.window, 0)


def cap_prefix_for_window(result: Any, req: Any, input_len: int, *args: Any, **kw: Any) -> Any:
    """AFTER hook of ``Req._compute_max_prefix_len(input_len)``: leave the window to prefill."""
    if not is_active():
        return result
    config = _config
    if config is None or not isinstance(result, int):
        return result
    spans = visual_spans_of(getattr(req, "multimodal_inputs", None), input_len)
    cap = window_prefix_cap(input_len, span_tokens(spans), config)
    return result if cap is None else min(result, cap)
