"""Each CPU rank of a TP/DP server gets its own cores."""

from __future__ import annotations

import pytest

from hybridkv_sglang.testing.server import cpu_rank_binding

BIND = "SGLANG_CPU_OMP_THREADS_BIND"


@pytest.mark.parametrize(
    ("ranks", "cores", "binding"),
    [
        (2, [0, 1], "0|1"),
        (2, range(8), "0-3|4-7"),
        (1, [0, 1], "0-1"),
        (2, [1, 3, 5, 7], "1,3|5,7"),
        (3, range(7), "0-1|2-3|4-5"),
    ],
)
def test_one_core_set_per_rank(ranks, cores, binding) -> None:
    assert cpu_rank_binding(ranks, cores) == {BIND: binding}


def test_more_ranks_than_cores_is_an_error() -> None:
    with pytest.raises(ValueError, match="ranks <= 2 cores"):
        cpu_rank_binding(3, [0, 1])
