"""bench/quality.py without servers: the JSONL format, message layout, scoring, configurations;
and bench/train_quality_model.py's direct encoding against the processor."""

from __future__ import annotations

import json
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
    ("reply", "answers", "match", "expected"),
    [
        ("navy", ["navy"], "exact", True),
        (" Navy.\n", ["navy"], "exact", True),
        ("navy teal", ["navy teal"], "exact", True),
        ("navy  teal", ["navy teal"], "exact", True),
        ("navy", ["navy teal"], "exact", False),
        ("teal navy", ["navy teal"], "exact", False),
        ("navy blue", ["navy"], "exact", False),
        ("navy, because", ["navy"], "prefix", True),
        ("navyblue", ["navy"], "prefix", False),
        ("'B'", ["b", "c"], "exact", True),
    ],
)
def test_scoring(quality_bench, reply, answers, match, expected):
    assert quality_bench.is_correct(reply, answers, match) is expected


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
    disabled = quality_bench.parse_args(["--full", "disabled", "--policies", ""])
    (full,) = quality_bench.build_configs(disabled)
    assert full.hybridkv is not None and not full.hybridkv.enabled
    extra = quality_bench.parse_args(["--hybridkv-json", '{"top_k_chunks": 3}', "--window", "8"])
    assert all(c.hybridkv.top_k_chunks == 3 for c in quality_bench.build_configs(extra)[1:])
    with pytest.raises(ValueError, match="--policies"):
        quality_bench.build_configs(quality_bench.parse_args(["--policies", "h2o"]))


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
         "mean_read_fraction": 1.0, "questions": 10},
        {"config": "hybridkv@0.1", "policy": "hybridkv", "budget": 0.1, "accuracy": 0.9,
         "mean_read_fraction": 0.11, "questions": 10},
        {"config": "hybridkv@0.2", "policy": "hybridkv", "budget": 0.2, "accuracy": 0.95,
         "mean_read_fraction": None, "questions": 10},
    ]  # fmt: skip
    table = quality_bench.format_table(rows)
    assert "hybridkv@0.1" in table and "90.0%" in table and "0.110" in table
    quality_bench.plot(rows, tmp_path / "q.png", "test")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_direct_encoding_equals_the_processor(train_script, quality_processor):
    encoder = train_script.Encoder(quality_processor.tokenizer)
    rng = random.Random(0)
    cases = [qt.make_training_case(rng, k) for k in (3, 3)] + [qt.make_case(1, 3, "multi_turn")]
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
        assert int((batch.labels[b] != -100).sum()) == sum(e - s for s, e in spans)
