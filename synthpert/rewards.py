"""Reward functions of `synthpert rl`: correctness (per-class weights), format and length, in TRL's signature.

Each function is named (``__name__``) for what it scores, so TRL logs it as ``rewards/<name>/mean``. They
read the target from the dataset's ``label`` column and parse completions with answer.py's parser: the
reward agrees with how evaluation reads an answer.
"""

from __future__ import annotations

from .answer import LABELS, LENIENT, STRICT, canonical_class, parse_answer
from .config.rl import RewardSettings

AROMA = {"correct": 5.0, "wrong": -1.0}


def class_weights(settings: RewardSettings, shares: list[float] | None) -> dict[str, float]:
    """Reward of a correct answer per class. inverse_frequency: 1/(3·share), so that a perfect model's mean
    correctness over the prompts is 1 whatever the class mix; a class absent from the prompts is never a
    target and gets 1."""
    if settings.preset == "aroma":
        weights = {c: AROMA["correct"] for c in LABELS}
    else:
        if shares is None:
            raise ValueError("inverse_frequency weights need the class shares of the prompts")
        weights = {c: (1.0 / (len(LABELS) * s) if s > 0 else 1.0) for c, s in zip(LABELS, shares)}
    for name, value in (settings.correct or {}).items():
        weights[canonical_class(name)] = float(value)
    return weights


def wrong_reward(settings: RewardSettings) -> float:
    if settings.wrong is not None:
        return settings.wrong
    return AROMA["wrong"] if settings.preset == "aroma" else 0.0


def completion_text(completion) -> str:
    """TRL hands conversational completions as a list of messages, plain ones as a string."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def make_correctness(weights: dict[str, float], wrong: float):
    # Lenient parse: the format reward already pays for strictness; correctness asks only which label the
    # model committed to, as evaluation's lenient filter does.
    def correctness(prompts=None, completions=(), label=(), **_) -> list[float]:
        out = []
        for c, target in zip(completions, label, strict=True):
            got = parse_answer(completion_text(c), LENIENT).label
            out.append(weights[target] if got == target else wrong)
        return out

    return correctness


def make_format(bonus: float):
    def format(prompts=None, completions=(), **_) -> list[float]:  # noqa: A001 - TRL logs the function's name
        return [bonus if parse_answer(completion_text(c), STRICT).ok else 0.0 for c in completions]

    return format


def make_length(penalty: float, max_completion_length: int):
    def length(prompts=None, completions=(), completion_ids=None, **_) -> list[float]:
        if completion_ids is None:
            raise ValueError("the length reward needs completion_ids (TRL passes them)")
        return [-penalty * len(ids) / max_completion_length for ids in completion_ids]

    return length


def reward_functions(settings: RewardSettings, shares: list[float] | None, max_completion_length: int) -> list:
    """The reward functions for TRL, in the order their weights (all 1) apply."""
    funcs = [make_correctness(class_weights(settings, shares), wrong_reward(settings))]
    if settings.format:
        funcs.append(make_format(settings.format))
    if settings.length_penalty:
        funcs.append(make_length(settings.length_penalty, max_completion_length))
    return funcs
