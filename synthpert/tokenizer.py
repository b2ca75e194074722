"""Loading a tokenizer with the chat template it is trained, evaluated and served with."""

from __future__ import annotations

from pathlib import Path

from .errors import SynthpertError
from .resources import resource_dir


def resolve_chat_template(name: str) -> str:
    """A chat template's text: a file path, or a name in configs/chat_templates/ (with or without .jinja)."""
    path = Path(name).expanduser()
    if not path.exists():
        shipped = resource_dir("configs") / "chat_templates" / name
        path = shipped if shipped.exists() else shipped.with_suffix(".jinja")
    if not path.exists():
        raise SynthpertError(f"chat template {name!r} not found (a file path, or a name in configs/chat_templates/)")
    return path.read_text()


def tokenizer_dir(model: Path, adapter: Path | None) -> Path:
    """The adapter's own tokenizer + chat template when it carries one (what training used), else the model's."""
    if adapter is not None and any((adapter / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        return adapter
    return model


def load_tokenizer(source: str | Path, revision: str | None = None, chat_template: str | None = None,
                   pad_with_eos: bool = False):
    """The tokenizer in ``source`` (a folder or hub id); ``chat_template`` (a file or a shipped name) replaces
    its template; ``pad_with_eos`` pads with the end-of-sequence token when it names no pad token. A tokenizer
    without a chat template is an error: every prompt goes through it."""
    from transformers import AutoTokenizer

    from .models import resolve_model

    source = resolve_model(str(source))
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise SynthpertError(f"cannot load the tokenizer of {source!r}: {e}") from None
    if chat_template:
        tok.chat_template = resolve_chat_template(chat_template)
    if not tok.chat_template:
        raise SynthpertError(f"the tokenizer in {source} has no chat template (a base, not an instruct, model?): "
                             "give one with chat_template=FILE (e.g. configs/chat_templates/chatml.jinja)")
    if pad_with_eos and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the prompt (messages + generation prompt) through the tokenizer's chat template."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)
