"""Print SGLang's own requirements minus the CUDA-only packages, for a CPU development venv.

SGLang pins a CUDA torch and a dozen GPU kernel packages that cannot run (or even install sanely)
on a CPU-only machine; everything else it needs is installed as declared. torchcodec is left out
too: it loads the system's FFmpeg libraries, which a bare machine lacks, and SGLang falls back to
decord (installed by setup_cpu_env.sh) when torchcodec does not import.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

CUDA_ONLY = {
    "sglang-kernel",
    "flashinfer-python",
    "flash-attn-4",
    "cuda-python",
    "nvidia-cutlass-dsl",
    "nvidia-mathdx",
    "sgl-deep-ep",
    "sgl-deep-gemm",
    "sgl-flash-mla",
    "tilelang",
    "quack-kernels",
    "humming-kernels",
    "nvshmem4py-cu13",
    "torch-memory-saver",
    "torchaudio",
    "torchcodec",
    "timm",
    "torch",
    "torchvision",
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main() -> int:
    for requirement in requires("sglang") or []:
        if "extra ==" in requirement or _name(requirement) in CUDA_ONLY:
            continue
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
