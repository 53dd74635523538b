"""A video through the OpenAI-compatible chat API, against a server started by ``hybridkv-serve``,
then hybridkv's record of that request from ``/server_info``: how much of its KV cache it kept.

    hybridkv-serve --model-path Qwen/Qwen2.5-VL-7B-Instruct --port 30000
    python examples/video_client.py --url http://127.0.0.1:30000 --video clip.mp4

The server decodes the video (SGLang uses torchcodec, else decord: ``pip install decord``). The
video travels in the request as a data URL, so the server need not see the client's files.
Without ``--video`` a short clip of moving shapes is generated (``pip install av``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openai import OpenAI

from hybridkv_sglang.report import describe, request_record
from hybridkv_sglang.testing.images import file_data_url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--video", type=Path, help="a video file (default: a generated one)")
    parser.add_argument("--frames", type=int, default=8, help="frames of the generated video")
    parser.add_argument("--question", default="What moves in this video, and where does it go?")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.video is None:
        from hybridkv_sglang.testing.videos import DEFAULT_FPS, video_data_url

        url = video_data_url(args.frames, 448, 448, seed=0)
        print(f"video: generated, {args.frames} frames of 448x448 at {DEFAULT_FPS} fps")
    else:
        url = file_data_url(args.video)
        print(f"video: {args.video}")

    client = OpenAI(base_url=f"{args.url}/v1", api_key="none")
    reply = client.chat.completions.create(
        model="default",
        temperature=0,
        max_tokens=args.max_tokens,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": args.question},
                ],
            }
        ],
    )
    print("answer:", reply.choices[0].message.content)
    print(f"prompt tokens: {reply.usage.prompt_tokens}")

    try:
        record, entry_bytes = request_record(args.url, reply.id)
    except KeyError as err:
        print(f"{err.args[0]} (is this a hybridkv server?)")
        return 1
    print(f"visual tokens: {record['visual_tokens']}")
    print(f"hybridkv {describe(record, entry_bytes)}")
    print("hybridkv record:", json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
