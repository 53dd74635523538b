"""`make demo`: a real SGLang server with hybridkv on this CPU, one image conversation of two turns.

Builds a tiny random-weight Qwen2.5-VL (so the answers are gibberish: the point is the serving
path), starts ``hybridkv-serve``, asks about two images, follows up in a second turn that reuses
the cached image prefix, and prints the answers and what hybridkv did to each request.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

from hybridkv_sglang.config import HybridKVConfig
from hybridkv_sglang.report import describe, request_record
from hybridkv_sglang.testing.images import image_base64
from hybridkv_sglang.testing.server import launch_server
from hybridkv_sglang.testing.tiny_model import build_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def turn(question: str, images: int = 0) -> str:
    return f"<|im_start|>user\n{IMAGE * images}{question}<|im_end|>\n<|im_start|>assistant\n"


def ask(base_url: str, prompt: str, image_data: list[str]) -> dict:
    body = {
        "text": prompt,
        "image_data": image_data,
        "sampling_params": {"max_new_tokens": 16, "temperature": 0.0},
    }
    response = requests.post(f"{base_url}/generate", json=body, timeout=300)
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "demo")
    args = parser.parse_args(argv)

    print("building a tiny random-weight Qwen2.5-VL ...", flush=True)
    model = build_tiny_qwen2_5_vl(args.work_dir / "model")
    config = HybridKVConfig(budget=args.budget)
    print(f"starting hybridkv-serve on CPU with {config.model_dump_json()} ...", flush=True)
    started = time.monotonic()
    with launch_server(model, hybridkv=config, log_path=args.work_dir / "server.log") as server:
        print(f"server up in {time.monotonic() - started:.0f} s at {server.base_url}\n")
        pictures = [image_base64(448, 448, seed=1), image_base64(448, 448, seed=2)]

        first_prompt = turn("What differs between these two pictures?", images=2)
        first = ask(server.base_url, first_prompt, pictures)
        history = first_prompt + first["text"] + "<|im_end|>\n"
        second = ask(server.base_url, history + turn("Which one is brighter?"), pictures)

        for name, answer in (("turn 1", first), ("turn 2", second)):
            meta = answer["meta_info"]
            print(f"{name}: {answer['text']!r}")
            cached = meta["cached_tokens"]
            print(f"  prompt {meta['prompt_tokens']} tokens, {cached} from the prefix cache")
            print(f"  hybridkv {describe(*request_record(server.base_url, meta['id']))}\n")
    print(f"server log: {args.work_dir / 'server.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
