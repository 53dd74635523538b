"""What a client can read back about its requests from a hybridkv server, and one line saying
what compression did to a request (the examples print it).

Everything comes from SGLang's ``GET /server_info``: each scheduler's ``internal_states`` entry
carries a ``hybridkv`` snapshot (per-request records, totals, the KV entry size). A server with
several schedulers (data parallel) has one entry each; a request's record is in the entry of the
scheduler that served it, and :func:`merged_snapshot` adds them up. Under tensor parallelism
each data-parallel replica reports from its first rank, and its plans' numbers (heads, kept
entries) cover the kv heads of every rank.
"""

from __future__ import annotations

from typing import Any

import requests

MIB = 1024 * 1024


def hybridkv_snapshots(base_url: str) -> list[dict[str, Any]]:
    """Every scheduler's hybridkv snapshot (empty for a server without hybridkv)."""
    info = requests.get(f"{base_url}/server_info", timeout=60)
    info.raise_for_status()
    return snapshots_of(info.json().get("internal_states", []))


def snapshots_of(internal_states: list[Any]) -> list[dict[str, Any]]:
    """The hybridkv snapshots among ``/server_info``'s ``internal_states`` entries."""
    return [s["hybridkv"] for s in internal_states if isinstance(s, dict) and "hybridkv" in s]


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """One snapshot for the whole server: counts summed over the schedulers (totals, live
    requests, memory), request records united, the KV entry size kept (the same everywhere)."""
    merged: dict[str, Any] = {}
    for snapshot in snapshots:
        _add_into(merged, snapshot)
    return merged


def _add_into(merged: dict[str, Any], snapshot: dict[str, Any]) -> None:
    for key, value in snapshot.items():
        if key == "kv_entry_bytes":
            merged[key] = value
        elif key == "requests" and isinstance(value, dict):  # records by rid: united
            merged.setdefault(key, {}).update(value)
        elif isinstance(value, dict):
            _add_into(merged.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = merged.get(key, 0) + value
        else:
            merged.setdefault(key, value)


def merged_snapshot(base_url: str) -> dict[str, Any]:
    """Every scheduler's hybridkv snapshot added up (see :func:`merge_snapshots`)."""
    return merge_snapshots(hybridkv_snapshots(base_url))


def merged_totals(base_url: str) -> dict[str, int]:
    """The server's running totals (requests, compressed requests, kept and prompt entries,
    prompt bytes and bytes read per decode step, decode steps...), summed over every
    scheduler."""
    return merged_snapshot(base_url).get("totals", {})


def request_record(base_url: str, rid: str) -> tuple[dict[str, Any], int]:
    """The request's record and the server's bytes per KV entry (K and V of one token, layer
    and kv head); ``KeyError`` if no scheduler knows the request (recent ones are kept)."""
    for snapshot in hybridkv_snapshots(base_url):
        if rid in snapshot["requests"]:
            return snapshot["requests"][rid], int(snapshot.get("kv_entry_bytes", 0))
    raise KeyError(f"no hybridkv record of request {rid!r} at {base_url}")


def describe(record: dict[str, Any], kv_entry_bytes: int) -> str:
    """One line: served dense and why, or what was kept, read (in bytes) and held."""
    if not record["compressed"]:
        return f"served dense ({record['dense_reason']}), {record['prompt_tokens']} prompt tokens"
    kept, total = record["kept_entries"], record["prompt_entries"]
    kept_mib, total_mib = kept * kv_entry_bytes / MIB, total * kv_entry_bytes / MIB
    device_mib = record["device_fraction"] * record["prompt_bytes"] / MIB
    index_mib = record["index_bytes"] / MIB
    if record["storage"] == "compact":
        saving = (
            f"holds {record['device_fraction']:.1%} of it on the device ({device_mib:.2f} MiB, "
            f"{total_mib - device_mib:.2f} MiB freed), {record['host_fraction']:.1%} on the "
            "host tier"
        )
    else:
        saving = (
            f"in place: the dense prefix stays resident with a {index_mib:.3f} MiB chunk index, "
            "decode reads only the kept part"
        )
    budget = record["extra"].get("budget")
    at_budget = "" if budget is None else f" at a budget of {budget:.1%}"
    return (
        f"compressed {record['prompt_tokens']} prompt tokens ({record['visual_tokens']} visual)"
        f"{at_budget}: "
        f"{record['static_heads']} static / {record['dynamic_heads']} dynamic heads, "
        f"kept {kept / total:.1%} of the prompt KV entries ({kept_mib:.2f} of {total_mib:.2f} "
        f"MiB), read {record['read_fraction']:.1%} of its bytes per decode step "
        f"({record['index_fraction']:.1%} chunk index); {saving}"
    )
