"""Base models checked before anything runs: a folder must hold a model config and a tokenizer that load, and
a name that is no folder must be a model the hub (or, offline, the local hub cache) knows. Each problem is
returned as one sentence naming both readings of the name, folder and hub id, within seconds."""

from __future__ import annotations

import os
from pathlib import Path

HUB_TIMEOUT_S = 10.0
TINY_LR = 1e-3  # learning rates from here up are the tiny random model's (quickstart.yaml's 3e-3)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def base_model_problem(name: str, revision: str | None = None) -> str | None:
    """None when ``name`` loads as a base model, else what is wrong with it."""
    from .config import looks_local
    from .errors import SynthpertError
    from .models import check_shipped, shipped_model

    if shipped_model(name) is not None:  # a shipped model's short name: its package, not the hub
        try:
            check_shipped(name)
        except SynthpertError as e:
            return str(e)
        return None
    folder = Path(name).expanduser()
    if folder.is_dir():
        from transformers import AutoConfig, AutoTokenizer

        try:
            AutoConfig.from_pretrained(str(folder))
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a folder that is no model
            return f"{name} is a folder but not a model: its config does not load ({_first_line(e)})"
        try:
            AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            return f"{name} is a model folder but its tokenizer does not load ({_first_line(e)})"
        return None
    where = f"no folder {folder} exists here"
    if looks_local(name, Path.cwd()) or name.count("/") > 1:
        return f"{where}, and {name!r} is not shaped like a hub id (org/name)"
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return None
        return f"{where}, and as a hub id {name} is not in the local hub cache (HF_HUB_OFFLINE is set)"
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; access is the training stage's error to report, with the hub's own words
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        return f"{where}, and the hub has no model {name} ({_first_line(e)}; a private model needs HF_TOKEN)"
    except Exception as e:  # network errors come in many types
        return f"{where}, and the hub could not be reached to look up {name} as a hub id ({_first_line(e)})"
    return None


def learning_rate_note(base_model: str, tiny: bool, lr: float) -> str | None:
    """A learning rate tuned for the tiny random model, about to train a pretrained one: say so."""
    if tiny or lr < TINY_LR:
        return None
    return (f"train.optim.lr={lr:g} is a learning rate for the tiny random model; LoRA on a pretrained model "
            f"such as {base_model} usually takes 1e-4 to 3e-4 (set train.optim.lr=2e-4 if you did not mean it)")
