"""Let the registry's (CUDA) torchvision wheel import on a CPU-only torch.

Its compiled ops (torchvision::nms, ...) cannot load there, and ``import torchvision`` dies in
``_meta_registrations`` / ``_autograd_registrations``, which register fakes for those ops. SGLang
only needs the pure-torch transforms, so those two modules are made to skip their registrations
when the ops are absent. Applied to the venv's installed copy; idempotent.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

MARKER = "# hybridkv devtools: skip registrations when torchvision's compiled ops are missing\n"
GUARD = (
    MARKER + "import torch\n"
    "if hasattr(torch.ops.torchvision, 'nms'):\n"
    "    import torchvision.{name}_impl  # noqa: F401\n"
)


def main() -> None:
    spec = find_spec("torchvision")
    assert spec is not None and spec.origin, "torchvision is not installed"
    package = Path(spec.origin).parent
    for name in ("_meta_registrations", "_autograd_registrations"):
        module = package / f"{name}.py"
        if module.read_text().startswith(MARKER):
            continue
        module.rename(package / f"{name}_impl.py")
        module.write_text(GUARD.format(name=name))
    print("[setup] torchvision: compiled-op registrations guarded")


if __name__ == "__main__":
    main()
