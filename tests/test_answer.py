import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthpert.answer import (
    DOWN,
    LABELS,
    LENIENT,
    NOT_DE,
    STRICT,
    UP,
    format_answer,
    parse_answer,
    parse_both,
)


@pytest.mark.parametrize("label", LABELS)
def test_canonical_format_parses_in_both_modes(label):
    text = format_answer(label, "Loss of X relieves repression of Y.")
    for mode in (STRICT, LENIENT):
        p = parse_answer(text, mode)
        assert p.label == label and p.has_reasoning and p.error is None
        assert p.reasoning == "Loss of X relieves repression of Y."


@pytest.mark.parametrize("text,label", [
    ("<think>r</think>\n<ANSWER> Up-regulated </ANSWER>", UP),
    ("<think>r</think><answer>**Downregulated**.</answer>", DOWN),
    ("<think>r</think><answer>not DE</answer>", NOT_DE),
    ("<think>r</think><answer>unchanged</answer>", NOT_DE),
    ("reasoning without opening tag</think>\n<answer>upregulated</answer>", UP),
    ("Upregulated.", UP),
    ("  **not differentially expressed**  ", NOT_DE),
    ("<think>r</think>\nSome discussion.\nFinal answer: downregulated", DOWN),
    ("<think>r</think><answer>up</answer> then again <answer>upregulated</answer>", UP),
])
def test_lenient_accepts_common_variants_strict_rejects_them(text, label):
    assert parse_answer(text, LENIENT).label == label
    assert parse_answer(text, STRICT).label is None
    assert parse_answer(text, STRICT).error


def test_missing_open_think_tag_is_reasoning_in_lenient():
    p = parse_answer("Because MYC drives it.</think><answer>upregulated</answer>", LENIENT)
    assert p.has_reasoning and p.reasoning == "Because MYC drives it."


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("<think>r</think>", "no <answer>"),
    ("<answer>upregulated</answer><answer>downregulated</answer>", "more than one"),
    ("<answer>upregulated or downregulated</answer>", "not exactly"),
    ("<answer>not upregulated</answer>", "not exactly"),
    ("<think>a</think><think>b</think><answer>upregulated</answer>", "more than one <think>"),
])
def test_strict_failures_name_the_reason(text, reason):
    p = parse_answer(text, STRICT)
    assert p.label is None and reason in p.error


@pytest.mark.parametrize("text", [
    "<answer>upregulated</answer><answer>downregulated</answer>",
    "<answer>upregulated or downregulated</answer>",
    "<answer>not upregulated</answer>",
    "<answer>maybe up</answer>",
    "It could be upregulated, or downregulated.",
    "upregulated downregulated",
    "The answer is unclear.",
    "Final answer: up or down",
])
def test_ambiguous_text_is_unparseable_in_both_modes(text):
    for p in parse_both(text).values():
        assert p.label is None and p.error


def test_unknown_mode_and_label_raise():
    with pytest.raises(ValueError):
        parse_answer("x", "fuzzy")
    with pytest.raises(ValueError):
        format_answer("sideways")


@given(st.sampled_from(LABELS), st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1,
                                         max_size=200).filter(lambda s: s.strip()))
@settings(max_examples=200, deadline=None)
def test_roundtrip_any_reasoning(label, reasoning):
    text = format_answer(label, reasoning)
    for mode in (STRICT, LENIENT):
        assert parse_answer(text, mode).label == label


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parser_never_crashes_and_never_invents_a_label(text):
    for mode in (STRICT, LENIENT):
        p = parse_answer(text, mode)
        assert (p.label is None) == (p.error is not None)
        assert p.label in (None, *LABELS)


@given(st.lists(st.sampled_from(LABELS), min_size=2, max_size=4, unique=True), st.text(max_size=40))
@settings(max_examples=100, deadline=None)
def test_disagreeing_answer_tags_never_parse(labels, filler):
    text = filler.replace("<", "").replace(">", "") + "".join(f"<answer>{lab}</answer>" for lab in labels)
    for mode in (STRICT, LENIENT):
        assert parse_answer(text, mode).label is None


def test_prompt_files_take_tags_and_labels_from_answer_py():
    """No prompt file spells the answer tags or the labels: they come from answer.template_globals, so a
    format change in answer.py changes every prompt with it."""
    import re
    from pathlib import Path

    from synthpert.answer import ANSWER_OPEN, LABELS, THINK_OPEN
    from synthpert.prompting import student_messages

    prompts = Path(__file__).resolve().parents[1] / "prompts"
    for f in prompts.iterdir():
        text = re.sub(r"\{#.*?#\}", "", f.read_text(), flags=re.DOTALL)  # comments may name them
        for literal in ("<think>", "</think>", "<answer>", "</answer>", *LABELS):
            assert literal not in text, f"{f.name} spells {literal!r}"
    user = student_messages("k562", "MYC", "GAPDH")[1]["content"]
    assert all(f"{ANSWER_OPEN}{lab}" in user for lab in LABELS)
    assert THINK_OPEN in student_messages("k562", "MYC", "GAPDH")[0]["content"]


def test_open_tag_suffix_holds_back_only_the_start_of_a_format_tag():
    from synthpert.answer import ANSWER_OPEN, THINK_CLOSE, open_tag_suffix

    assert open_tag_suffix("text <ans") == len("<ans") and open_tag_suffix("done </thi") == len("</thi")
    assert open_tag_suffix("a <") == 1 and open_tag_suffix("x" + THINK_CLOSE) == 0
    assert open_tag_suffix("p < 0.05") == 0 and open_tag_suffix("<b") == 0  # not a format tag: sent at once
    assert open_tag_suffix(ANSWER_OPEN[:-1]) == len(ANSWER_OPEN) - 1


def test_output_problems_name_what_a_small_model_gets_wrong():
    from synthpert.answer import DOWN, UP, format_answer, output_problems

    assert output_problems(format_answer(UP, "reason"), "stop", UP) == []
    assert output_problems("", "length", UP) == ["empty", "hit_length_cap"]
    assert output_problems("Knockdown of X lowers Y", "length", UP) == ["no_answer_tag", "hit_length_cap"]
    assert output_problems("<think>r</think><answer>Increased.</answer>", "stop", UP) == ["label_in_other_words"]
    assert output_problems("<think>r</think><answer>maybe</answer>", "stop", UP) == ["unrecognised_answer"]
    assert output_problems(format_answer(DOWN, "r"), "stop", UP) == ["answer_disagrees_with_label"]
    loop = "it is no longer able to carry cargo; " * 4
    assert "repetition" in output_problems(loop, "length", None)
    assert "repetition" not in output_problems(format_answer(UP, "RPS19 loss activates TP53, which induces MDM2."))
