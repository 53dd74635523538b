"""The tile task generator: deterministic, answers right by construction (read back from the
pixels), askable keys unique, token counts as the processor makes them; replies scored by
exact match after normalisation."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from hybridkv_sglang.testing import quality_task as qt

KS = (1, 2, 5, 8, 9, 16, 32, 64)
EVAL_KS = (16, 32, 64)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda n: float(np.abs(colour - np.array(palette[n])).sum()))


def decode_image(pixels: np.ndarray) -> tuple[str, str]:
    """(key, value) read from the pixels alone: find the tile by its saturated border."""
    rgb = pixels.astype(int)
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    for row in range(qt.TILE_POSITIONS):
        for col in range(qt.TILE_POSITIONS):
            top, left = row * qt.CELL, col * qt.CELL
            tile = rgb[top : top + qt.TILE_SIDE, left : left + qt.TILE_SIDE]
            border = tile[: qt.BORDER // 2, :].reshape(-1, 3)  # top strip of the border
            if saturation[top : top + qt.BORDER // 2, left : left + qt.TILE_SIDE].min() < 60:
                continue
            centre = qt.TILE_SIDE // 2
            core = tile[centre - 8 : centre + 8, centre - 8 : centre + 8].reshape(-1, 3)
            # A tile whose top-left corner is right: its left strip is border too.
            left_strip = saturation[top : top + qt.TILE_SIDE, left : left + qt.BORDER // 2]
            if left_strip.min() < 60:
                continue
            return (
                _nearest(border.mean(axis=0), qt.KEY_COLOURS),
                _nearest(core.mean(axis=0), qt.VALUE_COLOURS),
            )
    raise AssertionError("no tile found in the image")


@pytest.mark.parametrize("kind", qt.CASE_KINDS)
@pytest.mark.parametrize("k", EVAL_KS)
def test_cases_are_deterministic_in_the_seed(kind, k):
    first, again = qt.make_case(7, k, kind), qt.make_case(7, k, kind)
    assert first == again
    assert all(
        np.array_equal(a, b)
        for a, b in zip(first.image_arrays(), again.image_arrays(), strict=True)
    )
    other = qt.make_case(8, k, kind)
    assert (other.tiles, other.turns) != (first.tiles, first.turns)


def test_question_set_is_deterministic_and_sized():
    one = qt.make_question_set(seed=5, ks=(16, 32), per_kind=3)
    two = qt.make_question_set(seed=5, ks=(16, 32), per_kind=3)
    assert one == two
    per_k = len(qt.EVAL_KINDS) * 3
    assert len(one) == 2 * per_k
    assert {c.kind for c in one} == set(qt.EVAL_KINDS)
    assert len({c.case_id for c in one}) == len(one)
    assert Counter(c.k for c in one) == {16: per_k, 32: per_k}
    assert qt.make_question_set(seed=6, ks=(16,), per_kind=3) != one[:per_k]


def test_default_benchmark_set_has_enough_questions():
    cases = qt.make_question_set(per_kind=20)
    questions = sum(len(c.turns) for c in cases)
    assert len(cases) == 3 * 4 * 20 and 420 <= questions <= 480  # >= 400 for 3-point resolution


def test_training_cases_follow_the_rng():
    a = [qt.make_training_case(random.Random("x"), 12) for _ in range(3)]
    b = [qt.make_training_case(random.Random("x"), 12) for _ in range(3)]
    assert a == b
    case = qt.make_training_case(random.Random(1), 4, max_turns=8)
    assert 1 <= len(case.turns) <= 8


@pytest.mark.parametrize("k", (2, 8, 24))
def test_training_answers_match_the_final_tiles(k):
    kinds, same = Counter(), Counter()
    for seed in range(300):
        case = qt.make_training_case(random.Random(seed), k)
        value = {t.key: t.value for t in case.tiles}
        for turn in case.turns:
            kinds[turn.kind] += 1
            values = [value[key] for key in turn.keys]
            if turn.kind == "describe":
                assert turn.answer == f"{turn.keys[0]} {values[0]}"
            elif turn.kind == "single":
                assert turn.answer == values[0]
            elif turn.kind == "pair_name":
                assert turn.answer == " ".join(values)
            else:
                assert turn.answer == ("yes" if values[0] == values[1] else "no")
                same[turn.answer] += 1
    assert set(kinds) == {"describe", "single", "pair_name", "pair_same"}
    assert 0.35 < same["yes"] / (same["yes"] + same["no"]) < 0.65
    early = qt.make_training_case(random.Random(0), k, max_turns=8, pair_prob=0.0)
    assert {t.kind for t in early.turns} <= {"describe", "single"}


@pytest.mark.parametrize("k", KS)
def test_asked_keys_are_unique_and_repeated_keys_repeat(k):
    rng = random.Random(k)
    for _ in range(20):
        tiles, askable = qt.sample_tiles(rng, k)
        counts = Counter(t.key for t in tiles)
        assert len(tiles) == k
        assert all(counts[key] == 1 for key in askable)
        if k <= len(qt.KEYS):
            assert len(askable) == k
        else:
            assert len(askable) == qt.ASKABLE_KEYS_LARGE_K
            assert all(n >= 2 for key, n in counts.items() if key not in askable)


@pytest.mark.parametrize("kind", qt.CASE_KINDS)
@pytest.mark.parametrize("k", (2, 4, 9, 16, 64))
def test_answers_are_right_by_construction(kind, k):
    if k < qt.MIN_ASKABLE[kind]:
        with pytest.raises(ValueError, match=f"needs k >= {qt.MIN_ASKABLE[kind]}"):
            qt.make_case(0, k, kind)
        return
    for seed in range(3):
        case = qt.make_case(seed, k, kind)
        decoded = [decode_image(a) for a in case.image_arrays()]
        assert decoded == [(t.key, t.value) for t in case.tiles]
        value = dict(d for d in decoded if [x[0] for x in decoded].count(d[0]) == 1)
        for turn in case.turns:
            assert all(key in value for key in turn.keys), "asked key not unique in the prompt"
            if turn.kind == "single":
                assert turn.answer == value[turn.keys[0]]
                assert turn.question == f"What is inside the {turn.keys[0]} square?"
            elif turn.kind == "describe":
                assert turn.answer == f"{turn.keys[0]} {value[turn.keys[0]]}"
                assert turn.question == f"Describe the {turn.keys[0]} square."
            elif turn.kind == "pair_name":
                assert turn.answer == " ".join(value[key] for key in turn.keys)
            elif turn.kind == "pair_same":
                same = value[turn.keys[0]] == value[turn.keys[1]]
                assert turn.answer == ("yes" if same else "no")
            elif turn.kind == "list_name":
                assert turn.answer == " ".join(value[key] for key in turn.keys)


def test_two_region_and_multi_turn_structure():
    same = [qt.make_case(s, 16, "pair_same").turns[0].answer for s in range(200)]
    assert 70 <= same.count("yes") <= 130  # balanced by construction
    for seed in range(50):
        pair = qt.make_case(seed, 32, "pair_name").turns[0]
        assert len(set(pair.keys)) == 2 and len(pair.answer.split()) == 2
        multi = qt.make_case(seed, 32, "multi_turn")
        assert {t.kind for t in multi.turns} == {"describe"}  # values decoded after prefill
        asked = [t.keys[0] for t in multi.turns]
        assert 2 <= len(asked) <= 3
        assert len(set(asked)) == len(asked), "a later turn must ask about a new image"
        mixed = qt.make_case(seed, 32, "multi_mixed")
        assert [t.kind for t in mixed.turns] == ["describe", "pair_name", "describe"]
        keys = [key for t in mixed.turns for key in t.keys]
        assert len(set(keys)) == 4, "every turn asks about images no earlier turn asked about"


def test_list_questions_name_three_or_four_distinct_askable_keys():
    sizes = Counter()
    for seed in range(60):
        for k in (4, 16, 64):
            case = qt.make_case(seed, k, "list_name")
            (turn,) = case.turns
            _, askable = qt.sample_tiles(random.Random(f"tile-case:{seed}:{k}:list_name"), k)
            assert turn.kind == "list_name" and len(turn.keys) in qt.LIST_KEYS
            assert len(set(turn.keys)) == len(turn.keys) and set(turn.keys) <= set(askable)
            value = {t.key: t.value for t in case.tiles}
            assert turn.answer == " ".join(value[key] for key in turn.keys)
            sizes[len(turn.keys)] += 1
    assert sizes[3] > 40 and sizes[4] > 40
    with pytest.raises(ValueError, match="needs k >= 4"):
        qt.make_case(0, 3, "list_name")


def test_list_question_text_and_answer_order():
    tiles = tuple(
        qt.Tile(key, value, 0, 0)
        for key, value in (("red", "navy"), ("blue", "teal"), ("green", "black"), ("pink", "olive"))
    )
    three = qt.list_name_turn(tiles, "red", "blue", "green")
    assert three.question == "What is inside the red, blue and green squares?"
    assert three.answer == "navy teal black" and three.keys == ("red", "blue", "green")
    four = qt.list_name_turn(tiles, "green", "pink", "red", "blue")
    assert four.question == "What is inside the green, pink, red and blue squares?"
    assert four.answer == "black olive navy teal"
    with pytest.raises(ValueError, match="at least three"):
        qt.list_name_turn(tiles, "red", "blue")


@pytest.mark.parametrize("k", (3, 8, 32))
def test_training_lists_when_asked(k):
    sizes = Counter()
    for seed in range(300):  # about 0.5 * 0.5 * 0.5 * 4.5 = 0.56 lists per case
        case = qt.make_training_case(random.Random(seed), k, list_prob=0.5, list_four_prob=0.3)
        value = {t.key: t.value for t in case.tiles}
        for turn in case.turns:
            if turn.kind == "list_name":
                assert len(set(turn.keys)) == len(turn.keys)
                assert turn.answer == " ".join(value[key] for key in turn.keys)
                sizes[len(turn.keys)] += 1
    assert sizes[3] > 60
    assert (sizes[4] > 20) if k >= 4 else not sizes[4]  # four keys need four askable


def test_default_training_cases_are_unchanged_by_lists():
    """list_prob = 0 draws exactly what the generator drew before list_name existed."""
    rng = random.Random(3)
    case = qt.make_training_case(rng, 8)
    assert case.seed == 1833671387
    assert [(t.kind, t.keys, t.answer) for t in case.turns] == [
        ("single", ("blue",), "maroon"),
        ("single", ("blue",), "maroon"),
        ("describe", ("purple",), "purple olive"),
    ]
    assert rng.random() == 0.3949634040007439
    rng = random.Random(11)
    case = qt.make_training_case(rng, 32, list_prob=0.0)
    assert case.seed == 1810144999
    assert [(t.kind, t.keys, t.answer) for t in case.turns] == [
        ("pair_name", ("cyan", "purple"), "navy olive"),
        ("pair_same", ("orange", "purple"), "no"),
        ("single", ("pink",), "olive"),
        ("pair_same", ("pink", "orange"), "no"),
        ("pair_same", ("purple", "pink"), "yes"),
        ("describe", ("cyan",), "cyan navy"),
    ]
    assert rng.random() == 0.0474015705573535


def test_task_words_are_single_tokens(quality_processor):
    tokenizer = quality_processor.tokenizer
    for word in qt.TASK_WORDS:
        assert len(tokenizer.encode(word)) == 1, word
        assert len(tokenizer.encode(" " + word)) == 1, word


@pytest.mark.parametrize("kind", qt.CASE_KINDS)
def test_chat_text_matches_the_chat_template(quality_processor, kind):
    case = qt.make_case(3, 16, kind)
    for upto in range(1, len(case.turns) + 1):
        answers = [t.answer for t in case.turns]
        messages = []
        for m in qt.messages(case, ["unused"] * case.k, answers=answers, upto=upto):
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image"} if c["type"] == "image_url" else c for c in content]
            messages.append({"role": m["role"], "content": content})
        expected = quality_processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert qt.chat_text(case, upto=upto) == expected


@pytest.mark.parametrize("k", EVAL_KS)
@pytest.mark.parametrize("kind", qt.CASE_KINDS)
def test_prompt_token_counts(quality_processor, k, kind):
    tokenizer = quality_processor.tokenizer
    case = qt.make_case(11, k, kind)
    text_tokens = len(tokenizer.encode(qt.chat_text(case, upto=1)))
    prompt = qt.prompt_tokens(case, text_tokens)
    visual = k * qt.VISUAL_TOKENS_PER_IMAGE
    assert visual == 16 * k
    # Images dominate: 16 visual + 2 delimiter tokens per image, ~45 tokens of template + question.
    assert 18 * k + 35 <= prompt <= 18 * k + 60
    assert visual / prompt > (0.74 if kind == "list_name" else 0.75)  # lists: longer question
    if k == 16:  # the processor agrees (slower for larger K)
        encoded = quality_processor(
            text=[qt.chat_text(case, upto=1)], images=case.images(), return_tensors="np"
        )
        assert encoded["input_ids"].shape[1] == prompt
        assert list(encoded["image_grid_thw"][0]) == [1, 8, 8]


def test_records_carry_everything(quality_bench):
    case = qt.make_case(2, 16, "multi_turn")
    record = case.to_record()
    assert len(record["images"]) == 16 and record["images"][0].startswith("data:image/png")
    parsed = quality_bench.case_from_record(record)
    assert parsed.case_id == case.case_id and parsed.k == 16 and parsed.kind == "multi_turn"
    assert [t.question for t in parsed.turns] == [t.question for t in case.turns]
    assert [t.answers for t in parsed.turns] == [(t.answer,) for t in case.turns]


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
def test_scoring(reply, answers, match, expected):
    assert qt.is_correct(reply, answers, match) is expected
