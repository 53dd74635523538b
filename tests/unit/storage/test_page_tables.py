"""Folded page tables: layouts, CSR helpers and the builder against per-row definitions."""

from __future__ import annotations

import pytest
import torch
from folded_testlib import make_pool, naive_indices, random_batch

from hybridkv_sglang.storage.page_tables import (
    DynamicRowLayout,
    FoldedRowSpecs,
    PositionsCSR,
    append_ranges,
    assemble_rows,
    build_folded_page_table,
    chunk_selection_positions,
    concat_row_specs,
    dense_row_specs,
    prepend_entries,
    take_from_regions,
)


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


# ------------------------------------------------------------------ CSR helpers
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


def test_assemble_rows_places_parts():
    a = PositionsCSR.from_lists([[1, 2], [3]], "cpu")
    b = PositionsCSR.from_lists([[9], [], [8, 7, 6]], "cpu")
    out = assemble_rows(7, [(a, [5, 0]), (b, [1, 6, 3])], "cpu")
    assert _rows(out) == [[3], [9], [], [8, 7, 6], [], [1, 2], []]
    assert out.indptr.tolist() == out.indptr_host.tolist()


def test_assemble_rows_rejects_overlap_and_range():
    a = PositionsCSR.from_lists([[1]], "cpu")
    with pytest.raises(ValueError, match="at most one part"):
        assemble_rows(3, [(a, [1]), (a, [1])], "cpu")
    with pytest.raises(ValueError, match=r"row ids in \[0, 3\)"):
        assemble_rows(3, [(a, [3])], "cpu")


@pytest.mark.parametrize("seed", range(4))
def test_chunk_selection_positions_matches_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, k, chunk = 5, 4, 3
    n_sel = torch.randint(0, k + 1, (rows,), generator=gen)
    prefix = torch.randint(0, 6, (rows,), generator=gen)
    top = torch.full((rows, k), -1, dtype=torch.int32)
    expect = []
    for r in range(rows):
        ids = (2 + torch.randperm(10, generator=gen)[: int(n_sel[r])]).tolist()
        top[r, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        row = list(range(int(prefix[r])))
        for c in ids:
            row += list(range(c * chunk, (c + 1) * chunk))
        expect.append(row)
    csr = chunk_selection_positions(top, n_sel, chunk, prefix)
    assert _rows(csr) == expect
    no_prefix = chunk_selection_positions(top, n_sel, chunk)
    assert _rows(no_prefix) == [row[int(prefix[r]) :] for r, row in enumerate(expect)]


def test_chunk_selection_positions_rejects_device_lengths_and_bad_counts():
    top = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"values in \[0, 3\]"):
        chunk_selection_positions(top, [4, 0], 2)
    with pytest.raises(ValueError, match="2 rows"):
        chunk_selection_positions(top, [1], 2)


# ------------------------------------------------------------------ the builder
@pytest.mark.parametrize(
    ("num_reqs", "heads", "ctx", "seed"),
    [(1, 1, 5, 0), (2, 4, 23, 1), (5, 2, 31, 2), (3, 7, 17, 3), (7, 3, 40, 4)],
)
def test_build_matches_per_row_definition(num_reqs, heads, ctx, seed):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(gen, num_reqs + 2, ctx, heads, 4)
    batch = random_batch(gen, pool, num_reqs)
    table = build_folded_page_table(pool.req_to_token, batch.specs, heads)
    expect = naive_indices(pool, batch)
    lengths = [len(r) for r in expect]
    indptr = [0]
    for n in lengths:
        indptr.append(indptr[-1] + n)
    assert table.kv_indptr_host.tolist() == indptr
    assert table.kv_indptr.tolist() == indptr
    assert table.kv_indptr_host.dtype == table.kv_indptr.dtype == torch.int32
    assert table.kv_indptr_host.device.type == "cpu"
    assert table.kv_indices.dtype == torch.int32
    assert table.kv_indices.tolist() == [e for row in expect for e in row]
    assert table.kv_last_page_len.tolist() == [1] * len(expect)
    assert table.num_rows == num_reqs * heads and table.nnz == indptr[-1]
    assert batch.specs.row_lengths_host().tolist() == lengths


def test_dense_rows_and_concat():
    gen = torch.Generator().manual_seed(7)
    heads = 3
    pool = make_pool(gen, 4, 12, heads, 2)
    dense = dense_row_specs([2, 0], [5, 12], heads, "cpu")
    static = FoldedRowSpecs.create(
        [3, 3, 3], [0, 1, 2], PositionsCSR.from_lists([[4, 1], [], [0]], "cpu"), [6] * 3, [9] * 3
    )
    specs = concat_row_specs([dense, static])
    table = build_folded_page_table(pool.req_to_token, specs, heads)
    r2t = pool.req_to_token
    expect = []
    for req, length in ((2, 5), (0, 12)):
        for h in range(heads):
            expect += [int(r2t[req, p]) * heads + h for p in range(length)]
    for h, sel in enumerate(([4, 1], [], [0])):
        expect += [int(r2t[3, p]) * heads + h for p in [*sel, 6, 7, 8]]
    assert table.kv_indices.tolist() == expect
    assert table.row_lengths_host().tolist() == [5, 5, 5, 12, 12, 12, 5, 3, 4]


def test_build_into_preallocated_buffer():
    gen = torch.Generator().manual_seed(3)
    pool = make_pool(gen, 3, 16, 2, 2)
    batch = random_batch(gen, pool, 2)
    plain = build_folded_page_table(pool.req_to_token, batch.specs, 2)
    buf = torch.full((plain.nnz + 5,), -7, dtype=torch.int32)
    table = build_folded_page_table(pool.req_to_token, batch.specs, 2, indices_out=buf)
    assert torch.equal(table.kv_indices, plain.kv_indices)
    assert table.kv_indices.data_ptr() == buf.data_ptr()
    assert buf[plain.nnz :].tolist() == [-7] * 5
    with pytest.raises(ValueError, match="at least"):
        build_folded_page_table(pool.req_to_token, batch.specs, 2, indices_out=buf[:1])


def test_builder_validation():
    pool = make_pool(torch.Generator().manual_seed(0), 2, 8, 2, 2)
    bad_head = dense_row_specs([0], [4], 3, "cpu")  # heads 0..2 but the pool has 2
    with pytest.raises(ValueError, match=r"row_head: expected heads in \[0, 2\)"):
        build_folded_page_table(pool.req_to_token, bad_head, 2)
    with pytest.raises(ValueError, match="host"):
        FoldedRowSpecs.create(
            torch.zeros(1, dtype=torch.int64, device="meta"),
            [0],
            PositionsCSR.empty(1, "cpu"),
            [0],
            [1],
        )
    with pytest.raises(ValueError, match="shape"):
        FoldedRowSpecs.create([0, 0], [0, 1], PositionsCSR.empty(1, "cpu"), [0, 0], [1, 1])


def _random_csr(gen: torch.Generator, rows: int, high: int) -> list[list[int]]:
    return [
        torch.randint(
            0, high, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(rows)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_append_ranges_and_take_from_regions_match_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = _random_csr(gen, 5, 20)
    starts = torch.randint(0, 20, (5,), generator=gen)
    ends = starts + torch.randint(-2, 6, (5,), generator=gen)
    appended = append_ranges(PositionsCSR.from_lists(rows, "cpu"), starts, ends)
    want = [r + list(range(int(s), int(e))) for r, s, e in zip(rows, starts, ends, strict=True)]
    assert appended.lengths_host().tolist() == [len(w) for w in want]
    assert appended.indptr.tolist() == appended.indptr_host.tolist()
    assert appended.positions.tolist() == [v for w in want for v in w]

    regions = torch.randint(0, 10_000, (5, 30), generator=gen)
    taken = take_from_regions(appended, regions)
    assert taken.positions.tolist() == [int(regions[r, v]) for r, w in enumerate(want) for v in w]


@pytest.mark.parametrize("seed", [0, 1])
def test_prepend_entries_puts_direct_entries_first(seed):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(gen, num_reqs=3, ctx=40, num_kv_heads=2, head_dim=8)
    specs = dense_row_specs([0, 1, 2], [10, 0, 25], 2, "cpu")
    table = build_folded_page_table(pool.req_to_token, specs, 2)
    direct_rows = _random_csr(gen, 6, 500)
    merged = prepend_entries(PositionsCSR.from_lists(direct_rows, "cpu"), table)
    dense_rows = [
        table.kv_indices[table.kv_indptr_host[r] : table.kv_indptr_host[r + 1]].tolist()
        for r in range(6)
    ]
    want = [d + t for d, t in zip(direct_rows, dense_rows, strict=True)]
    assert merged.row_lengths_host().tolist() == [len(w) for w in want]
    assert merged.kv_indptr.tolist() == merged.kv_indptr_host.tolist()
    assert merged.kv_indices.tolist() == [v for w in want for v in w]
    with pytest.raises(ValueError, match="direct rows"):
        prepend_entries(PositionsCSR.from_lists(direct_rows[:2], "cpu"), table)
