"""bench/quality.py without servers: the JSONL format, message layout, statistics,
configurations; and bench/train_quality_model.py's direct encoding against the processor."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from hybridkv_sglang.testing import quality_task as qt


def test_jsonl_format_with_paths_shorthand_and_answer_lists(quality_bench, tmp_path):
    (tmp_path / "img").mkdir()
    qt.render_tile_image(qt.Tile("red", "navy", 0, 0), seed=1).save(tmp_path / "img" / "a.png")
    lines = [
        {"id": "a", "images": ["img/a.png"], "question": "What?", "answer": "navy"},
        {
            "id": "b",
            "kind": "chat",
            "images": ["img/a.png", "https://example.com/x.jpg"],
            "turns": [
                {"question": "First <image> then <image>?", "answer": ["yes", "Yes indeed"]},
                {"question": "More?", "answer": "no"},
            ],
            "max_new_tokens": 3,
        },
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = quality_bench.load_jsonl(path)
    assert a.images[0].startswith("data:image/png;base64,") and a.kind == "default"
    assert a.turns[0].answers == ("navy",) and a.k == 1
    assert b.images[1] == "https://example.com/x.jpg" and b.max_new_tokens == 3
    assert b.turns[0].answers == ("yes", "Yes indeed")

    first = quality_bench.message_list(b, [], 1)
    parts = first[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    second = quality_bench.message_list(b, ["yes"], 2)
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "yes" and second[2]["content"] == "More?"
    plain = quality_bench.message_list(a, [], 1)[0]["content"]
    assert [p["type"] for p in plain] == ["image_url", "text"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"images": []}, "no 'id'"),
        ({"id": 1}, "expected 'turns'"),
        ({"id": 1, "turns": [{"question": "q"}]}, "turn 0"),
        ({"id": 1, "images": ["data:x"], "question": "<image><image>", "answer": "a"}, "2 <image>"),
        ({"id": 1, "images": ["missing.png"], "question": "q", "answer": "a"}, "not found"),
    ],
)
def test_bad_records_name_the_problem(quality_bench, tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        quality_bench.case_from_record(record, tmp_path)


def test_duplicate_ids_are_refused(quality_bench, tmp_path):
    path = tmp_path / "dup.jsonl"
    row = json.dumps({"id": "x", "question": "q", "answer": "a"})
    path.write_text(f"{row}\n{row}\n")
    with pytest.raises(ValueError, match="duplicate ids"):
        quality_bench.load_jsonl(path)


@pytest.mark.parametrize(
    ("reply", "gold", "expected"),
    [
        (("red", " navy"), ("red", " navy"), 1),
        (("blue", " navy"), ("red", " navy"), 1),  # the first token is the dense prefill's
        (("red", "pink", " navy"), ("red", " navy"), 0),  # "redpink navy": shifted, wrong
        (("red",), ("red", " navy"), 0),
        (("navy", " teal", " teal"), ("navy", " teal"), 1),
        ((), ("navy", " teal"), 0),
    ],
)
def test_decode_token_matches(quality_bench, reply, gold, expected):
    assert quality_bench.decode_token_matches(reply, gold) == expected


def test_gold_tokens_are_the_reply_pieces(quality_bench):
    gold = quality_bench.GoldTokenizer(quality_bench.DEFAULT_MODEL)
    assert gold.pieces("red navy") == ("red", " navy")
    assert gold.pieces("navy teal") == ("navy", " teal")


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (3, 10), (10, 10), (450, 450), (400, 450)])
def test_wilson_interval(quality_bench, successes, n):
    low, high = quality_bench.wilson_interval(successes, n)
    assert 0.0 <= low <= successes / n <= high <= 1.0
    assert high - low < 2 * 1.96 * math.sqrt(0.25 / n) + 1e-9  # never wider than Wald at p=0.5
    # Reference values (Newcombe 1998, table I): 0/10, 3/10 (rounded to 4 places).
    assert quality_bench.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert quality_bench.wilson_interval(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-4)


def test_mcnemar_and_paired_difference(quality_bench):
    assert quality_bench.mcnemar_exact_p(0, 0) == 1.0
    assert quality_bench.mcnemar_exact_p(5, 5) == 1.0
    assert quality_bench.mcnemar_exact_p(6, 0) == pytest.approx(2 / 64)
    assert quality_bench.mcnemar_exact_p(0, 6) == quality_bench.mcnemar_exact_p(6, 0)
    a = [True] * 80 + [True] * 12 + [False] * 3 + [False] * 5
    b = [True] * 80 + [False] * 12 + [True] * 3 + [False] * 5
    result = quality_bench.paired_difference(a, b)
    assert (result["a_only"], result["b_only"], result["questions"]) == (12, 3, 100)
    assert result["difference"] == pytest.approx(0.09)
    low, high = result["ci95"]
    assert low < 0.09 < high and low > 0  # 12 vs 3 discordant: significant
    assert result["p_mcnemar"] < 0.05
    same = quality_bench.paired_difference(a, a)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["p_mcnemar"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        quality_bench.paired_difference(a, b[:-1])


def test_paired_comparisons_pair_each_hybridkv_row_at_its_budget(quality_bench):
    def row(config, method, budget, bits):
        return {"config": config, "method": method, "budget": budget, "correct_bits": bits,
                "mean_read_bytes_fraction": budget}  # fmt: skip

    rows = [
        row("full", "full", 1.0, "1111"),
        row("hybridkv@0.1", "hybridkv", 0.1, "1110"),
        row("hybridkv_bk@0.1", "hybridkv", 0.1, "1111"),
        row("snapkv@0.1", "snapkv", 0.1, "1000"),
        row("snapkv@0.2", "snapkv", 0.2, "0000"),
    ]
    pairs = [(c["a"], c["b"]) for c in quality_bench.paired_comparisons(rows)]
    assert pairs == [
        ("hybridkv@0.1", "hybridkv_bk@0.1"),
        ("hybridkv@0.1", "snapkv@0.1"),
        ("hybridkv_bk@0.1", "snapkv@0.1"),
    ]
    (vs_snap,) = [c for c in quality_bench.paired_comparisons(rows) if c["a"] == "hybridkv@0.1"
                  and c["b"] == "snapkv@0.1"]  # fmt: skip
    assert (vs_snap["a_only"], vs_snap["b_only"]) == (2, 0)


def test_first_token_agreement_counts_turns_with_the_same_prompt(quality_bench):
    def turn(case, i, reply, tokens):
        return quality_bench.TurnResult(
            case, "multi_turn", 16, i, "rid", reply, tokens, ("x",), True, 1, 1, 100
        )

    reference = [
        turn("a", 0, "red navy", ("red", " navy")),
        turn("a", 1, "blue teal", ("blue", " teal")),
        turn("b", 0, "red navy", ("red", " navy")),
        turn("b", 1, "blue teal", ("blue", " teal")),
    ]
    ours = [
        turn("a", 0, "red navy", ("red", " navy")),
        turn("a", 1, "pink teal", ("pink", " teal")),  # same prompt, other first token
        turn("b", 0, "redpink navy", ("red", "pink", " navy")),
        turn("b", 1, "green teal", ("green", " teal")),  # other history: not compared
    ]
    assert quality_bench.first_token_agreement(ours, reference) == (
        pytest.approx(2 / 3, abs=1e-4),
        3,
    )


def test_configurations(quality_bench):
    args = quality_bench.parse_args(["--budgets", "0.05,0.2", "--policies", "hybridkv,snapkv"])
    configs = quality_bench.build_configs(args)
    assert [c.name for c in configs] == [
        "full",
        "hybridkv@0.05",
        "hybridkv@0.2",
        "snapkv@0.05",
        "snapkv@0.2",
    ]
    assert configs[0].hybridkv is None  # stock torch_native on CPU
    assert configs[1].hybridkv.min_prompt_tokens == 128 and configs[1].hybridkv.window == 32
    assert configs[3].hybridkv.policy == "snapkv" and configs[4].hybridkv.budget == 0.2
    settings = qt.TILE_MODEL_SETTINGS
    for config in configs[1:]:  # the committed model's settings, the chunk index included
        assert config.hybridkv.model_dump(include=set(settings)) == settings
    flagged = quality_bench.build_configs(quality_bench.parse_args(["--chunk-size", "8"]))
    assert flagged[1].hybridkv.chunk_size == 8 and flagged[1].hybridkv.bound_channels == 8
    disabled = quality_bench.parse_args(["--full", "disabled", "--policies", ""])
    (full,) = quality_bench.build_configs(disabled)
    assert full.hybridkv is not None and not full.hybridkv.enabled
    extra = quality_bench.parse_args(["--hybridkv-json", '{"top_k_chunks": 3}', "--window", "8"])
    assert all(c.hybridkv.top_k_chunks == 3 for c in quality_bench.build_configs(extra)[1:])
    with pytest.raises(ValueError, match="--policies"):
        quality_bench.build_configs(quality_bench.parse_args(["--policies", "h2o"]))


def test_every_registered_policy_and_the_variants_are_accepted(quality_bench):
    from hybridkv_sglang.policy import POLICIES

    assert set(quality_bench.POLICIES) == set(POLICIES) >= {"adakv", "pyramidkv", "flashcache"}
    args = quality_bench.parse_args(["--budgets", "0.1", "--full", "none"])
    configs = quality_bench.build_configs(args)
    assert [c.policy for c in configs] == list(quality_bench.DEFAULT_POLICIES)
    by_name = {c.name: c for c in configs}
    # hybridkv runs the config defaults; every row shares the committed model's settings.
    assert by_name["hybridkv@0.1"].hybridkv.dynamic_top_k == "budget"
    assert by_name["hybridkv@0.1"].hybridkv.static_priority == "focus"
    for config in configs:
        settings = (config.hybridkv.sink, config.hybridkv.chunk_size, config.hybridkv.top_k_chunks)
        assert settings == (0, 4, 64), config.name
    assert by_name["adakv@0.1"].hybridkv.policy == "adakv"
    flash = quality_bench.parse_args(["--policies", "flashcache", "--full", "none"])
    assert {c.hybridkv.policy for c in quality_bench.build_configs(flash)} == {"flashcache"}
    lookm = quality_bench.parse_args(["--policies", "lookm,hybridkv_design", "--full", "none"])
    lookm_configs = {c.name: c.hybridkv for c in quality_bench.build_configs(lookm)}
    assert lookm_configs["lookm@0.1"].storage == "compact"  # where its merged KV lives
    design = lookm_configs["hybridkv_design@0.2"]
    assert (design.policy, design.static_priority, design.dynamic_top_k) == (
        "hybridkv",
        "text",
        "fixed",
    )
    other = quality_bench.parse_args(["--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--sink", "2"])
    seven_b = quality_bench.build_configs(other)[1].hybridkv
    assert (seven_b.sink, seven_b.chunk_size, seven_b.top_k_chunks) == (2, 16, 8)
    custom = quality_bench.parse_args(
        ["--variant", 'snap_w8=snapkv:{"window": 8}', "--policies", "snap_w8", "--budgets", "0.2"]
    )
    (_, snap) = quality_bench.build_configs(custom)
    assert (snap.name, snap.method, snap.hybridkv.window) == ("snap_w8@0.2", "snapkv", 8)
    for bad in ("snap_w8", "x=h2o:{}", "x=snapkv:[1]"):
        with pytest.raises(ValueError, match="--variant"):
            quality_bench.parse_variant(bad)


def test_default_set_covers_every_kind_and_k(quality_bench):
    cases = quality_bench.tile_cases(1_000_000, [16, 32, 64], 2)
    assert len(cases) == 3 * len(qt.EVAL_KINDS) * 2
    assert {c.kind for c in cases} == set(qt.EVAL_KINDS)
    assert {c.k for c in cases} == {16, 32, 64}
    assert all(len(c.images) == c.k for c in cases)
    singles = quality_bench.tile_cases(1_000_000, [16], 3, ["single"])
    assert [c.kind for c in singles] == ["single"] * 3
    with pytest.raises(ValueError, match="--kinds"):
        quality_bench.tile_cases(1_000_000, [16], 1, ["colour_count"])


def test_table_and_plot(quality_bench, tmp_path):
    rows = [
        {"config": "full", "policy": "full", "budget": 1.0, "accuracy": 1.0,
         "ci95": [0.72, 1.0], "mean_read_bytes_fraction": 1.0, "questions": 10,
         "decode_token_accuracy": 1.0},
        {"config": "hybridkv@0.1", "policy": "hybridkv", "budget": 0.1, "accuracy": 0.9,
         "ci95": [0.6, 0.98], "mean_read_bytes_fraction": 0.11, "questions": 10,
         "decode_token_accuracy": 0.85},
        {"config": "hybridkv@0.2", "policy": "hybridkv", "budget": 0.2, "accuracy": 0.95,
         "ci95": [0.7, 0.99], "mean_read_bytes_fraction": None, "questions": 10,
         "decode_token_accuracy": None},
    ]  # fmt: skip
    table = quality_bench.format_table(rows)
    assert "hybridkv@0.1" in table and "90.0%" in table and "0.110" in table
    assert "60.0%-98.0%" in table and "85.0%" in table
    comparison = {"a": "hybridkv@0.1", "b": "snapkv@0.1", "difference": 0.05,
                  "ci95": [-0.01, 0.11], "a_only": 7, "b_only": 2, "p_mcnemar": 0.18}  # fmt: skip
    text = quality_bench.format_comparisons([comparison])
    assert "+5.0%" in text and "-1.0% +11.0%" in text and "0.18" in text
    quality_bench.plot(rows, tmp_path / "q.png", "test")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_direct_encoding_equals_the_processor(train_script, quality_processor):
    encoder = train_script.Encoder(quality_processor.tokenizer)
    rng = random.Random(0)
    cases = [qt.make_training_case(rng, k) for k in (3, 3)] + [qt.make_case(1, 3, "multi_turn")]
    cases += [qt.make_case(2, 4, "list_name")]
    batch = encoder.encode(cases)
    rows = 0
    for b, case in enumerate(cases):
        ref = quality_processor(
            text=[qt.training_text(case)], images=case.images(), return_tensors="np"
        )
        n = ref["input_ids"].shape[1]
        assert batch.input_ids[b, :n].tolist() == ref["input_ids"][0].tolist()
        assert int(batch.attention_mask[b].sum()) == n
        patches = ref["pixel_values"].shape[0]
        got = batch.pixel_values[rows : rows + patches].numpy()
        np.testing.assert_allclose(got, ref["pixel_values"], atol=1e-5)
        rows += patches
        spans = batch.answer_spans[b]
        assert len(spans) == len(case.turns)
        for (start, end), turn in zip(spans, case.turns, strict=True):
            text = quality_processor.tokenizer.decode(batch.input_ids[b, start:end].tolist())
            assert text == f"{turn.answer}<|im_end|>"
            assert (batch.labels[b, start:end] == batch.input_ids[b, start:end]).all()
            assert bool(batch.list_mask[b, start:end].all()) == (turn.kind == "list_name")
        assert int((batch.labels[b] != -100).sum()) == sum(e - s for s, e in spans)
        assert int(batch.list_mask[b].sum()) == sum(
            e - s for (s, e), t in zip(spans, case.turns, strict=True) if t.kind == "list_name"
        )


def test_added_rows_join_an_earlier_run_on_the_same_questions(quality_bench, tmp_path):
    dataset = {"source": "tile task, seed 1", "questions": 3, "ks": [16, 32]}
    earlier = {
        "dataset": dataset,
        "total_seconds": 60.0,
        "rows": [
            {"config": "full", "mean_read_bytes_fraction": 1.0},
            {"config": "snapkv@0.1", "mean_read_bytes_fraction": 0.1},
            {"config": "lookm@0.1", "mean_read_bytes_fraction": 0.1, "old": 1},
        ],
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(earlier))
    new = [{"config": "lookm@0.1"}, {"config": "hybridkv_tuned@0.1"}]
    rows, seconds = quality_bench.rows_added_to(path, new, 30.0, {**dataset, "ks": (16, 32)})
    assert [r["config"] for r in rows] == ["full", "snapkv@0.1", "lookm@0.1", "hybridkv_tuned@0.1"]
    assert "old" not in rows[2] and seconds == 90.0
    with pytest.raises(SystemExit, match="questions differ"):
        quality_bench.rows_added_to(path, new, 1.0, {**dataset, "questions": 4})


def test_rows_measured_in_entries_carry_over_only_without_a_chunk_index(quality_bench, tmp_path):
    dataset = {"source": "tile task, seed 1", "questions": 3}

    def old_row(config: str, method: str) -> dict:
        return {"config": config, "method": method, "mean_read_fraction": 0.049,
                "read_fraction_range": [0.047, 0.05]}  # fmt: skip

    path = tmp_path / "old.json"
    rows = [old_row("full", "full"), old_row("snapkv@0.05", "snapkv")]
    path.write_text(json.dumps({"dataset": dataset, "rows": rows}))
    (full, snapkv), _ = quality_bench.saved_run(path, dataset)
    assert snapkv["mean_read_bytes_fraction"] == 0.049 and snapkv["max_read_bytes_fraction"] == 0.05
    assert snapkv["mean_metadata_bytes_fraction"] == 0.0 and "carried over" in snapkv["accounting"]
    assert "mean_read_fraction" not in snapkv and full["mean_device_bytes_fraction"] == 0.049
    path.write_text(json.dumps({"dataset": dataset, "rows": [old_row("hk@0.05", "hybridkv")]}))
    with pytest.raises(SystemExit, match=r"hk@0\.05 .* chunk index .* run it again"):
        quality_bench.saved_run(path, dataset)


def test_fine_tune_defaults(train_script):
    scratch = train_script.parse_args([])
    assert (scratch.lr, scratch.k_start, scratch.list_prob) == (1e-3, 2, 0.0)
    tuned = train_script.parse_args(["--init-from", "m", "--k-final", "32", "--list-prob", "0.5"])
    assert (tuned.lr, tuned.k_start, tuned.list_prob) == (3e-4, 32, 0.5)
    # Lists are evaluated only when trained: a from-scratch model is not scored on them.
    assert "list_name" in train_script.eval_kinds(tuned)
    assert train_script.eval_kinds(scratch) == train_script.qt.LEARNED_KINDS


def test_partial_rows_of_a_stopped_run_join_a_results_file(quality_bench, tmp_path):
    """Each finished row is saved at once; --join adds them to --add-to without running."""
    dataset = {"source": "tile task, seed 1", "questions": 3}
    partial = tmp_path / "run.partial.json"
    row = {"config": "snapkv@0.05", "mean_read_bytes_fraction": 0.049}
    quality_bench.save_partial(partial, [row], dataset, 42.04)
    assert quality_bench.saved_run(partial, dataset) == ([row], 42.0)
    with pytest.raises(SystemExit, match="questions differ"):
        quality_bench.saved_run(partial, {**dataset, "questions": 4})
    with pytest.raises(SystemExit):
        quality_bench.parse_args(["--join", str(partial)])  # needs --add-to
    args = quality_bench.parse_args(["--join", str(partial), "--add-to", "q.json"])
    assert args.join == [partial]


def test_read_fraction_gap_is_per_question(quality_bench):
    a = {"read_fractions": [0.05, 0.049, None, 0.047]}
    b = {"read_fractions": [0.049, 0.049, 0.05, 0.05]}
    assert quality_bench.read_fraction_gap(a, b) == pytest.approx(0.003)
    assert quality_bench.read_fraction_gap(a, {}) is None


def test_rows_report_bytes_from_the_server_records_in_every_mode(quality_bench):
    """A ``--url`` row (no config of its own) reads its figures from the server's records: a
    compact server's compressed requests are not reported as reading everything."""

    def result(i, stats):
        return quality_bench.TurnResult(
            "c", "describe", 16, i, f"r{i}", "red navy", ("red",), ("red navy",), True, 1, 1, 300,
            stats,
        )  # fmt: skip

    record = {
        "compressed": True,
        "read_fraction": 0.097,
        "index_fraction": 0.012,
        "read_entries_fraction": 0.085,
        "extra": {"device_fraction_compact": 0.097},
    }
    dense = {"compressed": False, "read_fraction": 1.0, "extra": {}}
    results = [result(0, record), result(1, record), result(2, dense), result(3, None)]
    url_row = quality_bench.EvalConfig("served", "served", "served", 0.1, None)
    row = quality_bench.summarize(url_row, results, 1.0, has_stats=True)
    assert row["read_fractions"] == [0.097, 0.097, 1.0, None]
    assert row["mean_read_bytes_fraction"] == pytest.approx((0.097 * 2 + 1) / 3, abs=1e-4)
    assert row["max_read_bytes_fraction"] == 1.0
    assert row["mean_metadata_bytes_fraction"] == pytest.approx(0.008, abs=1e-4)
    assert row["mean_device_bytes_fraction"] == pytest.approx((0.097 * 2 + 1) / 3, abs=1e-4)
    assert row["mean_read_entries_fraction"] == pytest.approx((0.085 * 2 + 1) / 3, abs=1e-4)
    assert row["over_budget_requests"] == 1  # the dense one
    stock = quality_bench.summarize(
        quality_bench.EvalConfig("full", "full", "full", 1.0, None), results, 1.0, has_stats=False
    )
    assert stock["read_fractions"] == [1.0] * 4 and stock["mean_metadata_bytes_fraction"] == 0.0
