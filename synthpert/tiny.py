"""A tiny offline causal LM (Qwen2 architecture) for tests and the offline quickstart.

Nothing is downloaded: the tokenizer is trained here with the ``tokenizers`` library on the prompt
vocabulary (the student prompts over PerturbQA gene symbols, cell-line descriptions, the answer format),
and the model is randomly initialised. Saved with ``save_pretrained`` it loads by path with
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` exactly like a hub model, and vLLM serves it.

Two choices matter (see ``shared/notes/stack.md``):
* ``head_dim`` must be one of 32, 64, 80, 96, 112, 128, because vLLM's CPU attention accepts only those.
* ``initializer_range`` 0.1, not the default 0.02: with a tiny random ``lm_head`` the final norm caps
  every logit so low that LoRA cannot make any token confident (the loss stays near 5 whatever it learns).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .errors import SynthpertError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# chat_format "r1": DeepSeek-R1-Distill's special tokens (its vocabulary is not reachable offline), so the
# recipe's chat template (configs/chat_templates/r1_distill_train.jinja) runs on a model that has them.
R1_BOS, R1_EOS, R1_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
R1_SPECIAL_TOKENS = (R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>", R1_PAD)
CHAT_FORMATS = ("chatml", "r1")
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128)
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# ChatML with {% generation %} markers around the assistant content AND its end-of-turn token, so TRL's
# assistant_only_loss trains the reasoning, the answer and the stop token, and nothing of the prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Used when no PerturbQA CSVs are at hand: enough symbols to make the tokenizer see gene-like strings.
_FALLBACK_GENES = (
    "AAMP ACTB ADGRE5 ANKHD1 ATF4 BCR ABL1 CCND1 CDK4 CDKN1A DDIT3 EIF2S1 GAPDH GATA1 HBG1 HBG2 HSPA5 "
    "MYC MYB NPM1 POLR2A PSMA1 RPL3 RPL11 RPS6 RPS19 SF3B1 SRSF1 TAL1 TP53 UBC XBP1 YY1 ZNF217 MED12 "
    "SUPT5H EXOSC2 HSPA9 TIMM23 NDUFA4 COX4I1 SLC25A3 KLF1 LMO2 SOX2 STAT5A JAK2 MTOR RPTOR ATP5F1A"
).split()

_REASONING_CORPUS = (
    "The knockdown reduces the protein's abundance, so its direct targets lose transcriptional support. "
    "It is part of the ribosome, the proteasome, the mediator complex, the spliceosome and the mitochondrial "
    "respiratory chain; loss of such essential machinery triggers the integrated stress response, the unfolded "
    "protein response, p53 signalling, cell-cycle arrest and apoptosis. Translation, transcription, RNA "
    "processing, protein folding and degradation, chromatin remodelling, DNA repair and metabolism are "
    "affected. The readout gene is a housekeeping gene, a stress-responsive gene, a transcription factor, a "
    "kinase, a receptor, a haemoglobin gene or a cell-cycle regulator, so its expression likely increases, "
    "decreases or does not change. Therefore the most likely outcome is that it is upregulated, "
    "downregulated, or not differentially expressed. Evidence suggests the effect is indirect and weak."
)


def _gene_symbols(source: str | Path | None, limit: int = 4000, seed: int = 0) -> tuple[list[str], list[str]]:
    """(perturbation symbols, readout symbols) from PerturbQA CSVs, or a small built-in list."""
    import csv

    folder = Path(source).expanduser() if source else None
    # Only the cell lines' own files: other CSVs that happen to sit in the folder (PerturbQA's k562_set-*)
    # would change the corpus, and so the tokenizer, of a model that must be the same everywhere.
    from .dataset import PERTURBQA_LINES, csv_name

    files = [folder / csv_name(k, "de") for k in PERTURBQA_LINES] if folder and folder.is_dir() else []
    files = [f for f in files if f.exists()]
    perts: set[str] = set()
    genes: set[str] = set()
    for f in files:  # plain csv: 4x faster than pandas for two columns of 700k rows
        with open(f, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if "pert" not in header or "gene" not in header:
                continue
            ip, ig = header.index("pert"), header.index("gene")
            for row in reader:
                perts.add(row[ip])
                genes.add(row[ig])
    if not perts:
        return list(_FALLBACK_GENES), list(_FALLBACK_GENES)
    rng = random.Random(seed)
    perts_l, genes_l = sorted(perts), sorted(genes)
    rng.shuffle(perts_l)
    rng.shuffle(genes_l)
    return sorted(perts_l[:limit]), sorted(genes_l[:limit])


def _has_csvs(source: str | Path | None) -> bool:
    """Whether ``source`` holds a cell line's CSVs, i.e. whether _gene_symbols reads the data or falls back."""
    from .dataset import PERTURBQA_LINES, csv_name

    folder = Path(source).expanduser() if source else None
    return bool(folder and any((folder / csv_name(k, "de")).exists() for k in PERTURBQA_LINES))


def _evidence_samples(rng: random.Random, cells: list[str], pert: str, gene: str) -> str:
    """An evidence block rendered by the real renderer (made-up counts) so its wording is in the vocabulary."""
    import numpy as np

    from .answer import UP
    from .evidence import PairEvidence, render_evidence

    counts = lambda: np.array([rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 200)])  # noqa: E731
    others = [c for c in cells if c != cells[0]][:2]
    ev = PairEvidence(cells[0], pert, gene, counts(), {c: counts() for c in others},
                      {c: counts() for c in others[:1]}, {others[0]: UP} if others else {})
    return render_evidence(ev)


def prompt_corpus(source: str | Path | None = None, n_prompts: int = 120, seed: int = 0) -> list[str]:
    """Texts to train the tokenizer on: rendered student prompts, answers, gene lists, cell descriptions."""
    from .answer import LABELS, format_answer
    from .cells import builtin_cell_lines
    from .prompting import student_messages

    # The shipped lines only, not the process's registry: a user's line registered earlier in the same
    # process (a config's extra_cell_lines, a test) would otherwise change the vocabulary, so the "same"
    # tiny model built from the same seed would differ with what ran before it.
    lines = builtin_cell_lines()
    rng = random.Random(seed)
    perts, genes = _gene_symbols(source, seed=seed)
    cells = sorted(lines)
    texts: list[str] = []
    for i in range(n_prompts):
        cell, pert, gene = cells[i % len(cells)], rng.choice(perts), rng.choice(genes)
        evidence = _evidence_samples(rng, [cell, *cells], pert, gene) if i % 2 else None
        for m in student_messages(cell, pert, gene, evidence):
            texts.append(m["content"])
        texts.append(format_answer(LABELS[i % 3], _REASONING_CORPUS))
    texts.extend(" ".join(perts[i:i + 50]) for i in range(0, len(perts), 50))
    texts.extend(" ".join(genes[i:i + 50]) for i in range(0, len(genes), 50))
    texts.extend(c.description for c in lines.values())
    texts.extend(format_answer(label) for label in LABELS)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 2048, chat_format: str = "chatml"):
    """ByteLevel BPE (any text is representable: unseen words fall back to bytes) wrapped as a fast tokenizer.

    ``chat_format``: "chatml" (Qwen-style special tokens and template) or "r1" (DeepSeek-R1-Distill's special
    tokens; its template is the one the recipe trains with, which keeps the reasoning of assistant turns)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # The same normaliser and pre-tokeniser as transformers' Qwen2Tokenizer: AutoTokenizer (and so vLLM)
    # load this folder as a Qwen2Tokenizer, which rebuilds that pipeline; any other choice here would
    # make the reloaded tokenizer split text differently from the one the merges were learnt with.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    if chat_format not in CHAT_FORMATS:
        raise SynthpertError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
    r1 = chat_format == "r1"
    specials = list(R1_SPECIAL_TOKENS if r1 else SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=R1_EOS if r1 else EOS_TOKEN,
                                   pad_token=R1_PAD if r1 else PAD_TOKEN, unk_token=None,
                                   bos_token=R1_BOS if r1 else None, clean_up_tokenization_spaces=False)
    if r1:
        from .tokenizer import resolve_chat_template

        fast.chat_template = resolve_chat_template("r1_distill_train")
    else:
        fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_model(out_dir: str | Path, *, source: str | Path | None = None, seed: int = 0,
                     layers: int = 2, hidden: int = 128, heads: int = 4, intermediate: int = 256,
                     vocab_size: int = 2048, initializer_range: float = 0.1,
                     max_position_embeddings: int = 4096, chat_format: str = "chatml", tokenizer=None) -> Path:
    """Build and save the tiny model + tokenizer to ``out_dir``; returns the folder.

    ``source``: folder with PerturbQA CSVs for the gene-symbol vocabulary (default: $SYNTHPERT_DATA or
    the download cache if present, else a built-in list). Same arguments -> same weights and tokenizer.
    ``tokenizer``: a ready tokenizer (with its chat template) to use instead of training one, e.g. a real
    model's vocabulary; the embedding and LM head are then sized to it, and ``source``, ``vocab_size`` and
    ``chat_format`` are not used.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden % heads:
        raise SynthpertError(f"hidden size {hidden} is not divisible by {heads} heads")
    head_dim = hidden // heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        raise SynthpertError(f"head_dim {head_dim} (= hidden/heads) must be one of {VLLM_CPU_HEAD_DIMS}: "
                             "vLLM's CPU attention accepts only those")
    if tokenizer is None:
        if source is None:
            from .config.data import default_data_dir

            source = default_data_dir()
        tokenizer = train_tokenizer(prompt_corpus(source, seed=seed), vocab_size=vocab_size, chat_format=chat_format)
        vocab_source = str(source) if _has_csvs(source) else "built-in gene list"
    else:
        if not getattr(tokenizer, "chat_template", None) or tokenizer.eos_token_id is None:
            raise SynthpertError("the tokenizer given must carry a chat template and an eos token")
        vocab_source, chat_format = f"given tokenizer ({type(tokenizer).__name__})", "given"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    bos_id = tokenizer.bos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "synthpert_tiny.json").write_text(json.dumps({
        "built_by": "synthpert model tiny", "seed": seed, "layers": layers, "hidden": hidden, "heads": heads,
        "head_dim": head_dim, "vocab_size": len(tokenizer), "chat_format": chat_format,
        "initializer_range": initializer_range,
        "vocab_source": vocab_source,
    }, indent=2))
    return out
