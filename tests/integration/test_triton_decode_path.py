"""The GPU decode path inside real servers: compressing servers decoding through the Triton
kernels (one-launch retrieval with host-tier staging, the folded attention deriving each row's
entries from its record), run by Triton's interpreter on CPU, give the tokens of the same
servers decoding through the kernels' torch twins (``decode_kernel="torch"``, the CPU default).
Dynamic heads retrieve, and on the host tier stage, at every decode step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridkv_sglang.testing.server import RunningServer
from tests.integration.client import chat_prompt, generate, images
from tests.integration.conftest import COMPRESSING, IMAGE_SIDE, serve

pytestmark = pytest.mark.integration

CONFIGS = {
    "in_place": COMPRESSING,
    "compact": COMPRESSING.model_copy(update={"storage": "compact", "host_tier_mib": 1.0}),
}
PROMPTS = [
    (chat_prompt("What is in the picture?", images=1), 1),
    (chat_prompt("Compare the two pictures.", images=2), 2),
]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def server_pair(
    request: pytest.FixtureRequest, tiny_model: Path, server_logs: Path
) -> Iterator[tuple[str, RunningServer, RunningServer]]:
    """The same compressing server twice: torch twins, then Triton kernels (interpreted)."""
    storage = request.param
    config = CONFIGS[storage]
    with (
        serve(tiny_model, server_logs, f"{storage}_torch", config) as twins,
        serve(
            tiny_model,
            server_logs,
            f"{storage}_triton",
            config.model_copy(update={"decode_kernel": "triton"}),
            TRITON_INTERPRET="1",
        ) as kernels,
    ):
        yield storage, twins, kernels


def test_triton_decode_equals_its_torch_twins(server_pair):
    storage, twins, kernels = server_pair
    for i, (text, n) in enumerate(PROMPTS):
        pictures = images(n, IMAGE_SIDE, seed=7 + i)
        want, got = (
            generate(twins.base_url, text, pictures),
            generate(kernels.base_url, text, pictures),
        )
        assert got["output_ids"] == want["output_ids"], (storage, i)
        records = [
            server.hybridkv_stats()["requests"][reply["meta_info"]["id"]]
            for server, reply in ((twins, want), (kernels, got))
        ]
        for field in ("compressed", "dynamic_heads", "static_heads", "kept_entries", "storage"):
            assert records[0][field] == records[1][field], (storage, field)
        assert records[1]["compressed"] and records[1]["dynamic_heads"] > 0, records[1]
        assert records[1]["storage"] == storage, records[1]
    totals = kernels.hybridkv_stats()["totals"]
    assert totals["sparse_decode_steps"] > 0
    if storage == "compact":
        assert totals["staged_chunks_selected"] > 0, totals
        assert (
            totals["staged_chunks_moved"] == twins.hybridkv_stats()["totals"]["staged_chunks_moved"]
        )
