"""Inference backends behind one interface (base.py: ``Backend``, ``Query``, ``Generation``):

* ``transformers`` (transformers.py): batched ``generate`` with left padding; a base model, base + a PEFT
  adapter, or the adapter merged in; answers scored from the prompt's cache;
* ``vllm`` (vllm.py): ``vllm.LLM`` with the adapter as a ``LoRARequest``, or merged into a cached copy;
* ``openai`` (openai_api.py): any OpenAI-compatible endpoint (a frontier model, a remote vLLM server).

``make_backend`` picks one from an ``InferenceConfig``; each module is imported only when chosen, so torch,
vLLM and the OpenAI SDK load only for the backend in use. The modules import ``base``, never this package,
so there is no import circle.
"""

from __future__ import annotations

from ..config.evaluate import InferenceConfig
from ..errors import SynthpertError
from .base import (BACKENDS, Backend, Generation, Query, adapter_rank, adapter_version, answer_continuations,
                   model_folder, student_dirs)

__all__ = ["BACKENDS", "Backend", "Generation", "Query", "adapter_rank", "adapter_version", "answer_continuations",
           "make_backend", "model_folder", "student_dirs"]


def make_backend(cfg: InferenceConfig) -> Backend:
    if cfg.backend == "transformers":
        from .transformers import TransformersBackend

        return TransformersBackend(cfg)
    if cfg.backend == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(cfg)
    if cfg.backend == "openai":
        from .openai_api import OpenAIBackend

        return OpenAIBackend(cfg)
    raise SynthpertError(f"unknown backend {cfg.backend!r}; choose one of {BACKENDS}")
