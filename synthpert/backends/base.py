"""The interface every model backend implements (``Backend``; ``make_backend`` in the package's __init__ picks
one). They take rendered prompts and return generations and answer log-probabilities.

Prompts are tokenised HERE, with the chat template stored beside the adapter (or the model), and the local
backends receive token ids, so transformers and vLLM see byte-identical prompts.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..answer import LABELS, format_answer, reasoning_context
from ..config.evaluate import InferenceConfig
from ..errors import SynthpertError
from ..resources import hash_file_into, sha256_text
from ..runs import is_full_model, student_weight_files
from ..tokenizer import render_prompt_ids

BACKENDS = ("transformers", "vllm", "openai")


@dataclass
class Generation:
    text: str
    completion_tokens: int
    finish_reason: str | None = None
    # OpenAI's ``choices[].logprobs.content``: one entry per generated token (only when asked for)
    logprobs: list[dict] | None = None


@dataclass
class Query:
    """One question: its messages and (local backends) the token ids of the rendered prompt."""

    messages: list[dict]
    prompt_ids: list[int] | None = None
    extra: dict = field(default_factory=dict)


def adapter_rank(adapter_dir: str | Path) -> int:
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.exists():
        raise SynthpertError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    rank = cfg.get("r")
    ranks = [rank] + list((cfg.get("rank_pattern") or {}).values())
    if not isinstance(rank, int):
        raise SynthpertError(f"{cfg_path}: no integer 'r' (LoRA rank)")
    return max(ranks)


def adapter_version(adapter_dir: str | Path) -> str:
    """Content hash of the adapter's config + weights (a full fine-tune's: the model's): a retrained adapter in
    the same folder gets a new name, so vLLM never answers with a stale cached copy, and a decision rule fitted
    for the old one is refused."""
    h = hashlib.sha256()
    names = student_weight_files(adapter_dir) if is_full_model(adapter_dir) else [
        Path(adapter_dir) / n for n in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")]
    for p in names:
        if p.exists():
            hash_file_into(h, p)
    return h.hexdigest()[:12]


def check_dir(path: str | None, what: str) -> Path:
    if not path:
        raise SynthpertError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SynthpertError(f"{what} folder {p} does not exist")
    return p


def model_folder(name: str | None) -> Path:
    """The folder of a local model: ``name`` as a folder, or a shipped model's short name (converted on first
    use, see models.py)."""
    from ..models import resolve_model

    return check_dir(resolve_model(name), "model")


def student_dirs(cfg: InferenceConfig) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) to load. A train.method=full folder given as the adapter (what
    --run and the pipeline pass) IS the model: it is loaded alone, and its base model is not needed."""
    adapter_dir = check_dir(cfg.adapter, "adapter") if cfg.adapter else None
    if adapter_dir is not None and is_full_model(adapter_dir):
        return adapter_dir, None
    return model_folder(cfg.model), adapter_dir


def answer_continuations(tok) -> list[list[int]]:
    return [tok.encode(format_answer(lab), add_special_tokens=False) for lab in LABELS]


class Backend:
    """A model behind one of the three engines. Thread-safe: calls are serialised by a lock."""

    name = "base"
    supports_logprobs = False
    # per-token log-probabilities of generated text (OpenAI ``logprobs``) and token-by-token streaming
    chat_logprobs = False
    streams = False

    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self.tokenizer = None

    # -- to implement
    def _generate(self, queries: list[Query], n: int, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int) -> list[list[Generation]]:
        raise NotImplementedError

    def _score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        raise NotImplementedError

    def _score_shared(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[list[list[float]]]:
        """Per-token log-probabilities of EVERY continuation after each context: [context][continuation]."""
        k = len(continuations)
        flat = self._score([c for c in contexts for _ in range(k)], continuations * len(contexts))
        return [flat[i * k:(i + 1) * k] for i in range(len(contexts))]

    # -- public
    def prepare(self, messages: list[dict]) -> Query:
        ids = render_prompt_ids(self.tokenizer, messages) if self.tokenizer is not None else None
        return Query(messages, ids)

    def generate(self, queries: list[Query], n: int = 1, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, logprobs: int | None = None) -> list[list[Generation]]:
        """``logprobs``: None for none, else the number of alternatives (``top_logprobs``) per token; only
        backends with ``chat_logprobs`` accept it."""
        c = self.cfg
        extra = {}
        if logprobs is not None:
            if not self.chat_logprobs:
                raise SynthpertError(f"the {self.name} backend does not return per-token log-probabilities")
            extra["logprobs"] = logprobs
        with self._lock:
            return self._generate(queries, n, max_new_tokens or c.max_new_tokens,
                                  c.temperature if temperature is None else temperature,
                                  c.top_p if top_p is None else top_p, c.seed if seed is None else seed, **extra)

    def generate_and_score(self, queries: list[Query], n: int = 1) -> tuple[list[list[Generation]], list[list[float]]]:
        """``generate`` and then ``answer_logprobs`` after each query's first sample. Backends that can share
        the prompt's forward pass between the two override it (same results, one prefill instead of two)."""
        gens = self.generate(queries, n=n)
        return gens, self.answer_logprobs(queries, [g[0].text for g in gens])

    def answer_logprobs(self, queries: list[Query], texts: list[str]) -> list[list[float]]:
        """Sum of log-probabilities of each answer block (answer.format_answer) after prompt + generated reasoning."""
        conts = answer_continuations(self.tokenizer)
        contexts = [q.prompt_ids + self.tokenizer.encode(reasoning_context(text), add_special_tokens=False)
                    for q, text in zip(queries, texts)]
        with self._lock:
            per = self._score_shared(contexts, conts)
        return [[sum(tokens) for tokens in row] for row in per]

    @property
    def model_name(self) -> str:
        return self.cfg.model or ""

    def chat_template_hash(self) -> str | None:
        t = getattr(self.tokenizer, "chat_template", None)
        return sha256_text(t) if isinstance(t, str) else None

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_name, "adapter": self.cfg.adapter,
                "adapter_version": adapter_version(self.cfg.adapter) if self.cfg.adapter else None,
                "chat_template_sha256": self.chat_template_hash()}

    def close(self) -> None:
        pass
