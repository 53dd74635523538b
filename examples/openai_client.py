"""The OpenAI-compatible chat API with an image, against a server started by ``hybridkv-serve``,
then what hybridkv did to the request (from ``/server_info``). ``--budget`` sets this request's
own budget (``extra_body={"custom_params": {"hybridkv": {"budget": ...}}}``).

    hybridkv-serve --model-path Qwen/Qwen2.5-VL-7B-Instruct --port 30000
    python examples/openai_client.py --url http://127.0.0.1:30000 --image photo.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openai import OpenAI

from hybridkv_sglang.report import describe, request_record
from hybridkv_sglang.testing.images import file_data_url, image_data_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--image", type=Path, help="an image file (default: a generated one)")
    parser.add_argument("--question", default="What is in this image?")
    parser.add_argument("--budget", type=float, help="this request's budget (default: server's)")
    args = parser.parse_args()
    url = image_data_url(448, 448, seed=0) if args.image is None else file_data_url(args.image)

    client = OpenAI(base_url=f"{args.url}/v1", api_key="none")
    own_budget = {} if args.budget is None else {"budget": args.budget}
    reply = client.chat.completions.create(
        model="default",
        temperature=0,
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": args.question},
                ],
            }
        ],
        extra_body={"custom_params": {"hybridkv": own_budget}},
    )
    print("answer:", reply.choices[0].message.content)
    print("usage:", reply.usage)
    print("hybridkv", describe(*request_record(args.url, reply.id)))


if __name__ == "__main__":
    main()
