"""A multi-turn agent loop that resends the same image every turn, as agents do.

Each turn's prompt starts with the same image, so SGLang's radix cache serves the image prefix
(``cached_tokens`` grows) and hybridkv compresses each turn afresh for its own question.

    hybridkv-serve --model-path Qwen/Qwen2.5-VL-7B-Instruct --port 30000
    python examples/multi_turn_agent.py --url http://127.0.0.1:30000 --image screen.png
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import requests

from hybridkv_sglang.report import describe, request_record

QUESTIONS = [
    "Describe the screen.",
    "Which element should I click to continue?",
    "What text is in the top-left corner?",
    "Is there anything unusual in the picture?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--image", type=Path, help="an image file (default: a generated one)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.image is None:
        from hybridkv_sglang.testing.images import image_base64

        image = image_base64(448, 448, seed=0)
    else:
        image = base64.b64encode(args.image.read_bytes()).decode("ascii")

    conversation = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    first_user = "<|vision_start|><|image_pad|><|vision_end|>"
    compressed = 0
    for turn, question in enumerate(QUESTIONS):
        conversation += f"<|im_start|>user\n{first_user if turn == 0 else ''}{question}<|im_end|>\n"
        conversation += "<|im_start|>assistant\n"
        response = requests.post(
            f"{args.url}/generate",
            json={
                "text": conversation,
                "image_data": [image],
                "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0},
            },
            timeout=600,
        ).json()
        meta = response["meta_info"]
        conversation += response["text"] + "<|im_end|>\n"
        print(f"turn {turn + 1}: {question}")
        print(f"  -> {response['text']!r}")
        print(f"  prompt {meta['prompt_tokens']} tokens, {meta['cached_tokens']} cached")
        record, entry_bytes = request_record(args.url, meta["id"])
        print(f"  hybridkv {describe(record, entry_bytes)}")
        compressed += record["compressed"]
    print(f"hybridkv compressed {compressed} of {len(QUESTIONS)} turns")


if __name__ == "__main__":
    main()
