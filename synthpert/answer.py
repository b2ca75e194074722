"""The answer format, shared by the teacher check, the judge, training, evaluation and serving.

A model answers with a reasoning block and one final label::

    <think>
    ...mechanistic reasoning...
    </think>
    <answer>upregulated</answer>

Two parsing modes, both reported wherever answers are scored (as lm-evaluation-harness does):

* ``strict``: exact lower-case tags, exactly one ``<answer>`` block whose content is exactly one of the
  three labels (surrounding whitespace allowed).
* ``lenient``: case-insensitive tags, markdown emphasis and trailing punctuation, common synonyms
  ("up-regulated", "not DE", "unchanged", ...), a missing opening ``<think>`` (chat templates that put
  it in the prompt), repeated answer tags that agree, an "Answer: X" last line, and answer-only output
  from label-only models.

Text that could mean two labels is unparseable in both modes, with the reason. An unparseable answer is
never counted as a class: callers keep ``label=None`` and the reason.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

UP = "upregulated"
DOWN = "downregulated"
NOT_DE = "not differentially expressed"
LABELS: tuple[str, str, str] = (UP, DOWN, NOT_DE)
# Short names used for probability columns and JSON keys.
SHORT = {UP: "up", DOWN: "down", NOT_DE: "not_de"}
SHORT_KEYS: tuple[str, str, str] = tuple(SHORT[lab] for lab in LABELS)  # ("up", "down", "not_de")
# The words tables, prompts' lookup lines and console summaries show a class by.
DISPLAY = {UP: "up", DOWN: "down", NOT_DE: "not DE"}
UNPARSEABLE = "unparseable"

# The judge's rating scale, best first. Every rating a judge may give, a config may name and a summary counts.
EXCELLENT, GOOD, AVERAGE, BAD, TERRIBLE = RATINGS = ("excellent", "good", "average", "bad", "terrible")


def canonical_class(name: str) -> str | None:
    """The label a config key names, short (up, down, not_de) or full; None for an unknown name."""
    t = name.strip().lower()
    return t if t in LABELS else {v: k for k, v in SHORT.items()}.get(t)

THINK_OPEN = "<think>"  # what a prompt ends with to start a reasoning block (merge's probes)
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def open_tag_suffix(text: str) -> int:
    """Length of the end of ``text`` that is the start of one of the format's tags (0 if none): a stream
    holds those characters back so every tag reaches the client whole."""
    for n in range(min(len(text), max(map(len, TAGS)) - 1), 0, -1):
        if any(len(tag) > n and tag.startswith(text[-n:]) for tag in TAGS):
            return n
    return 0

STRICT = "strict"
LENIENT = "lenient"
MODES = (STRICT, LENIENT)

_ANSWER_STRICT = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_LENIENT = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.DOTALL | re.IGNORECASE)
_THINK_STRICT = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER_OPEN_LENIENT = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_THINK_OPEN_LENIENT = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_THINK_CLOSE_LENIENT = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_FINAL_LINE = re.compile(r"^\s*(?:\**\s*)?(?:final\s+answer|answer|prediction)\s*(?:\**\s*)?[:\-]\s*(.+?)\s*$",
                         re.IGNORECASE)

# Lenient synonyms, matched against the WHOLE normalised answer text (never as substrings), so that
# "not upregulated" or "upregulated or downregulated" stay unparseable instead of being guessed.
_SYNONYMS: dict[str, str] = {}
for _label, _words in {
    UP: ["upregulated", "up-regulated", "up regulated", "upregulation", "up-regulation", "up",
         "increased", "increase", "increased expression", "upregulated (increased expression)"],
    DOWN: ["downregulated", "down-regulated", "down regulated", "downregulation", "down-regulation", "down",
           "decreased", "decrease", "decreased expression", "downregulated (decreased expression)"],
    NOT_DE: ["not differentially expressed", "not de", "non-de", "non de", "no change", "unchanged",
             "not changed", "no significant change", "not significantly changed", "no effect",
             "not differentially-expressed", "not differentially expressed (no change)"],
}.items():
    for _w in _words:
        _SYNONYMS[_w] = _label


@dataclass(frozen=True)
class ParsedAnswer:
    """Result of parsing one model output. ``label`` is None exactly when ``error`` says why."""

    label: str | None
    has_reasoning: bool
    reasoning: str | None
    error: str | None
    mode: str

    @property
    def ok(self) -> bool:
        return self.label is not None

    def to_dict(self) -> dict:
        return asdict(self)


def format_answer(label: str, reasoning: str | None = None) -> str:
    """Canonical text of an answer; what training targets and what the strict parser accepts."""
    check_label(label)
    if reasoning is None:
        return f"{ANSWER_OPEN}{label}{ANSWER_CLOSE}"
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}{label}{ANSWER_CLOSE}"


def check_label(label: str) -> str:
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    return label


def normalise_label(text: str) -> str | None:
    """Map free text to a label by whole-string synonym match after stripping markup; None if no match."""
    t = text.strip().lower()
    t = re.sub(r"[*_`\"']", "", t)  # markdown emphasis, code and quotes
    t = re.sub(r"\s+", " ", t).strip()
    t = t.rstrip(".!;:,").strip()
    return _SYNONYMS.get(t)


def parse_answer(text: str | None, mode: str = STRICT) -> ParsedAnswer:
    if mode not in MODES:
        raise ValueError(f"unknown parse mode {mode!r}; expected one of {MODES}")
    if text is None or not text.strip():
        return ParsedAnswer(None, False, None, "empty output", mode)
    return _parse_strict(text) if mode == STRICT else _parse_lenient(text)


def parse_both(text: str | None) -> dict[str, ParsedAnswer]:
    return {m: parse_answer(text, m) for m in MODES}


def _fail(error: str, mode: str, reasoning: str | None = None) -> ParsedAnswer:
    return ParsedAnswer(None, reasoning is not None, reasoning, error, mode)


def _parse_strict(text: str) -> ParsedAnswer:
    thinks = _THINK_STRICT.findall(text)
    reasoning = thinks[0].strip() if len(thinks) == 1 else None
    if len(thinks) > 1:
        return _fail("more than one <think> block", STRICT)
    if text.count("<think>") != text.count("</think>"):
        return _fail("unbalanced <think> tags", STRICT)
    answers = _ANSWER_STRICT.findall(text)
    if not answers:
        return _fail("no <answer>...</answer> tag", STRICT, reasoning)
    # A second answer tag in another spelling (<ANSWER>, < answer >) could mean a second label: ambiguous.
    if len(answers) > 1 or len(_ANSWER_OPEN_LENIENT.findall(text)) > 1:
        return _fail("more than one <answer> tag", STRICT, reasoning)
    content = answers[0].strip()
    if content not in LABELS:
        return _fail(f"answer {content[:60]!r} is not exactly one of the three labels", STRICT, reasoning)
    if reasoning is not None and text.find("</think>") > text.find("<answer>"):
        return _fail("<answer> appears inside the reasoning block", STRICT, reasoning)
    return ParsedAnswer(content, reasoning is not None and bool(reasoning), reasoning, None, STRICT)


def strip_reasoning(text: str) -> str:
    """The text with every ``<think>…</think>`` block removed (any case)."""
    return re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL | re.IGNORECASE)


def reasoning_context(text: str) -> str:
    """The generated text that the answer strings are scored after: everything before the first
    ``<answer>`` tag; a ``<think>`` block left open (the model ran out of tokens) is closed, so every
    backend scores the three answers at the same, well-formed position."""
    m = _ANSWER_OPEN_LENIENT.search(text)
    head = text[: m.start()] if m else text
    if "<think>" in head and "</think>" not in head:
        head = head.rstrip() + "\n</think>\n"
    return head


def think_block(text: str) -> str | None:
    """The first strict ``<think>…</think>`` block of ``text``, tags included; None when there is none."""
    m = _THINK_STRICT.search(text)
    return m.group(0) if m else None


def answer_block(text: str) -> str | None:
    """The first strict ``<answer>…</answer>`` block of ``text``, tags included; None when there is none."""
    m = _ANSWER_STRICT.search(text)
    return m.group(0) if m else None


def _split_reasoning_lenient(text: str) -> tuple[str | None, str]:
    """Return (reasoning, rest). A closing </think> without an opening one counts as reasoning."""
    closes = list(_THINK_CLOSE_LENIENT.finditer(text))
    if not closes:
        return None, text
    last_close = closes[-1]
    before = text[: last_close.start()]
    opens = list(_THINK_OPEN_LENIENT.finditer(before))
    start = opens[0].end() if opens else 0
    reasoning = before[start:].strip()
    return (reasoning or None), text[last_close.end():]


def _parse_lenient(text: str) -> ParsedAnswer:
    reasoning, rest = _split_reasoning_lenient(text)
    answers = _ANSWER_LENIENT.findall(rest) or _ANSWER_LENIENT.findall(text)
    if answers:
        labels = [normalise_label(a) for a in answers]
        if any(lab is None for lab in labels):
            bad = next(a for a, lab in zip(answers, labels) if lab is None)
            return _fail(f"answer {bad.strip()[:60]!r} is not a recognised label", LENIENT, reasoning)
        if len(set(labels)) > 1:
            return _fail(f"answer tags disagree: {sorted(set(labels))}", LENIENT, reasoning)
        return ParsedAnswer(labels[0], reasoning is not None, reasoning, None, LENIENT)
    # No answer tag: answer-only output ("Upregulated."), or an "Answer: X" final line.
    whole = normalise_label(rest)
    if whole is not None:
        return ParsedAnswer(whole, reasoning is not None, reasoning, None, LENIENT)
    lines = [ln for ln in rest.strip().splitlines() if ln.strip()]
    if lines:
        m = _FINAL_LINE.match(lines[-1])
        if m:
            label = normalise_label(m.group(1))
            if label is not None:
                return ParsedAnswer(label, reasoning is not None, reasoning, None, LENIENT)
            return _fail(f"final answer line {m.group(1)[:60]!r} is not a recognised label", LENIENT, reasoning)
    return _fail("no answer tag and no recognisable final answer", LENIENT, reasoning)


# What a model's raw output can get wrong, as counted in teacher summaries. One parse-status problem at most
# (no answer tag / a tag whose content no parser reads / the label readable only leniently), plus any of the
# others. A strong teacher has none; a 135 M model shows all of them.
OUTPUT_PROBLEMS = ("empty", "no_answer_tag", "unrecognised_answer", "label_in_other_words", "hit_length_cap",
                   "repetition", "answer_disagrees_with_label")
_WORD = re.compile(r"[a-z0-9]+")


def repetitive(text: str, n: int = 8, times: int = 3) -> bool:
    """Whether some run of ``n`` words occurs ``times`` or more: the loop a small model falls into."""
    words = _WORD.findall(text.lower())
    seen: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return True
    return False


def output_problems(text: str | None, finish_reason: str | None = None, label: str | None = None) -> list[str]:
    """Everything wrong with one raw output, for counting (never for deciding: parse_answer decides)."""
    capped = ["hit_length_cap"] if finish_reason == "length" else []
    if text is None or not text.strip():
        return ["empty", *capped]
    strict, lenient = parse_answer(text, STRICT), parse_answer(text, LENIENT)
    problems = []
    if not strict.ok:
        if lenient.ok:
            problems.append("label_in_other_words")
        elif not _ANSWER_OPEN_LENIENT.search(text):
            problems.append("no_answer_tag")
        else:
            problems.append("unrecognised_answer")
    problems += capped
    if repetitive(text):
        problems.append("repetition")
    if label is not None and lenient.ok and lenient.label != label:
        problems.append("answer_disagrees_with_label")
    return problems


def template_globals() -> dict:
    """What every prompt template sees: the tags, the labels and the answer format, so no prompt file
    spells them itself (a change of format here changes every prompt with it)."""
    return {"THINK_OPEN": THINK_OPEN, "THINK_CLOSE": THINK_CLOSE, "ANSWER_OPEN": ANSWER_OPEN,
            "ANSWER_CLOSE": ANSWER_CLOSE, "UP": UP, "DOWN": DOWN, "NOT_DE": NOT_DE, "answer_tag": format_answer,
            "label_list": f"{UP}, {DOWN}, or {NOT_DE}",
            "answer_choices": f"{format_answer(UP)}, {format_answer(DOWN)} or {format_answer(NOT_DE)}"}
