"""Stage SGLang's Triton decode-attention kernel for a device machine that has no sglang.

The lent GPU machine has torch and triton but neither sglang nor room to carry it (64 MiB a call).
SGLang's ``decode_attention_fwd`` lives in three files that need from sglang only a few names:
env flags (``sglang.srt.environ.envs``, read with ``.get()``), HIP checks and the device core
count (``sglang.srt.utils``) and ``unpack_aux_tensors`` (``score_mod.py``, which is copied).
``stage_sglang_kernels(dest)`` copies the three files out of the locally installed sglang into
``dest/sglang/kernels/ops/attention/`` and writes tiny stand-ins for those names, so that with
``dest`` first on ``sys.path``::

    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

work with plain torch and triton. The stand-ins cover only what the copied files import; staging
fails loudly when a newer sglang imports anything else. Env flags are frozen at SGLang's defaults,
which are read out of the installed ``sglang/srt/environ.py`` (by parsing it, not importing it).

    python bench/device_sglang.py stage .device   # locally, before a device run carrying .device
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import re
import shutil
import sys
from pathlib import Path

KERNEL_FILES = ("decode_attention.py", "metadata.py", "score_mod.py")
KERNEL_PACKAGE = "sglang.kernels.ops.attention"

# What the copied files import from sglang, and how each import is served once staged.
_STAGED_MODULES = {f"{KERNEL_PACKAGE}.{name[:-3]}" for name in KERNEL_FILES}
_STOOD_IN_MODULES = {"sglang.srt.environ", "sglang.srt.utils"}
# Imported lazily on paths that a CUDA device never takes (decode_attention.py: the gfx950 MLA
# tuning, HIP with ``SGLANG_MLA_DECODE_TUNE`` set only). Not staged; reaching it raises ImportError.
_UNREACHED_MODULES = {"sglang.srt.runtime_context"}

_UTILS_STAND_IN = '''"""Stand-in for ``sglang.srt.utils``, staged by bench/device_sglang.py: only
the names that the staged decode-attention files import, each as SGLang's own
``srt/utils/common.py`` defines it."""

import torch


def is_hip() -> bool:
    return torch.version.hip is not None


def _hip_arch_has(name: str) -> bool:
    if not torch.version.hip:
        return False
    return name in torch.cuda.get_device_properties(0).gcnArchName


def is_gfx95_supported() -> bool:
    return _hip_arch_has("gfx95")


def is_gfx1250_supported() -> bool:
    return _hip_arch_has("gfx1250")


def get_device_core_count(device_id: int = 0) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_id).multi_processor_count
    return 0
'''
_UTILS_NAMES = {"is_hip", "is_gfx95_supported", "is_gfx1250_supported", "get_device_core_count"}

_ENVIRON_STAND_IN = '''"""Stand-in for ``sglang.srt.environ``, staged by bench/device_sglang.py:
``envs.<FLAG>.get()`` returns SGLang's default for each flag the staged files read (the
environment is not consulted)."""


class _Flag:
    def __init__(self, default):
        self.default = default

    def get(self):
        return self.default


class _Envs:
    pass


envs = _Envs()
{flags}'''

_PACKAGE_INIT = '''"""Stand-in package staged by bench/device_sglang.py (copied from sglang
{version}); holds only SGLang's Triton decode-attention kernel files and the stand-ins they
import."""
'''


def installed_sglang_dir() -> Path:
    """The installed ``sglang`` package folder, found without importing sglang."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sglang is not installed here: stage on a machine that has it")
    return Path(next(iter(spec.submodule_search_locations)))


def _sglang_imports(source: str) -> dict[str, set[str]]:
    """Every ``from sglang... import names`` / ``import sglang...`` in a file, nested ones too."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sglang":
            found.setdefault(node.module, set()).update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sglang":
                    found.setdefault(alias.name, set())
    return found


def env_flags_read(sources: dict[str, str]) -> list[str]:
    """The ``envs.<FLAG>`` names the staged files read."""
    return sorted({m for text in sources.values() for m in re.findall(r"\benvs\.(\w+)", text)})


def env_defaults(environ_py: Path, names: list[str]) -> dict[str, object]:
    """SGLang's default for each flag: the literal first argument of ``NAME = EnvXxx(default)``
    in ``class Envs`` of ``sglang/srt/environ.py``."""
    tree = ast.parse(environ_py.read_text())
    envs_class = next(
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Envs"
    )
    defaults: dict[str, object] = {}
    for node in envs_class.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in names
            and isinstance(node.value, ast.Call)
            and node.value.args
        ):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value.args[0])
            except ValueError as err:  # a computed (e.g. platform) default: no literal to stage
                raise RuntimeError(f"{node.targets[0].id}: default is not a literal") from err
    missing = sorted(set(names) - set(defaults))
    if missing:
        raise RuntimeError(f"no default found in {environ_py} for {missing}")
    return {name: defaults[name] for name in names}


def stage_sglang_kernels(dest: Path) -> Path:
    """Copy SGLang's decode-attention kernel files and write the stand-ins under ``dest``.

    Replaces ``dest/sglang`` if present. Returns ``dest`` (the folder to put first on
    ``sys.path``). Raises RuntimeError if the installed files import anything not covered.
    """
    dest = Path(dest)
    src_root = installed_sglang_dir()
    src_dir = src_root.joinpath(*KERNEL_PACKAGE.split(".")[1:])
    sources = {name: (src_dir / name).read_text() for name in KERNEL_FILES}

    for name, text in sources.items():
        for module, names in _sglang_imports(text).items():
            if module in _STAGED_MODULES or module in _UNREACHED_MODULES:
                continue
            if module == "sglang.srt.utils" and names <= _UTILS_NAMES:
                continue
            if module == "sglang.srt.environ" and names <= {"envs"}:
                continue
            raise RuntimeError(f"{name} imports {sorted(names)} from {module}: no stand-in")

    root = dest / "sglang"
    if root.exists():
        shutil.rmtree(root)
    kernel_dir = root.joinpath(*KERNEL_PACKAGE.split(".")[1:])
    kernel_dir.mkdir(parents=True)
    (root / "srt").mkdir()
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    init = _PACKAGE_INIT.format(version=version)
    for package in (root, root / "kernels", root / "kernels" / "ops", kernel_dir, root / "srt"):
        (package / "__init__.py").write_text(init)
    for name, text in sources.items():
        (kernel_dir / name).write_text(text)
    (root / "srt" / "utils.py").write_text(_UTILS_STAND_IN)
    defaults = env_defaults(src_root / "srt" / "environ.py", env_flags_read(sources))
    flags = "".join(f"envs.{name} = _Flag({value!r})\n" for name, value in defaults.items())
    (root / "srt" / "environ.py").write_text(_ENVIRON_STAND_IN.replace("{flags}", flags))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stage = sub.add_parser("stage", help="stage the kernel files and stand-ins into DEST")
    stage.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    dest = stage_sglang_kernels(args.dest)
    size = sum(p.stat().st_size for p in (dest / "sglang").rglob("*") if p.is_file())
    print(f"staged sglang decode attention into {dest / 'sglang'} ({size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
