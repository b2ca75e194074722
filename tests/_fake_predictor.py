"""A stand-in Predictor for endpoint tests that are about HTTP behaviour, not the model: it answers at once
(or waits on a gate, to hold requests in flight), so those tests run in the fast tier without torch."""

from __future__ import annotations

import threading
import time

from synthpert.answer import NOT_DE, format_answer
from synthpert.backends import Generation, Query
from synthpert.config.evaluate import InferenceConfig
from synthpert.schema import Prediction


class FakeBackend:
    name = "fake"
    supports_logprobs = True

    def __init__(self):
        self.cfg = InferenceConfig(backend="transformers", model="fake-model", max_new_tokens=4)

    def prepare(self, messages):
        return Query(messages, prompt_ids=[1, 2, 3])

    def generate(self, queries, n=1, **kw):
        return [[Generation(format_answer(NOT_DE, "r"), 3, "stop")] * n for _ in queries]

    def close(self):
        pass


class FakePredictor:
    """``gate``: predict blocks until it is set (requests stay in flight); ``delay``: seconds per call;
    ``fail``: an exception to raise from predict."""

    def __init__(self, gate: threading.Event | None = None, delay: float = 0.0, fail: Exception | None = None):
        self.backend = FakeBackend()
        self.cfg = self.backend.cfg
        self.gate, self.delay, self.fail = gate, delay, fail
        self.calls = 0

    def predict(self, triples, n_samples=None, explain=False):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        text = format_answer(NOT_DE, "fake reasoning")
        return [Prediction(id=t.id, cell_line=t.cell_line, perturbation=t.perturbation, gene=t.gene, raw_text=text,
                           reasoning="fake reasoning", label_strict=NOT_DE, label_lenient=NOT_DE,
                           probabilities={"up": 0.2, "down": 0.2, "not_de": 0.6},
                           probability_method="answer_logprob", backend="fake", model="fake-model")
                for t in triples]
