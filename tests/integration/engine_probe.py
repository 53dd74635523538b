"""Run ``sglang.Engine`` with hybridkv in a process of its own and print its results as JSON.

``Engine.shutdown()`` kills every child of its process, so the test must not host the Engine in
the pytest process that also owns the session's servers.

    python engine_probe.py MODEL_DIR PROMPT IMAGE_B64 MAX_NEW_TOKENS
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    model, prompt, image, max_new_tokens = sys.argv[1:5]
    import sglang

    engine = sglang.Engine(
        model_path=model,
        device="cpu",
        attention_backend="hybridkv",
        disable_cuda_graph=True,
        dtype="float32",
        max_total_tokens=8192,
        context_length=4096,
        max_running_requests=4,
        skip_server_warmup=True,
        log_level="warning",
    )
    try:
        out = engine.generate(
            prompt=prompt,
            image_data=[image],
            sampling_params={
                "max_new_tokens": int(max_new_tokens),
                "temperature": 0.0,
                "ignore_eos": True,
            },
        )
        snapshot = engine.get_server_info()["internal_states"][0]["hybridkv"]
    finally:
        engine.shutdown()
    print("ENGINE_RESULT " + json.dumps({"output": out, "hybridkv": snapshot}))


if __name__ == "__main__":
    main()
