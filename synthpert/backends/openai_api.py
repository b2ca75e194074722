"""The OpenAI-compatible backend: evaluation requests through the shared ChatEngine (cache, retries, cost
accounting), class probabilities as vote shares. A module of its own, as vllm.py is."""

from __future__ import annotations

from .base import Backend, Generation
from ..config.evaluate import InferenceConfig
from ..errors import SynthpertError


class OpenAIBackend(Backend):
    """Any OpenAI-compatible endpoint through the shared ChatEngine (cache, retries, cost accounting).

    No log-probabilities: class probabilities are vote shares over ``n_samples``. A request that still
    fails after the engine's retries yields no prediction, so a rerun of the evaluation retries it.
    """

    name = "openai"
    supports_logprobs = False

    def __init__(self, cfg: InferenceConfig):
        super().__init__(cfg)
        if not cfg.model:
            raise SynthpertError("the openai backend needs a model name (--model)")
        if not cfg.base_url:
            raise SynthpertError("the openai backend needs base_url (e.g. http://127.0.0.1:8000/v1 or "
                                 "https://api.openai.com/v1)")
        if not cfg.cache_path:
            raise SynthpertError("the openai backend needs cache_path (run_eval sets <out>/cache.sqlite)")
        self.client_cfg = cfg.client_config()
        self.last_stats: dict = {}

    def _generate(self, queries, n, max_new_tokens, temperature, top_p, seed):
        from ..chat.client import ChatEngine, ChatRequest

        sampling = {"temperature": temperature, "max_tokens": max_new_tokens, "seed": seed}
        if top_p != 1.0:
            sampling["top_p"] = top_p
        if n > 1:
            sampling["n"] = n
        reqs = [ChatRequest(id=str(i), messages=q.messages, sampling=sampling) for i, q in enumerate(queries)]
        run = ChatEngine(self.client_cfg, description="eval requests").run(reqs)
        self.last_stats = run.stats.to_dict()
        out: list[list[Generation] | None] = []
        for i, q in enumerate(queries):
            res = run.results.get(str(i))
            if res is None:
                out.append(None)  # failed after retries: no record, a rerun asks again
                continue
            q.extra["prompt_tokens"] = res.usage.prompt_tokens
            per = res.usage.completion_tokens // max(1, len(res.texts))
            out.append([Generation(t or "", per, f) for t, f in zip(res.texts, res.finish_reasons)])
        return out

    def describe(self) -> dict:
        d = super().describe()
        d["base_url"] = self.client_cfg.base_url
        return d
