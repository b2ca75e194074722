"""Prompt templates (files in prompts/) and the messages every stage sends.

Templates are Jinja2 text files; each rendering records the template's name and SHA-256 so outputs can
say exactly which prompt produced them. The student prompt built here is the one training, evaluation
and serving all use, so a model is always asked the question the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import jinja2

from .cells import get_cell_line
from .errors import SynthpertError
from .resources import resource_dir, sha256_text

STUDENT_SYSTEM = "student_system.txt"
STUDENT_USER = "student_user.j2"


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)

    def render(self, **variables) -> str:
        try:
            return _compiled(self.text).render(**variables).strip()
        except jinja2.UndefinedError as e:
            raise SynthpertError(f"prompt template {self.name}: {e.message}") from None


@cache
def _compiled(text: str) -> jinja2.Template:
    """Compiling costs ~1 ms; a 20,000-request teacher run renders each template 20,000 times."""
    from .answer import template_globals

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(template_globals())
    return env.from_string(text)


@cache
def load_template(name: str) -> Template:
    path = resource_dir("prompts") / name
    if not path.exists():
        available = sorted(p.name for p in resource_dir("prompts").iterdir())
        raise SynthpertError(f"no prompt template named {name!r} in prompts/ (available: {', '.join(available)})")
    return Template(name, path.read_text())


@cache
def load_fewshot(name: str) -> tuple[tuple[dict, ...], str]:
    """Worked examples for a prompt: a YAML list of mappings in prompts/, sent as earlier user/assistant turns
    (each stage renders them with its own templates), and the file's hash. Classes are written short (see
    fewshot_label). Small local models follow a format
    they have been shown far more often than one they have only been told."""
    import yaml

    path = resource_dir("prompts") / name
    if not path.is_file():
        raise SynthpertError(f"no worked-examples file named {name!r} in prompts/")
    text = path.read_text()
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SynthpertError(f"prompts/{name} is not valid YAML: {e}") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise SynthpertError(f"prompts/{name} must be a non-empty list of mappings (one per worked example)")
    return tuple(items), sha256_text(text)


def fewshot_field(item: dict, key: str, name: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SynthpertError(f"prompts/{name}: a worked example lacks {key!r} (have: {', '.join(sorted(item))})")
    return value.strip()


def fewshot_triple(item: dict, name: str) -> dict:
    """A worked example's triple as the template variables a real question gets."""
    return triple_variables(*(fewshot_field(item, k, name) for k in ("cell_line", "perturbation", "gene")))


def fewshot_label(item: dict, key: str, name: str) -> str:
    """A worked example's class, written short (up, down, not_de) so no prompt file spells a label."""
    from .answer import canonical_class

    value = fewshot_field(item, key, name)
    label = canonical_class(value)
    if label is None:
        raise SynthpertError(f"prompts/{name}: {key} {value!r} is not a class (up, down or not_de)")
    return label


def triple_variables(cell_line: str, perturbation: str, gene: str, evidence: str | None = None) -> dict:
    if not perturbation or not perturbation.strip():
        raise SynthpertError("perturbation gene symbol is empty")
    if not gene or not gene.strip():
        raise SynthpertError("readout gene symbol is empty")
    line = get_cell_line(cell_line)
    return {"cell_line": line.key, "cell_name": line.name, "cell_description": line.description,
            "perturbation": perturbation.strip(), "gene": gene.strip(), "evidence": evidence}


STUDENT_TASKS = (None, "answer", "explain")


def student_messages(cell_line: str, perturbation: str, gene: str, evidence: str | None = None,
                     task: str | None = None) -> list[dict]:
    """System + user messages of the question a student model answers (no label, ever). ``task``: None or
    "explain" (reason, then answer), "answer" (the label at once: a multitask student's direct prediction)."""
    if task not in STUDENT_TASKS:
        raise SynthpertError(f"unknown student task {task!r}; tasks: answer, explain")
    variables = {**triple_variables(cell_line, perturbation, gene, evidence), "task": task}
    return [{"role": "system", "content": load_template(STUDENT_SYSTEM).render(**variables)},
            {"role": "user", "content": load_template(STUDENT_USER).render(**variables)}]


def student_prompt_hash() -> str:
    """Hash of the student templates together: recorded by training, evaluation and serving."""
    return sha256_text(load_template(STUDENT_SYSTEM).sha256 + load_template(STUDENT_USER).sha256)
