"""Row descriptions of decode: the dynamic-row layout and the positions CSR."""

from __future__ import annotations

import pytest
import torch

from hybridkv_sglang.storage.page_tables import DynamicRowLayout, PositionsCSR


def _rows(csr: PositionsCSR) -> list[list[int]]:
    host = csr.indptr_host.tolist()
    pos = csr.positions.tolist()
    return [pos[host[r] : host[r + 1]] for r in range(csr.num_rows)]


# ------------------------------------------------------------------ DynamicRowLayout
def test_dynamic_layout_partitions_every_prompt():
    """Exhaustive small grid: prefix ⊇ sink, prefix ∪ tail ⊇ window, chunks full, inside
    [sink, N - w), disjoint from the rest, and all parts together cover [0, N) exactly."""
    for chunk in (1, 3, 4, 16):
        for sink in (0, 1, 4, 5):
            for window in (0, 1, 3, 8):
                for n in range(0, 40):
                    lay = DynamicRowLayout.for_prompt(n, sink, window, chunk)
                    prefix = set(range(lay.prefix_end))
                    tail = set(range(lay.tail_start, n))
                    chunks = [
                        set(range(c * chunk, (c + 1) * chunk))
                        for c in range(lay.first_chunk, lay.end_chunk)
                    ]
                    assert lay.num_chunks >= 0
                    assert set(range(min(sink, n))) <= prefix
                    assert set(range(max(n - window, 0), n)) <= prefix | tail
                    assert lay.prefix_end <= lay.tail_start <= n
                    covered = set(prefix)
                    for c in chunks:
                        assert len(c) == chunk
                        assert min(c) >= sink and max(c) < n - window
                        assert not (c & covered)
                        covered |= c
                    assert not (tail & covered)
                    assert covered | tail == set(range(n))
                    for k in (0, 1, 2, 100):
                        seq_len = n + 3
                        expect = lay.prefix_end + min(k, lay.num_chunks) * chunk
                        assert lay.row_length(seq_len, k) == expect + seq_len - lay.tail_start
                    # resident part is at most 2*(C-1) over sink + window (within the prompt)
                    resident = lay.prefix_end + n - lay.tail_start
                    if lay.num_chunks:
                        assert resident <= min(sink + window + 2 * (chunk - 1), n)


def test_dynamic_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="chunk_size"):
        DynamicRowLayout.for_prompt(10, 1, 1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        DynamicRowLayout.for_prompt(10, -1, 1, 4)


# ------------------------------------------------------------------ PositionsCSR
def test_positions_csr_from_lists_and_empty():
    csr = PositionsCSR.from_lists([[3, 1], [], [7]], "cpu")
    assert _rows(csr) == [[3, 1], [], [7]]
    assert csr.indptr.dtype == torch.int32 and csr.positions.dtype == torch.int32
    assert csr.lengths_host().tolist() == [2, 0, 1]
    empty = PositionsCSR.empty(4, "cpu")
    assert _rows(empty) == [[], [], [], []] and empty.nnz == 0


def test_positions_csr_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="expected a 1-D tensor of 3 entries"):
        PositionsCSR.from_device([1, 2], torch.arange(4, dtype=torch.int32))
