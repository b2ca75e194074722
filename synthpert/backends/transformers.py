"""The transformers backend: batched ``generate`` with left padding over a base model, base + PEFT adapter, or
a merged model, on CPU or GPU; answer blocks scored from one shared prefill, and token streaming for serve."""

from __future__ import annotations


from ..answer import reasoning_context
from .base import Backend, Generation, Query, answer_continuations, student_dirs
from ..config.evaluate import InferenceConfig
from ..tokenizer import load_tokenizer, tokenizer_dir


def _torch_device(spec: str) -> str:
    import torch

    if spec != "auto":
        return spec
    return "cuda" if torch.cuda.is_available() else "cpu"


def token_logprobs(tok, ids: list[int], logp, k: int) -> list[dict]:
    """OpenAI ``logprobs.content`` entries for generated ``ids``; ``logp``: [len(ids), vocab] log-softmax of
    the model's raw next-token logits (before temperature/top-p), as OpenAI reports them."""
    import torch

    def entry(t: int, lp: float) -> dict:
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    out = []
    for i, t in enumerate(ids):
        e = entry(t, float(logp[i, t]))
        top = []
        if k:
            vals, idx = torch.topk(logp[i], k)
            top = [entry(int(j), float(v)) for v, j in zip(vals, idx)]
        out.append({**e, "top_logprobs": top})
    return out


class TransformersBackend(Backend):
    name = "transformers"
    supports_logprobs = True
    chat_logprobs = True
    streams = True

    def __init__(self, cfg: InferenceConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM

        model_dir, adapter_dir = student_dirs(cfg)
        self.device = _torch_device(cfg.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.tokenizer = load_tokenizer(tokenizer_dir(model_dir, adapter_dir), pad_with_eos=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            if cfg.merge_adapter:
                model = model.merge_and_unload()
        self.model = model.to(self.device).eval()
        self.min_new_tokens: int | None = None  # benchmarks: force equal lengths on every backend
        self.answer_shortcut = True  # read greedy answers off the scored blocks (_generate_and_score_batch)
        self.share_prefix = True  # prefill a batch's common prompt beginning once (_prefill_shared)
        self._shortcut_pause = 0
        self.eos_ids = sorted({i for i in (self.tokenizer.eos_token_id,
                                           *_as_list(getattr(self.model.generation_config, "eos_token_id", None)))
                               if i is not None})

    def _sampling_kwargs(self, max_new_tokens: int, temperature: float, top_p: float, n: int) -> dict:
        kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.eos_ids)
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate(self, queries, n, max_new_tokens, temperature, top_p, seed, logprobs: int | None = None):
        import torch

        tok = self.tokenizer
        out: list[list[Generation]] = []
        bs = self.cfg.batch_size
        for start in range(0, len(queries), bs):
            batch = queries[start:start + bs]
            width = max(len(q.prompt_ids) for q in batch)
            # Left padding: every prompt ends where generation starts.
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, q in enumerate(batch):
                ids[i, width - len(q.prompt_ids):] = torch.tensor(q.prompt_ids)
                mask[i, width - len(q.prompt_ids):] = 1
            # Greedy decoding gives n identical samples: decode once and repeat it.
            n_gen = n if temperature > 0 else 1
            kwargs = self._sampling_kwargs(max_new_tokens, temperature, top_p, n_gen)
            if logprobs is not None:  # raw logits, not the temperature/top-p-processed scores
                kwargs.update(return_dict_in_generate=True, output_logits=True)
            torch.manual_seed(seed + start)  # sampling is reproducible for a given batch composition
            with torch.inference_mode():
                gen = self.model.generate(**{**kwargs, **self._generate_inputs(ids, mask, n_gen)})
            logits = None
            if logprobs is not None:
                logits, gen = torch.stack(gen.logits, 1), gen.sequences
            new = gen[:, width:].cpu()
            for i in range(len(batch)):
                samples = []
                for j in range(n):
                    r = i * n_gen + (j if n_gen > 1 else 0)
                    logp = torch.log_softmax(logits[r].float(), -1).cpu() if logits is not None else None
                    samples.append(self._generation(new[r].tolist(), logp, logprobs))
                out.append(samples)
        return out

    def _generate_inputs(self, ids, mask, n: int) -> dict:
        """``generate``'s inputs for n samples per prompt. generate() repeats each prompt n times and prefills
        every copy; here each prompt is prefilled once (all but its last token) and the cache is repeated
        instead: the same rows, the same random draws, half the prompt compute of a local teacher's two
        samples (prompts of ~560 tokens, completions of ~100)."""
        if n == 1 or not self.share_prefix or ids.shape[1] < 2:
            return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        head = self.model(input_ids=ids[:, :-1].to(self.device), attention_mask=mask[:, :-1].to(self.device),
                          position_ids=pos[:, :-1].to(self.device), use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_repeat_interleave(n)
        return {"num_return_sequences": 1,  # the rows are already repeated
                "input_ids": ids.repeat_interleave(n, 0).to(self.device),
                "attention_mask": mask.repeat_interleave(n, 0).to(self.device), "past_key_values": cache}

    def stream(self, query: Query, emit, cancel, max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, logprobs: int | None = None) -> Generation:
        """Generate one sample, calling ``emit(token_id, logprob_entry_or_None)`` as each token is chosen;
        stops early once ``cancel`` (a threading.Event) is set, e.g. when the client has gone. Returns the
        whole generation (finish reason "cancelled" when cut short). Runs under the backend's lock, so it
        queues behind (never beside) batched calls."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        c, tok, eos = self.cfg, self.tokenizer, set(self.eos_ids)
        temperature = c.temperature if temperature is None else temperature
        top_p = c.top_p if top_p is None else top_p
        seed = c.seed if seed is None else seed
        steps: list = []  # log-softmax of the raw logits of each decoding step (lm_head hook)
        kept: list[int] = []
        state = {"prompt_seen": False, "finish": "length"}

        class Sink(BaseStreamer):
            def put(self, value):
                if not state["prompt_seen"]:  # generate() hands the prompt over first
                    state["prompt_seen"] = True
                    return
                for t in value.view(-1).tolist():
                    if t in eos:
                        state["finish"] = "stop"
                        continue
                    kept.append(t)
                    entry = None
                    if logprobs is not None:
                        entry = token_logprobs(tok, [t], steps[-1].unsqueeze(0), logprobs)[0]
                    emit(t, entry)

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def record(_module, _inputs, output):
            steps.append(torch.log_softmax(output[0, -1].float(), -1).cpu())

        with self._lock:
            if cancel.is_set():  # the client left while this waited for the model
                return Generation("", 0, "cancelled")
            ids = torch.tensor([query.prompt_ids], device=self.device)
            kwargs = self._sampling_kwargs(max_new_tokens or c.max_new_tokens, temperature, top_p, 1)
            hook = self.model.get_output_embeddings().register_forward_hook(record) if logprobs is not None else None
            torch.manual_seed(seed)
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Sink(),
                                        stopping_criteria=StoppingCriteriaList([Cancelled()]), **kwargs)
            finally:
                if hook is not None:
                    hook.remove()
        finish = "cancelled" if cancel.is_set() and state["finish"] != "stop" else state["finish"]
        return Generation(tok.decode(kept, skip_special_tokens=True), len(kept), finish)

    @staticmethod
    def _left_pad(rows: list[list[int]], pad: int):
        """Left-padded ids, mask and explicit positions (so logits equal an unpadded run)."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _continuations(self, last_logits, cache, mask, pos, continuations, greedy: list | None = None):
        """Per-token log-probabilities of every continuation after each row of a prefilled batch: ``cache``
        holds the whole context, ``last_logits`` its last position's logits (predicting each continuation's
        first token). The cache is repeated once per continuation in place, so it is spent afterwards.
        With a ``greedy`` list, it gets per row the index of the continuation greedy decoding would write
        (every token the argmax where it is predicted, then an end-of-turn token), or None."""
        import torch

        k, pad = len(continuations), self.tokenizer.pad_token_id
        kmax = max(len(c) for c in continuations)
        cont = torch.full((k, kmax), pad, dtype=torch.long)
        cont_mask = torch.zeros((k, kmax), dtype=torch.long)
        for j, c in enumerate(continuations):
            cont[j, :len(c)] = torch.tensor(c)
            cont_mask[j, :len(c)] = 1
        b = last_logits.shape[0]
        cache.batch_repeat_interleave(k)
        rest = self.model(
            input_ids=cont.repeat(b, 1).to(self.device),
            attention_mask=torch.cat([mask.repeat_interleave(k, 0), cont_mask.repeat(b, 1)], 1).to(self.device),
            position_ids=(pos[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(kmax)).to(self.device),
            past_key_values=cache, use_cache=True)
        lp0 = torch.log_softmax(last_logits.float(), -1).cpu()  # predicts each continuation's 1st token
        lpr = torch.log_softmax(rest.logits.float(), -1).cpu()  # position t predicts token t + 1
        if greedy is not None:
            top0, top = lp0.argmax(-1).tolist(), lpr.argmax(-1).tolist()
            eos = set(self.eos_ids)
            for i in range(b):
                hit = [j for j, c in enumerate(continuations)
                       if top0[i] == c[0] and all(top[i * k + j][t - 1] == c[t] for t in range(1, len(c)))
                       and top[i * k + j][len(c) - 1] in eos]
                greedy.append(hit[0] if hit else None)
        return [[[float(lp0[i, c[0]])] + [float(lpr[i * k + j, t - 1, c[t]]) for t in range(1, len(c))]
                 for j, c in enumerate(continuations)] for i in range(b)]

    def _score_shared(self, contexts, continuations):
        """One forward pass over each context (``_prefill_shared``: the batch's common beginning once, then
        left-padded rests with explicit positions, so logits equal an unpadded run), its KV cache repeated once
        per continuation, then the continuations alone; log-softmax only
        where a continuation token is predicted. The answer blocks are a few tokens after a prompt of
        hundreds, so this costs about a third of scoring prompt + continuation three times."""
        import torch

        out: list[list[list[float]]] = []
        for start in range(0, len(contexts), max(1, self.cfg.batch_size)):
            with torch.inference_mode():
                last, cache, mask, pos = self._prefill_shared(contexts[start:start + self.cfg.batch_size])
                out += self._continuations(last, cache, mask, pos, continuations)
        return out

    def generate_and_score(self, queries, n=1):
        """Greedy, one sample: one prefill per batch serves both. The prompt minus its last token is run once;
        ``generate`` continues from that cache (re-running only the last prompt token, as in transformers'
        cache re-use recipe), the cache is cropped back to the prompt, and the answer blocks are scored from
        it. On prompts of hundreds of tokens and answers of a few, the prefill is nearly all the work, so
        this halves it. A query whose generation starts with reasoning (not at the answer) is scored again
        after that reasoning, as ``answer_logprobs`` does."""
        if n != 1 or self.cfg.temperature > 0 or any(len(q.prompt_ids) < 2 for q in queries):
            return super().generate_and_score(queries, n)
        import torch

        conts = answer_continuations(self.tokenizer)
        gens: list[list[Generation]] = []
        scores: list[list[float] | None] = []
        bs = max(1, self.cfg.batch_size)
        with self._lock, torch.inference_mode():
            for start in range(0, len(queries), bs):
                g, s = self._generate_and_score_batch(queries[start:start + bs], conts)
                gens += [[x] for x in g]
                scores += s
        again = [i for i, s in enumerate(scores) if s is None]
        if again:
            for i, s in zip(again, self.answer_logprobs([queries[i] for i in again], [gens[i][0].text for i in again])):
                scores[i] = s
        return gens, scores

    def _generate_and_score_batch(self, batch, conts) -> tuple[list[Generation], list[list[float] | None]]:
        """One batch of generate_and_score: a score per row whose generation starts at its answer, None for
        the rest (scored after their reasoning by the caller).

        Answer blocks first: one prefill of each whole prompt, then the blocks scored from its cache. Where a
        block is what greedy decoding writes token by token (each token the argmax where it is predicted, then
        an end-of-turn token), it IS the row's greedy generation, so that row needs no decoding loop; only the
        other rows are generated, as before. A student trained to answer at once answers so for nearly every
        row; a model that rarely does (a base model that reasons first) would pay for the prefill twice, so
        after a batch where it missed on most rows the next 8 batches decode as before."""
        if not self._shortcut_ok(conts):
            self._shortcut_pause = max(0, self._shortcut_pause - 1)
            return self._decode_then_score(batch, conts)
        last_logits, cache, mask, pos = self._prefill_shared([q.prompt_ids for q in batch])
        greedy: list[int | None] = []
        per_token = self._continuations(last_logits, cache, mask, pos, conts, greedy)
        gens: list[Generation | None] = [None] * len(batch)
        scores: list[list[float] | None] = [None] * len(batch)
        for i, j in enumerate(greedy):
            text = self.tokenizer.decode(conts[j], skip_special_tokens=True) if j is not None else None
            if text is not None and not reasoning_context(text):  # as the decoding path decides it
                gens[i] = Generation(text, len(conts[j]), "stop")
                scores[i] = [sum(t) for t in per_token[i]]
        rest = [i for i, g in enumerate(gens) if g is None]
        if len(rest) > len(batch) / 2:
            self._shortcut_pause = 8  # batches decoded the usual way before the shortcut is tried again
        if rest:
            g, s = self._decode_then_score([batch[i] for i in rest], conts)
            for i, gi, si in zip(rest, g, s):
                gens[i], scores[i] = gi, si
        return gens, scores

    def _prefill_shared(self, rows: list[list[int]]):
        """Prefill a batch whose prompts share a beginning (the system prompt and the question's first words,
        about a third of a student prompt) by running that beginning once and copying its cache to every row;
        each row's own rest is then left-padded after it, with explicit positions, so logits equal an unpadded
        run. Returns (last position's logits, cache, mask, positions) as ``_continuations`` takes them."""
        import torch

        n = min(len(r) for r in rows) - 1  # every row keeps at least its last token to predict from
        for k, col in enumerate(zip(*rows)):
            if k >= n or any(t != col[0] for t in col):
                n = k
                break
        if n < 16 or len(rows) < 2 or not self.share_prefix:
            ids, mask, pos = self._left_pad(rows, self.tokenizer.pad_token_id)
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], out.past_key_values, mask, pos
        head = self.model(input_ids=torch.tensor([rows[0][:n]], device=self.device), use_cache=True,
                          logits_to_keep=1).past_key_values
        head.batch_repeat_interleave(len(rows))
        ids, tail_mask, _ = self._left_pad([r[n:] for r in rows], self.tokenizer.pad_token_id)
        mask = torch.cat([torch.ones((len(rows), n), dtype=torch.long), tail_mask], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos[:, n:].to(self.device), past_key_values=head, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values, mask, pos

    def _shortcut_ok(self, conts) -> bool:
        """Whether greedy generation can be read off the scored answer blocks: nothing but argmax picks tokens
        (no processor in the model's generation config, no forced minimum length), a block and its end-of-turn
        token fit in max_new_tokens, and no recent batch missed on most rows."""
        gc = self.model.generation_config
        plain = (gc.repetition_penalty in (None, 1.0) and not gc.no_repeat_ngram_size and not gc.bad_words_ids
                 and not gc.suppress_tokens and not gc.begin_suppress_tokens and not gc.forced_bos_token_id
                 and not gc.forced_eos_token_id and not gc.min_new_tokens and (gc.min_length or 0) <= 0
                 and not gc.sequence_bias)
        return (plain and self.answer_shortcut and not self.min_new_tokens and not self._shortcut_pause
                and max(len(c) for c in conts) < self.cfg.max_new_tokens)

    def _decode_then_score(self, batch, conts) -> tuple[list[Generation], list[list[float] | None]]:
        """Generate, then score the answer blocks of the rows whose generation starts at its answer from the
        same prefill."""
        import torch

        ids, mask, pos = self._left_pad([q.prompt_ids for q in batch], self.tokenizer.pad_token_id)
        width = ids.shape[1]
        cache = self.model(input_ids=ids[:, :-1].to(self.device), attention_mask=mask[:, :-1].to(self.device),
                           position_ids=pos[:, :-1].to(self.device), use_cache=True, logits_to_keep=1).past_key_values
        gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  past_key_values=cache, **self._sampling_kwargs(self.cfg.max_new_tokens, 0.0, 1.0, 1))
        new = [self._generation(row.tolist()) for row in gen[:, width:].cpu()]
        scores: list[list[float] | None] = [None] * len(batch)
        at_answer = [i for i, g in enumerate(new) if not reasoning_context(g.text)]
        if not at_answer:
            return new, scores
        cache.crop(-(cache.get_seq_length() - (width - 1)))  # back to the prompt minus its last token
        if len(at_answer) < len(batch):
            cache.batch_select_indices(torch.tensor(at_answer, device=self.device))
        m, p = mask[at_answer], pos[at_answer]
        last = self.model(input_ids=ids[at_answer, -1:].to(self.device), attention_mask=m.to(self.device),
                          position_ids=p[:, -1:].to(self.device), past_key_values=cache, use_cache=True)
        for i, row in zip(at_answer, self._continuations(last.logits[:, -1], last.past_key_values, m, p, conts)):
            scores[i] = [sum(t) for t in row]
        return new, scores

    def _generation(self, row: list[int], logp=None, k: int | None = None) -> Generation:
        """One generated row cut at the first end-of-turn token."""
        finish = "length"
        for j, t in enumerate(row):
            if t in self.eos_ids:
                row, finish = row[:j], "stop"
                break
        lps = token_logprobs(self.tokenizer, row, logp[:len(row)], k) if logp is not None else None
        return Generation(self.tokenizer.decode(row, skip_special_tokens=True), len(row), finish, lps)

    def _score(self, contexts, continuations):
        import torch

        results: list[list[float]] = []
        bs = max(1, self.cfg.batch_size * 3)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(contexts), bs):
            ctx, cont = contexts[start:start + bs], continuations[start:start + bs]
            seqs = [c + k for c, k in zip(ctx, cont)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):  # right padding: positions (and so logits) equal an unpadded run
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for i, (c, k) in enumerate(zip(ctx, cont)):
                pos = torch.arange(len(c) - 1, len(c) + len(k) - 1)
                results.append(logp[i, pos, torch.tensor(k)].tolist())
        return results


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
