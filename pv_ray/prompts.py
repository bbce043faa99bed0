"""Prompts: simulated prompt augmentation for training, a held-out list for evaluation.

Training prompts describe the person ("a {cls} ...") in many actions, scenes, shots and styles
(DESIGN.md section 1, step 5). They come from the templates shipped in
``pv_ray/prompt_templates/train_templates.yaml`` or from a user file; evaluation prompts come from
``pv_ray/prompt_templates/eval_prompts.txt`` or a user file. ``{cls}`` is the class word (man, woman,
person). The two sets must not share a prompt, otherwise evaluation measures memorisation:
:func:`build_prompt_sets` refuses overlap.

Prompt files hold one prompt per line; blank lines and lines starting with ``#`` are ignored;
every prompt must contain ``{cls}`` and no other ``{...}`` placeholder.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import yaml

from pv_ray.errors import InputError

CLASS_WORDS = ("man", "woman", "person")
CLASS_PLACEHOLDER = "{cls}"
# 200 prompts cover 800 steps four times over: enough variety without logging thousands.
DEFAULT_TRAINING_COUNT = 200

_CLASS_WORD_RE = re.compile(r"[a-z]{1,20}")
# meta.json is an object holding a list: a few levels. A deeper document is refused before the
# parser sees it (60,000 "[" would exhaust its recursion).
MAX_META_NESTING = 8
_TEMPLATE_FIELDS = ("action", "scene", "shot", "style")


class PromptFileError(InputError):
    """A prompt file or prompt list is malformed; the message names the offending line."""


class PromptOverlapError(InputError):
    """Training and evaluation prompts share at least one prompt."""


@dataclass(frozen=True)
class PromptSets:
    """Formatted training and evaluation prompts for one class word, known to be disjoint."""

    train: list[str]
    eval: list[str]


def validate_class_word(word: str) -> str:
    """Return ``word`` if it is one lowercase word of 1-20 ASCII letters, else raise ValueError.

    Any such word is allowed (e.g. "boy", "girl") but man/woman/person are the defaults; the
    restriction keeps braces, spaces and newlines out of prompts built from untrusted metadata.
    """
    if not isinstance(word, str) or _CLASS_WORD_RE.fullmatch(word) is None:
        raise ValueError(
            f"class word must be one lowercase word of 1-20 letters (e.g. {', '.join(CLASS_WORDS)}); got {word!r}"
        )
    return word


def class_word_for_gender(sex: str | None) -> str:
    """The class word for insightface's sex estimate ("M", "F"; None when unknown or tied)."""
    return {"M": "man", "F": "woman"}.get(sex, "person")


@dataclass
class IdentityMeta:
    """Optional per-identity metadata (`meta.json` beside the photos): class word and prompts."""

    class_word: str | None = None
    prompts: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | str, source: str = "meta.json") -> IdentityMeta:
        """The metadata in `data` (untrusted: any malformed input is a `PromptFileError`)."""
        if _nesting_depth(data) > MAX_META_NESTING:
            raise PromptFileError(f"{source}: nested too deeply (more than {MAX_META_NESTING} levels of [ or {{)")
        try:
            raw = json.loads(data)
        except RecursionError:  # the depth check above should make this unreachable; belt and braces
            raise PromptFileError(f"{source}: nested too deeply") from None
        except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, a huge int literal
            raise PromptFileError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise PromptFileError(f"{source}: must be a JSON object")
        unknown = set(raw) - {"class", "prompts"}
        if unknown:
            raise PromptFileError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (allowed: class, prompts)")
        word = raw.get("class")
        prompts = raw.get("prompts", [])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise PromptFileError(f"{source}: 'prompts' must be a list of strings")
        for i, prompt in enumerate(prompts):  # checked here, so a bad prompt rejects the identity at ingest
            _checked_template(prompt, where=f"{source}: prompt {i + 1}")
        if word is not None:
            try:
                validate_class_word(word)
            except ValueError as e:
                raise PromptFileError(f"{source}: 'class': {e}") from None
        return cls(class_word=word, prompts=prompts)


def _nesting_depth(data: bytes | str) -> int:
    """The deepest nesting of JSON arrays and objects in `data` (brackets inside strings ignored),
    in one pass without recursion."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes | bytearray) else str(data)
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def normalize_prompt(prompt: str) -> str:
    """Case- and whitespace-insensitive key used to compare prompts."""
    return " ".join(prompt.casefold().split())


def training_prompts(
    class_word: str,
    *,
    file: str | None = None,
    extra: Sequence[str] = (),
    seed: int = 0,
    count: int | None = None,
) -> list[str]:
    """Formatted training prompts for ``class_word``.

    Without ``file``: a seeded sample of ``count`` prompts (default
    :data:`DEFAULT_TRAINING_COUNT`) from the shipped templates. With ``file``: all its prompts,
    or a seeded sample of ``count`` of them. ``extra`` (identity-specific prompts, e.g. from
    meta.json, each with ``{cls}``) are always appended; duplicates keep their first occurrence.
    """
    validate_class_word(class_word)
    if file is None:
        pool = shipped_training_templates()
        count = DEFAULT_TRAINING_COUNT if count is None else count
    else:
        pool = read_prompt_file(file)
    chosen = _sample(pool, count, seed, source=file or "the shipped training templates")
    extra_templates = [_checked_template(text, where=f"extra prompt {i + 1}") for i, text in enumerate(extra)]
    return _unique([format_prompt(t, class_word) for t in [*chosen, *extra_templates]])


def evaluation_prompts(class_word: str, *, file: str | None = None, count: int | None = None) -> list[str]:
    """Formatted evaluation prompts: the shipped list or ``file``, in order, the first ``count``."""
    validate_class_word(class_word)
    if file is None:
        pool = read_prompt_lines(_asset_text("eval_prompts.txt"), source="eval_prompts.txt")
    else:
        pool = read_prompt_file(file)
    if count is not None:
        _check_count(count, len(pool), source=file or "the shipped evaluation prompts")
        pool = pool[:count]
    return _unique([format_prompt(t, class_word) for t in pool])


def check_disjoint(train: Sequence[str], evaluation: Sequence[str]) -> None:
    """Raise PromptOverlapError listing every evaluation prompt that is also a training prompt."""
    train_keys = {normalize_prompt(p) for p in train}
    overlap = [p for p in evaluation if normalize_prompt(p) in train_keys]
    if overlap:
        listed = "; ".join(repr(p) for p in overlap[:10])
        more = f" and {len(overlap) - 10} more" if len(overlap) > 10 else ""
        raise PromptOverlapError(
            f"{len(overlap)} evaluation prompt(s) also appear in the training prompts, "
            f"so evaluation would measure memorisation: {listed}{more}"
        )


def build_prompt_sets(
    class_word: str,
    *,
    train_file: str | None = None,
    eval_file: str | None = None,
    extra: Sequence[str] = (),
    seed: int = 0,
    train_count: int | None = None,
    eval_count: int | None = None,
) -> PromptSets:
    """Training and evaluation prompts for ``class_word``, refusing any overlap between them."""
    train = training_prompts(class_word, file=train_file, extra=extra, seed=seed, count=train_count)
    evaluation = evaluation_prompts(class_word, file=eval_file, count=eval_count)
    check_disjoint(train, evaluation)
    return PromptSets(train=train, eval=evaluation)


class PromptSampler:
    """Seeded prompt sequence for training steps.

    Each epoch (``len(prompts)`` steps) visits every prompt once in a fresh seeded shuffle, so
    all prompts are used evenly. ``prompt_for_step`` is a pure function of (prompts, seed,
    step), which lets a resumed run continue the same sequence.
    """

    def __init__(self, prompts: Sequence[str], seed: int = 0) -> None:
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self._prompts = list(prompts)
        self._seed = seed
        self._epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self._prompts)

    def prompt_for_step(self, step: int) -> str:
        """The prompt used at training step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        epoch, position = divmod(step, len(self._prompts))
        if epoch != self._epoch:
            self._order = list(range(len(self._prompts)))
            # A string seed is hashed with SHA-512 by `random`: stable across processes,
            # unlike hash() of a tuple.
            random.Random(f"pv-ray-prompts:{self._seed}:{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._prompts[self._order[position]]

    def __iter__(self) -> Iterator[str]:
        return (self.prompt_for_step(step) for step in itertools.count())


def format_prompt(template: str, class_word: str) -> str:
    """Replace ``{cls}`` in ``template`` with a validated class word."""
    return template.replace(CLASS_PLACEHOLDER, validate_class_word(class_word))


def shipped_training_templates() -> list[str]:
    """Every training template from the shipped YAML (actions x scenes x shots x styles), in order."""
    spec = yaml.safe_load(_asset_text("train_templates.yaml"))
    lists = {}
    for key in ("templates", *(f"{name}s" for name in _TEMPLATE_FIELDS)):
        values = spec.get(key) if isinstance(spec, dict) else None
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise PromptFileError(f"train_templates.yaml: {key!r} must be a non-empty list of strings")
        lists[key] = values
    prompts = []
    for template in lists["templates"]:
        for values in itertools.product(*(lists[f"{name}s"] for name in _TEMPLATE_FIELDS)):
            # Fill the scene fields but leave {cls} in place for the class word.
            filled = template.format(cls=CLASS_PLACEHOLDER, **dict(zip(_TEMPLATE_FIELDS, values)))
            prompts.append(_checked_template(filled, where=f"train_templates.yaml template {template!r}"))
    return _unique(prompts)


def read_prompt_file(path: str) -> list[str]:
    """Prompt templates from a local or fsspec path (one per line, ``#`` comments allowed)."""
    with fsspec.open(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    return read_prompt_lines(text, source=path)


def read_prompt_lines(text: str, *, source: str) -> list[str]:
    """Parse prompt-file text; errors name ``source`` and the 1-based line number."""
    prompts: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        prompt = _checked_template(line, where=where)
        key = normalize_prompt(prompt)
        if key in first_line:
            raise PromptFileError(f"{where}: duplicate of the prompt on line {first_line[key]}: {line!r}")
        first_line[key] = number
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{source}: no prompts (only blank lines or # comments)")
    return prompts


def _checked_template(text: str, *, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"{where}: empty prompt")
    text = text.strip()
    if CLASS_PLACEHOLDER not in text:
        raise PromptFileError(f"{where}: prompt has no {CLASS_PLACEHOLDER} placeholder: {text!r}")
    rest = text.replace(CLASS_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        raise PromptFileError(
            f"{where}: only the {CLASS_PLACEHOLDER} placeholder is allowed, found other braces: {text!r}"
        )
    if "\n" in text or "\r" in text:
        raise PromptFileError(f"{where}: prompt spans several lines: {text!r}")
    return text


def _sample(pool: list[str], count: int | None, seed: int, *, source: str) -> list[str]:
    if count is None:
        return list(pool)
    _check_count(count, len(pool), source=source)
    return random.Random(seed).sample(pool, count)


def _check_count(count: int, available: int, *, source: str) -> None:
    if not 1 <= count <= available:
        raise ValueError(f"prompt count must be between 1 and {available} for {source}; got {count}")


def _unique(prompts: list[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for prompt in prompts:
        key = normalize_prompt(prompt)
        if key not in seen:
            seen.add(key)
            unique.append(prompt)
    return unique


def _asset_text(name: str) -> str:
    # Next to this module rather than importlib.resources: the package data is always installed
    # on disk, and a path does not depend on how the package was imported (editable installs).
    return (Path(__file__).parent / "prompt_templates" / name).read_text(encoding="utf-8")
