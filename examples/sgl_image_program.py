"""An SGLang frontend program with ``sgl.image``, against a server started by ``hybridkv-serve``.

hybridkv-serve --model-path Qwen/Qwen2.5-VL-7B-Instruct --port 30000
python examples/sgl_image_program.py --url http://127.0.0.1:30000 --image photo.jpg
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import sglang as sgl

from hybridkv_sglang.report import describe, request_record


@sgl.function
def look_twice(s, image_path: str):
    s += sgl.user(sgl.image(image_path) + "Describe this picture in one sentence.")
    s += sgl.assistant(sgl.gen("description", max_tokens=64, temperature=0))
    s += sgl.user("What is the most prominent colour in it?")
    s += sgl.assistant(sgl.gen("colour", max_tokens=16, temperature=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--image", type=Path, help="an image file (default: a generated one)")
    parser.add_argument("--chat-template", default="qwen2-vl")
    args = parser.parse_args()
    image = args.image
    if image is None:
        from hybridkv_sglang.testing.images import make_test_image

        image = Path(tempfile.mkdtemp()) / "generated.png"
        make_test_image(448, 448, seed=0).save(image)
    backend = sgl.RuntimeEndpoint(args.url, chat_template_name=args.chat_template)
    state = look_twice.run(image_path=str(image), backend=backend)
    for name in ("description", "colour"):
        print(f"{name}:", state[name])
        record, entry_bytes = request_record(args.url, state.get_meta_info(name)["id"])
        print(f"  hybridkv {describe(record, entry_bytes)}")


if __name__ == "__main__":
    main()
