"""``hybridkv-serve``: ``sglang serve`` with ``--attention-backend hybridkv``.

Every ``sglang serve`` flag passes through unchanged; ``--hybridkv-<field>`` flags set the
HybridKVConfig, which is validated here (a bad value stops start-up before SGLang is even
imported, naming the flag as typed) and handed to SGLang's spawned processes through
``HYBRIDKV_CONFIG``. A ``--hybridkv-`` flag that names no field is an error, never passed on.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from typing import Any, get_args

from hybridkv_sglang.config import ENV_VAR, HybridKVConfig, HybridKVConfigError

FLAG_PREFIX = "--hybridkv-"
CPU_ENVIRONMENT = {"SGLANG_USE_CPU_ENGINE": "1", "TORCHDYNAMO_DISABLE": "1"}


def _flag(field: str) -> str:
    return FLAG_PREFIX + field.replace("_", "-")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridkv-serve",
        description="Start an SGLang server with hybridkv KV-cache compression. Every "
        "`sglang serve` flag is accepted unchanged (see `sglang serve --help`); the flags below "
        "configure hybridkv.",
        allow_abbrev=False,
    )
    group = parser.add_argument_group("hybridkv")
    group.add_argument(
        "--hybridkv-config",
        metavar="JSON_OR_PATH",
        help=f"a whole config as JSON text or a file path (same as {ENV_VAR}); "
        "--hybridkv-<field> flags override it",
    )
    for name, info in HybridKVConfig.model_fields.items():
        choices = get_args(info.annotation)
        kwargs: dict[str, Any] = {"default": None, "dest": f"hybridkv_{name}"}
        if info.annotation is bool:
            kwargs.update(type=_bool, metavar="BOOL")
        elif choices and all(isinstance(c, str) for c in choices):
            kwargs.update(choices=list(choices))
        elif info.annotation is float:
            kwargs.update(type=float)
        else:
            kwargs.update(type=int)
        group.add_argument(
            _flag(name), help=f"{info.description} (default: {info.default})", **kwargs
        )
    return parser


def _attention_backend(sglang_args: Sequence[str]) -> str | None:
    for i, arg in enumerate(sglang_args):
        if arg.startswith("--attention-backend="):
            return arg.split("=", 1)[1]
        if arg == "--attention-backend" and i + 1 < len(sglang_args):
            return sglang_args[i + 1]
    return None


def resolve(argv: Sequence[str]) -> tuple[HybridKVConfig, list[str]]:
    """Split argv into the validated hybridkv config and the flags meant for SGLang."""
    parser = build_parser()
    known, sglang_args = parser.parse_known_args(list(argv))
    _refuse_unknown_flags(sglang_args)
    base = os.environ.get(ENV_VAR) if known.hybridkv_config is None else known.hybridkv_config
    source = ENV_VAR if known.hybridkv_config is None else "--hybridkv-config"
    config = HybridKVConfig() if not base else HybridKVConfig.parse(base, source=source)
    overrides = {
        name: value
        for name in HybridKVConfig.model_fields
        if (value := getattr(known, f"hybridkv_{name}")) is not None
    }
    if overrides:
        config = _with_flags(config, overrides)
    chosen = _attention_backend(sglang_args)
    if chosen is None:
        sglang_args += ["--attention-backend", "hybridkv"]
    elif chosen != "hybridkv":
        raise HybridKVConfigError(
            f"hybridkv-serve sets --attention-backend hybridkv; got --attention-backend {chosen} "
            "(use `sglang serve` to serve without hybridkv)"
        )
    return config, sglang_args


def _refuse_unknown_flags(sglang_args: Sequence[str]) -> None:
    """A mistyped ``--hybridkv-`` flag would reach SGLang and be rejected there, or worse,
    accepted by a prefix; name it and the closest real one instead."""
    typed = [arg.split("=", 1)[0] for arg in sglang_args if arg.startswith(FLAG_PREFIX)]
    if not typed:
        return
    known = ["--hybridkv-config", *(_flag(name) for name in HybridKVConfig.model_fields)]
    close = difflib.get_close_matches(typed[0], known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise HybridKVConfigError(
        f"unknown flag {typed[0]}{hint}; `hybridkv-serve --help` lists the hybridkv flags"
    )


def _with_flags(config: HybridKVConfig, overrides: dict[str, Any]) -> HybridKVConfig:
    """``config`` with the flags' values; an error names the flags that cause it, as typed
    (the one flag that fails alone, or all of them when only their combination fails)."""
    try:
        return config.with_values(overrides, "--hybridkv-* flags")
    except HybridKVConfigError:
        culprits = [name for name in overrides if not _valid(config, {name: overrides[name]})]
        named = culprits or list(overrides)
        typed = ", ".join(f"{_flag(name)} {overrides[name]}" for name in named)
        return config.with_values(overrides, typed)


def _valid(config: HybridKVConfig, values: dict[str, Any]) -> bool:
    try:
        config.with_values(values, "")
    except HybridKVConfigError:
        return False
    return True


def server_environment(config: HybridKVConfig, sglang_args: Sequence[str]) -> dict[str, str]:
    """The environment for SGLang: the config, plus what SGLang needs to run on a CPU."""
    env = dict(os.environ)
    env[ENV_VAR] = config.to_env()
    joined = " ".join(sglang_args)
    if "--device cpu" in joined or "--device=cpu" in joined:
        for key, value in CPU_ENVIRONMENT.items():
            env.setdefault(key, value)
    return env


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or "-h" in args or "--help" in args:
        build_parser().print_help()
        return
    try:
        config, sglang_args = resolve(args)
    except HybridKVConfigError as err:
        sys.exit(f"hybridkv-serve: {err}")
    os.environ.update(server_environment(config, sglang_args))
    print(f"hybridkv-serve: {config.model_dump_json()}", file=sys.stderr, flush=True)
    from sglang.cli.main import main as sglang_main

    sys.argv = ["sglang", "serve", *sglang_args]
    sglang_main()


if __name__ == "__main__":
    main()
