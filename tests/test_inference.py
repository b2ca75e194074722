"""The transformers backend: batching changes nothing, PEFT and merged weights agree, records are complete."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TRIPLES = [("k562", "MYC", "GAPDH", "upregulated"), ("k562", "TP53", "CDKN1A", "downregulated"),
           ("rpe1", "ATF4", "DDIT3", "not differentially expressed")]


def _triples():
    from synthpert.inference import Triple

    return [Triple(f"{c}:{p}:{g}", c, p, g, lab) for c, p, g, lab in TRIPLES]


@pytest.fixture(scope="module")
def peft_backend(tiny_model_dir, tiny_adapter_dir):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    return make_backend(InferenceConfig(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), max_new_tokens=12,
                                        batch_size=3))


def test_records_batched_equal_one_by_one(peft_backend):
    from synthpert.inference import Predictor

    pred = Predictor(peft_backend)
    batched = pred.predict(_triples())
    single = [pred.predict([t])[0] for t in _triples()]
    for b, s in zip(batched, single):
        assert b.raw_text == s.raw_text  # left padding does not change greedy output
        assert b.answer_logprobs == pytest.approx(s.answer_logprobs, abs=1e-4)
        assert b.probability_method == "answer_logprob"
        assert sum(b.probabilities.values()) == pytest.approx(1)
        assert b.gold in ("upregulated", "downregulated", "not differentially expressed")
        assert b.prompt_tokens > 50 and 0 < b.completion_tokens <= 12
        assert (b.label_strict is None) == (b.unparseable_reason_strict is not None)


def test_shared_prompt_scoring_equals_scoring_each_sequence_whole(peft_backend):
    """The KV-cache path (prompt once, left-padded, then each answer block) gives the log-probabilities of
    the plain path (prompt + answer as one right-padded sequence), for prompts of different lengths."""
    from synthpert.backends import answer_continuations

    queries = [peft_backend.prepare(m) for m in _messages()]
    contexts = [q.prompt_ids + q.prompt_ids[: 7 * i] for i, q in enumerate(queries)]
    conts = answer_continuations(peft_backend.tokenizer) + [[5, 9, 11, 13, 2, 7, 8]]
    assert len({len(c) for c in conts}) > 1  # continuations of unequal length
    shared = peft_backend._score_shared(contexts, conts)
    flat = peft_backend._score([c for c in contexts for _ in conts], conts * len(contexts))
    assert len(shared) == len(contexts)
    for i, row in enumerate(shared):
        for j, tokens in enumerate(row):
            assert tokens == pytest.approx(flat[i * len(conts) + j], abs=1e-4)


@pytest.mark.parametrize("at_answer", ["all", "some", "none"])
def test_one_prefill_for_generation_and_scoring_equals_the_two_passes(peft_backend, monkeypatch, at_answer):
    """generate_and_score shares the prompt's forward pass: same texts as generate, and the answer blocks'
    log-probabilities of answer_logprobs, whether a row's generation starts at its answer (scored from the
    shared cache, a subset of the batch selected out of it) or with reasoning (scored after it)."""
    import synthpert.backends.transformers as backends

    from synthpert.prompting import student_messages

    six = [("k562", "MYC", "GAPDH"), ("k562", "TP53", "CDKN1A"), ("rpe1", "ATF4", "DDIT3"), ("k562", "GATA1", "HBG1"),
           ("hepg2", "XBP1", "HSPA5"), ("jurkat", "STAT5A", "MYB")]
    queries = [peft_backend.prepare(student_messages(*t)) for t in six]  # two batches of 3, unequal lengths
    gens = peft_backend.generate(queries)
    texts = [g[0].text for g in gens]
    # Which generations count as "at the answer" decides the path; the tiny adapter's own texts are whatever
    # it writes, so the test names them: the ones at the answer are scored with an empty reasoning context.
    chosen = {"all": set(range(6)), "some": {0, 2, 4}, "none": set()}[at_answer]
    real = backends.reasoning_context
    at = {texts[i] for i in chosen}
    assert all(real(texts[i]) for i in range(6) if i not in chosen)  # these start with reasoning
    assert not at & {texts[i] for i in range(6) if i not in chosen}, "rows of the two kinds need distinct texts"
    expected = peft_backend.answer_logprobs(queries, ["" if i in chosen else texts[i] for i in range(6)])
    monkeypatch.setattr(backends, "reasoning_context", lambda t: "" if t in at else real(t))
    shared_gens, scores = peft_backend.generate_and_score(queries)
    assert [g[0].text for g in shared_gens] == texts
    assert [g[0].finish_reason for g in shared_gens] == [g[0].finish_reason for g in gens]
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=1e-4)


def test_answers_read_off_the_scored_blocks_equal_decoding(peft_backend, monkeypatch):
    """Where a scored block is exactly what greedy decoding writes (each token the argmax where it is predicted,
    then an end-of-turn token), generate_and_score takes it as the generation without decoding: text, token
    count, finish reason and scores equal the decoding path's, and only the other rows are decoded. The tiny
    adapter does not answer at once, so the block here is its own greedy output, cut where an extra
    end-of-turn token is declared (both paths stop there)."""
    import synthpert.backends.transformers as backends
    from synthpert.backends import answer_continuations
    from synthpert.prompting import student_messages

    b = peft_backend
    queries = [b.prepare(student_messages(*t)) for t in [("k562", "MYC", "GAPDH"), ("k562", "TP53", "CDKN1A")]]
    queries.append(b.prepare([{"role": "user", "content": "Name a colour."}]))  # writes something else
    ids, mask, _ = b._left_pad([queries[0].prompt_ids], b.tokenizer.pad_token_id)
    toks = b.model.generate(input_ids=ids, attention_mask=mask,
                            **b._sampling_kwargs(12, 0.0, 1.0, 1))[0, ids.shape[1]:].tolist()
    k = next(k for k in range(2, len(toks)) if toks[k] not in toks[:k] and toks[k] not in b.eos_ids)
    monkeypatch.setattr(b, "eos_ids", sorted({*b.eos_ids, toks[k]}))
    block = toks[:k]
    conts = answer_continuations(b.tokenizer) + [block]
    text = b.tokenizer.decode(block, skip_special_tokens=True)
    real = backends.reasoning_context
    monkeypatch.setattr(backends, "reasoning_context", lambda t: "" if t == text else real(t))
    decoded_rows = []
    decode = b._decode_then_score
    monkeypatch.setattr(b, "_decode_then_score", lambda batch, c: decoded_rows.append(len(batch)) or decode(batch, c))

    import torch

    b._shortcut_pause = 0
    with torch.inference_mode():
        got_gens, got_scores = b._generate_and_score_batch(queries, conts)
        b.answer_shortcut = False
        try:
            want_gens, want_scores = b._generate_and_score_batch(queries, conts)
        finally:
            b.answer_shortcut = True
    assert (got_gens[0].text, got_gens[0].finish_reason, got_gens[0].completion_tokens) == (text, "stop", len(block))
    assert want_gens[1].text == text and want_gens[2].text != text
    assert decoded_rows[0] == 1  # rows 0 and 1 were read off the block, row 2 was decoded
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in got_gens] == \
        [(g.text, g.completion_tokens, g.finish_reason) for g in want_gens]
    for got, want in zip(got_scores, want_scores):
        assert (got is None) == (want is None)
        if got is not None:
            assert got == pytest.approx(want, abs=1e-4)


def test_a_batch_sharing_its_prompt_beginning_is_prefilled_once_with_the_same_logits(peft_backend):
    """The shared beginning of a batch's prompts runs once and its cache is copied to every row: last-position
    logits equal those of the plain left-padded batch."""
    import torch

    from synthpert.prompting import student_messages

    b = peft_backend
    rows = [b.prepare(student_messages("k562", "MYC", g)).prompt_ids for g in ("GAPDH", "CDKN1A", "HBG1")]
    rows[1] = rows[1] + rows[1][-5:]  # unequal lengths: the rows' own rests are padded after the shared part
    with torch.inference_mode():
        shared, _, mask, _ = b._prefill_shared(rows)
    assert mask.shape[1] == max(len(r) for r in rows) and (mask == 0).any()
    ids, m, pos = b._left_pad(rows, b.tokenizer.pad_token_id)
    with torch.inference_mode():
        plain = b.model(input_ids=ids, attention_mask=m, position_ids=pos).logits[:, -1]
    assert torch.allclose(shared, plain, atol=1e-4)


def test_samples_of_a_prompt_prefilled_once_equal_generates_own_repeats(peft_backend, monkeypatch):
    """n sampled completions per prompt: each prompt is prefilled once and its cache repeated, and the samples
    (same seed) are the ones generate() gives when it prefills every copy itself, unequal prompt lengths too."""
    from synthpert.prompting import student_messages

    b = peft_backend
    qs = [b.prepare(student_messages("k562", "MYC", g)) for g in ("GAPDH", "CDKN1A")]
    qs.append(b.prepare(student_messages("rpe1", "RPS19", "MDM2")))
    calls = []
    hook = b.model.get_input_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    texts = {}
    try:
        for share in (False, True):
            monkeypatch.setattr(b, "share_prefix", share)
            calls.clear()
            texts[share] = [[g.text for g in row] for row in b.generate(qs, n=3, max_new_tokens=10, temperature=1.0,
                                                                         seed=7)]
            prompt_rows = sum(rows for rows, width in calls if width > 1)  # the prompt passes, not decoding steps
            assert prompt_rows == (3 if share else 9)  # one row per prompt, or one per sample
    finally:
        hook.remove()
    assert texts[True] == texts[False]
    assert any(len(set(row)) > 1 for row in texts[True])  # really sampled: not three copies of one text


def test_merged_model_matches_peft_adapter(peft_backend, tiny_model_dir, tiny_adapter_dir):
    from synthpert.backends import make_backend
    from synthpert.config.evaluate import InferenceConfig

    merged = make_backend(InferenceConfig(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), merge_adapter=True))
    base = make_backend(InferenceConfig(model=str(tiny_model_dir)))
    queries = [peft_backend.prepare(m) for m in _messages()]
    texts = ["<think>\nThe knockdown removes a ribosomal protein.\n</think>\n"] * len(queries)
    a = peft_backend.answer_logprobs(queries, texts)
    b = merged.answer_logprobs(queries, texts)
    c = base.answer_logprobs([base.prepare(m) for m in _messages()], texts)
    assert max(abs(x - y) for r, s in zip(a, b) for x, y in zip(r, s)) < 1e-3
    assert max(abs(x - y) for r, s in zip(a, c) for x, y in zip(r, s)) > 1e-2  # the adapter does something


def test_adapter_chat_template_is_used(peft_backend, tiny_adapter_dir):
    from synthpert.resources import sha256_text

    saved = (tiny_adapter_dir / "chat_template.jinja")
    if saved.exists():
        assert peft_backend.chat_template_hash() == sha256_text(saved.read_text())
    assert peft_backend.describe()["adapter_version"]


def test_missing_vllm_or_folder_gives_clear_errors(tmp_path):
    from synthpert.errors import SynthpertError
    from synthpert.backends import adapter_rank, make_backend
    from synthpert.config.evaluate import InferenceConfig
    from synthpert.backends.vllm import vllm_lora_rank

    with pytest.raises(SynthpertError, match="does not exist"):
        make_backend(InferenceConfig(model=str(tmp_path / "nope")))
    with pytest.raises(SynthpertError, match="adapter_config.json"):
        adapter_rank(tmp_path)
    assert vllm_lora_rank(16) == 16 and vllm_lora_rank(17) == 32 and vllm_lora_rank(2) == 8


def _messages():
    from synthpert.prompting import student_messages

    return [student_messages(c, p, g) for c, p, g, _ in TRIPLES]
