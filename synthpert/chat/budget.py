"""What chat requests cost: prices per model, the dry-run estimate, and the worst-case reservation that
``max_cost`` checks before each request is sent (synthpert.client's engine asks; nothing here sends)."""

from __future__ import annotations

from .accounting import completion_cap, cost_of, estimate_prompt_tokens, price_for
from .requests import Call
from ..config.client import ClientConfig, ModelPrice
from ..errors import SynthpertError
from ..schema import Usage


class CostPlan:
    """Prices of one engine's requests, and reservations calibrated on the usage seen so far. ``offline``:
    a local backend (evidence teacher, rules judge), which costs nothing."""

    def __init__(self, cfg: ClientConfig, offline: bool = False):
        self.cfg = cfg
        self.offline = offline
        self.reset()

    def reset(self) -> None:
        """Forget the calibration (a new run)."""
        self.prompt_scale, self.max_completion = 1.0, 0

    def price(self, model: str) -> ModelPrice | None:
        return price_for(self.cfg.prices, model)

    def plan_price(self, model: str) -> ModelPrice | None:
        """The price new requests will be bought at: the batch price when they go through the Batch API."""
        price = self.price(model)
        return self.cfg.batch_price(price) if self.cfg.batch and not self.offline else price

    def reservation(self, call: Call) -> float:
        """Worst-case cost of a call: the prompt estimate scaled by the largest actual/estimate ratio seen
        so far, plus the completion cap (or the largest completion seen) for every sample."""
        price = self.price(call.model)
        if price is None:
            return 0.0
        n = int(call.sampling.get("n") or 1)
        cap = completion_cap(call.sampling) or max(self.cfg.completion_tokens_estimate, self.max_completion)
        prompt = estimate_prompt_tokens(call.messages) * self.prompt_scale
        return (prompt * price.input + cap * n * price.output) / 1e6

    def calibrate(self, call: Call, usage: Usage) -> None:
        est = estimate_prompt_tokens(call.messages)
        self.prompt_scale = max(self.prompt_scale, usage.prompt_tokens / max(est, 1))
        n = int(call.sampling.get("n") or 1)
        self.max_completion = max(self.max_completion, usage.completion_tokens // n)

    def check_prices(self, calls: list[Call]) -> None:
        if self.offline or self.cfg.max_cost is None:
            return
        missing = sorted({c.model for c in calls if self.price(c.model) is None})
        if missing:
            raise SynthpertError(f"max_cost is set but no price is configured for model(s) {missing}; add "
                                 f"prices.<model>.input/output (USD per 1M tokens) to the config")

    def tokens(self, todo: list[Call]) -> dict:
        """Estimated prompt tokens, samples and completion tokens (expected, and at the caps) of ``todo``."""
        samples = sum(int(c.sampling.get("n") or 1) for c in todo)
        worst = sum((completion_cap(c.sampling) or self.cfg.completion_tokens_estimate)
                    * int(c.sampling.get("n") or 1) for c in todo)
        prompt = sum(estimate_prompt_tokens(c.messages) for c in todo)
        return {"samples_to_generate": samples, "est_prompt_tokens": prompt,
                "est_completion_tokens": samples * self.cfg.completion_tokens_estimate, "max_completion_tokens": worst}

    def estimate(self, todo: list[Call]) -> dict:
        """Expected and worst-case cost of sending ``todo`` (USD), or None with a note when a price is missing."""
        missing = sorted({c.model for c in todo if self.price(c.model) is None})
        if missing:
            return {"est_cost_usd": None, "max_cost_usd": None,
                    "note": f"no price configured for {missing}; add prices.<model>.input/output to estimate cost"}
        expected = worst = 0.0
        for c in todo:
            price, n = self.plan_price(c.model), int(c.sampling.get("n") or 1)
            p_tok = estimate_prompt_tokens(c.messages)
            cap = completion_cap(c.sampling) or self.cfg.completion_tokens_estimate
            expected += cost_of(Usage(prompt_tokens=p_tok, completion_tokens=n * self.cfg.completion_tokens_estimate),
                                price)
            worst += cost_of(Usage(prompt_tokens=p_tok, completion_tokens=n * cap), price)
        return {"est_cost_usd": round(expected, 4), "max_cost_usd": round(worst, 4)}
