"""Tests for pv_ray.prompts: shipped sets, user files, disjointness, seeded sampling."""

from __future__ import annotations

import collections

import pytest

from pv_ray import prompts
from pv_ray.prompts import (
    PromptFileError,
    PromptOverlapError,
    PromptSampler,
    build_prompt_sets,
    check_disjoint,
    evaluation_prompts,
    training_prompts,
    validate_class_word,
)


@pytest.mark.parametrize("word", prompts.CLASS_WORDS)
def test_shipped_training_prompts_are_many_distinct_and_name_the_class(word):
    train = training_prompts(word)
    assert len(train) == prompts.DEFAULT_TRAINING_COUNT >= 50
    assert len({prompts.normalize_prompt(p) for p in train}) == len(train)
    assert all(f"a {word} " in p for p in train)
    assert not any("{" in p for p in train)


def test_shipped_templates_vary_every_dimension():
    templates = prompts.shipped_training_templates()
    assert len(templates) >= 50
    # Every action appears in many prompts: the product really is enumerated.
    assert sum("playing the guitar" in t for t in templates) == len(templates) // 16
    assert sum(t.startswith("close-up of a {cls}") for t in templates) > 0


def test_training_prompts_are_deterministic_per_seed():
    assert training_prompts("man", seed=3) == training_prompts("man", seed=3)
    assert training_prompts("man", seed=3) != training_prompts("man", seed=4)
    assert len(training_prompts("man", count=60)) == 60


def test_shipped_eval_prompts_are_disjoint_from_every_training_template():
    for word in prompts.CLASS_WORDS:
        evaluation = evaluation_prompts(word)
        assert 10 <= len(evaluation) <= 20
        all_training = [prompts.format_prompt(t, word) for t in prompts.shipped_training_templates()]
        check_disjoint(all_training, evaluation)
    sets = build_prompt_sets("person", eval_count=5)
    assert len(sets.eval) == 5 and sets.eval == evaluation_prompts("person")[:5]


def test_overlapping_user_eval_file_is_refused_listing_the_prompts(tmp_path):
    train = training_prompts("woman", seed=0)
    overlap = train[0].replace("woman", "{cls}")
    eval_file = tmp_path / "eval.txt"
    # Same prompt up to case and spacing: still an overlap.
    variant = overlap.replace(" of a {cls}", " OF  A {cls}")
    assert variant != overlap
    eval_file.write_text(f"a {{cls}} on the moon\n{variant}\n")
    with pytest.raises(PromptOverlapError, match="1 evaluation prompt") as info:
        build_prompt_sets("woman", eval_file=str(eval_file))
    assert variant.replace("{cls}", "woman") in str(info.value)
    assert "on the moon" not in str(info.value)


def test_check_disjoint_normalises_case_and_whitespace():
    with pytest.raises(PromptOverlapError, match="A  Man"):
        check_disjoint(["a man walking"], ["A  Man walking ", "a man flying"])
    check_disjoint(["a man walking"], ["a man walking slowly"])


def test_user_training_file_is_parsed_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("# my prompts\n\na {cls} rowing a boat\n   a {cls} at a desk  \n# end\n")
    assert training_prompts("person", file=str(path)) == ["a person rowing a boat", "a person at a desk"]
    assert len(training_prompts("person", file=str(path), count=1, seed=1)) == 1
    with pytest.raises(ValueError, match="between 1 and 2"):
        training_prompts("person", file=str(path), count=3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a {cls} ok\n\na man without placeholder\n", r":3: prompt has no \{cls\} placeholder"),
        ("# c\na {cls} with {style}\n", r":2: only the \{cls\} placeholder is allowed"),
        ("a {cls} twice\nA {cls}  TWICE\n", r":2: duplicate of the prompt on line 1"),
        ("# only comments\n\n", "no prompts"),
    ],
)
def test_user_file_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message) as info:
        training_prompts("man", file=str(path))
    assert str(path) in str(info.value)


def test_extra_prompts_are_appended_once_and_validated():
    train = training_prompts("man", extra=["a {cls} in a red scarf", "A {cls} in a red scarf"])
    assert train[-1] == "a man in a red scarf"
    assert len(train) == prompts.DEFAULT_TRAINING_COUNT + 1
    with pytest.raises(PromptFileError, match=r"extra prompt 1: prompt has no \{cls\}"):
        training_prompts("man", extra=["a red scarf"])


@pytest.mark.parametrize("word", ["Man", "two words", "{cls}", "man\n", "", "x" * 21, "é"])
def test_invalid_class_words_are_rejected(word):
    with pytest.raises(ValueError, match="one lowercase word"):
        validate_class_word(word)
    with pytest.raises(ValueError, match="one lowercase word"):
        training_prompts(word)


def test_class_word_for_insightface_sex_estimate():
    assert [prompts.class_word_for_gender(g) for g in ("M", "F", None, "?")] == ["man", "woman", "person", "person"]


def test_sampler_uses_every_prompt_once_per_epoch_and_is_seeded():
    pool = [f"prompt {i}" for i in range(7)]
    sampler = PromptSampler(pool, seed=5)
    steps = [sampler.prompt_for_step(s) for s in range(21)]
    for epoch in range(3):
        assert sorted(steps[epoch * 7 : (epoch + 1) * 7]) == sorted(pool)
    assert steps[:7] != steps[7:14]  # reshuffled each epoch
    assert collections.Counter(steps) == collections.Counter(pool * 3)
    # Pure function of (prompts, seed, step): a fresh sampler or out-of-order access agrees.
    assert PromptSampler(pool, seed=5).prompt_for_step(15) == steps[15]
    assert [p for _, p in zip(range(21), PromptSampler(pool, seed=5))] == steps
    assert [p for _, p in zip(range(21), PromptSampler(pool, seed=6))] != steps
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSampler([])
