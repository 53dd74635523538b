"""What a client can read back about its requests from a hybridkv server, and one line saying
what compression did to a request (the examples print it).

Everything comes from SGLang's ``GET /server_info``: each scheduler's ``internal_states`` entry
carries a ``hybridkv`` snapshot (per-request records, totals, the KV entry size). A server with
several schedulers (data parallel) has one entry each; a request's record is in the entry of the
scheduler that served it.
"""

from __future__ import annotations

from typing import Any

import requests

MIB = 1024 * 1024


def hybridkv_snapshots(base_url: str) -> list[dict[str, Any]]:
    """Every scheduler's hybridkv snapshot (empty for a server without hybridkv)."""
    info = requests.get(f"{base_url}/server_info", timeout=60)
    info.raise_for_status()
    return [s["hybridkv"] for s in info.json().get("internal_states", []) if "hybridkv" in s]


def request_record(base_url: str, rid: str) -> tuple[dict[str, Any], int]:
    """The request's record and the server's bytes per KV entry (K and V of one token, layer
    and kv head); ``KeyError`` if no scheduler knows the request (recent ones are kept)."""
    for snapshot in hybridkv_snapshots(base_url):
        if rid in snapshot["requests"]:
            return snapshot["requests"][rid], int(snapshot.get("kv_entry_bytes", 0))
    raise KeyError(f"no hybridkv record of request {rid!r} at {base_url}")


def describe(record: dict[str, Any], kv_entry_bytes: int) -> str:
    """One line: served dense and why, or what was kept, read and saved."""
    if not record["compressed"]:
        return f"served dense ({record['dense_reason']}), {record['prompt_tokens']} prompt tokens"
    kept, total = record["kept_entries"], record["prompt_entries"]
    kept_mib, total_mib = kept * kv_entry_bytes / MIB, total * kv_entry_bytes / MIB
    if record["storage"] == "compact":
        saving = f"{total_mib - kept_mib:.2f} MiB of KV freed"
    else:
        saving = "in place: the dense prefix stays resident, decode reads only the kept part"
    budget = record["extra"].get("budget")
    at_budget = "" if budget is None else f" at a budget of {budget:.1%}"
    return (
        f"compressed {record['prompt_tokens']} prompt tokens ({record['visual_tokens']} visual)"
        f"{at_budget}: "
        f"{record['static_heads']} static / {record['dynamic_heads']} dynamic heads, "
        f"kept {kept / total:.1%} of the prompt KV ({kept_mib:.2f} of {total_mib:.2f} MiB), "
        f"read {record['read_fraction']:.1%} per decode step; {saving}"
    )
