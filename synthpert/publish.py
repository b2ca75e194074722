"""`synthpert push`: a finished run's adapter (with a model card built from its own manifest and metrics)
and its kept traces (as a dataset with a dataset card) to the Hugging Face Hub.

The folders are always built locally first, exactly as they will be uploaded; ``--dry-run`` stops there.
Everything that can be wrong (repo id, missing adapter / evaluation / traces, no token, offline mode) is
checked before any network call. The token is read by huggingface_hub and never written anywhere.

Layout read (a `synthpert run` folder): ``train/`` (adapter + manifest.json), ``eval/<set>/result/``
(metrics.json, report.md), ``generate/`` and ``judge/`` (summary.json, *_config.json, kept.jsonl).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from .answer import LABELS, NOT_DE, SHORT
from .errors import SynthpertError
from .metric_table import PER_CLASS, class_f1s, metrics
from .models import shipped_model
from .runs import ADAPTER_MANIFEST, is_full_model

WHAT = ("adapter", "traces", "report")
TAGS = ["synthpert", "trl", "sft", "lora", "biology", "perturbation"]
PERTURBQA_LICENSE = "cc-by-4.0"
# files of a training run folder that make up the published adapter (checkpoints and logs stay home)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "generation_config.json", ADAPTER_MANIFEST,
                 "train_config.yaml")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRACE_COLUMNS = ("id", "cell_line", "perturbation", "gene", "label", "mode", "sample_index", "teacher",
                  "prompt_name", "prompt_hash", "reasoning", "raw_text", "parsed_label", "kept")


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or "--" in repo_id or repo_id.endswith((".git", ".")):
        raise SynthpertError(f"--repo-id {repo_id!r} is not a Hub repo id: use ORG/NAME (letters, digits, '-', '_', "
                             "'.'; no '--' or '..'; at most 96 characters each)")
    return repo_id


def parse_what(what: str | list[str]) -> list[str]:
    parts = [w.strip() for w in (what.split(",") if isinstance(what, str) else what) if w.strip()]
    bad = [w for w in parts if w not in WHAT]
    if bad or not parts:
        raise SynthpertError(f"--what {','.join(parts) or what!r}: choose from {', '.join(WHAT)} (comma-separated)")
    return parts


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def eval_sets(run: Path) -> dict[str, dict]:
    """{set name: metrics.json} of every finished evaluation set of the run."""
    out = {}
    for m in sorted((run / "eval").glob("*/result/metrics.json")):
        out[m.parent.parent.name] = json.loads(m.read_text())
    return out


def check_run(run: Path, what: list[str]) -> None:
    if not run.is_dir():
        raise SynthpertError(f"{run} is not a folder (give the run folder `synthpert run` wrote, runs/NAME)")
    if "adapter" in what or "report" in what:
        if is_full_model(run / "train"):
            raise SynthpertError(f"{run}/train holds a fully fine-tuned model (train.method=full): publish uploads "
                                 "LoRA adapters only for now; upload the folder with `huggingface-cli upload`")
        if not (run / "train" / "adapter_config.json").exists():
            raise SynthpertError(f"{run} has no trained adapter (train/adapter_config.json): finish `synthpert run` "
                                 "(or drop 'adapter' and 'report' from --what)")
        if not eval_sets(run):
            raise SynthpertError(f"{run} has no evaluation (eval/<set>/result/metrics.json): a model card without "
                                 "metrics says nothing; run the eval stage first")
    if "traces" in what and not (run / "judge" / "kept.jsonl").exists():
        raise SynthpertError(f"{run} has no kept traces (judge/kept.jsonl; a label_only run has none): drop "
                             "'traces' from --what")


# ---------------------------------------------------------------------------------------------------------
# Cards


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _with_ci(overall: dict, key: str) -> str:
    ci = (overall.get("ci") or {}).get(key)
    s = _num(overall.get(key))
    return f"{s} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else s


def _metrics_table(m: dict) -> list[str]:
    rows = [("model (strict parse)", (m.get("model") or {}).get("strict"))]
    if (m.get("model") or {}).get("decided"):
        rows.append(("model (decision rule)", m["model"]["decided"]))
    rows += [(f"baseline: {n}", b) for n, b in (m.get("baselines") or {}).items() if "overall" in b]
    shown = metrics("card")  # the metric table's model-card columns
    names = ["predictor"] + [("F1 up / down / not DE" if m.key == PER_CLASS else m.report)
                             + (" [95% CI]" if m.headline and m.interval else "") for m in shown]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for name, res in rows:
        o = (res or {}).get("overall") or {}
        cells = [" / ".join(_num(f1) for f1 in class_f1s(o)) if m.key == PER_CLASS
                 else _with_ci(o, m.key) if m.headline and m.interval else _num(o.get(m.key)) for m in shown]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    strata = {k: v for k, v in ((m.get("model") or {}).get("strict") or {}).items() if k != "overall"}
    if strata:
        lines += ["", "Model (strict) by stratum — was the perturbation seen in a training cell line?", "",
                  "| stratum | n | accuracy | macro-F1 |", "|---|---|---|---|"]
        for k, v in strata.items():
            lines.append(f"| {k} | {v.get('n')} | {_num(v.get('accuracy'))} | {_num(v.get('macro_f1'))} |")
    return lines


def model_card_text(run: Path, repo_id: str, dataset_repo: str | None, base_model: str | None,
                    license: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    man = _json(run / "train" / ADAPTER_MANIFEST)
    gen, judge = _json(run / "generate" / "summary.json"), _json(run / "judge" / "summary.json")
    sets = eval_sets(run)
    trained_on = man.get("base_model") or "?"
    shipped = shipped_model(man.get("base_model_name"))  # a GGUF import: its card names the original weights
    hub_base = base_model or (shipped.upstream if shipped else None) or (
        trained_on if _REPO_ID.match(trained_on) and not Path(trained_on).exists() else None)
    data = ModelCardData(base_model=hub_base, library_name="peft", pipeline_tag="text-generation",
                         license=license, datasets=[dataset_repo] if dataset_repo else None, tags=TAGS)
    cfg = man.get("config") or {}
    lora, optim = cfg.get("lora") or {}, cfg.get("optim") or {}
    body = [f"# {repo_id.split('/')[-1]}", "",
            "A LoRA adapter that predicts how a gene's expression responds to a CRISPRi knockdown "
            "(upregulated / downregulated / not differentially expressed), distilled with "
            "synthpert from a teacher model's reasoning traces.", "",
            "## Base model", "",
            f"- trained on: `{hub_base or Path(trained_on).name}`"
            + ("" if hub_base else " (a local model, not a Hub id)"),
            f"- base model config sha256: `{man.get('base_model_config_sha256')}`", "",
            "## Distillation data", "",
            f"- teacher: `{gen.get('teacher', '?')}` (mode {gen.get('mode', '?')}, prompt `{gen.get('prompt_name')}`, "
            f"prompt sha256 `{gen.get('prompt_hash')}`, sampling {json.dumps(gen.get('sampling') or {})})",
            f"- judge: `{judge.get('judge', '?')}` ({judge.get('kind', '?')}, threshold {judge.get('threshold')}, "
            f"prompt sha256 `{judge.get('prompt_hash')}`)",
            f"- traces: {judge.get('traces')} judged, {judge.get('kept')} kept "
            f"(keep rate {_num(judge.get('keep_rate'))})", "",
            "| class | traces | kept | keep rate |", "|---|---|---|---|"]
    for lab in LABELS:
        pc = (judge.get("per_class") or {}).get(lab) or {}
        body.append(f"| {SHORT[lab]} | {pc.get('traces')} | {pc.get('kept')} | {_num(pc.get('keep_rate'))} |")
    if dataset_repo:
        body += ["", f"The kept traces are published as the dataset `{dataset_repo}`."]
    body += ["", "## Training", "",
             f"- TRL SFT with LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
             f"targets {lora.get('target_modules')}",
             f"- mode {man.get('mode')}, loss mask {man.get('loss_mask')}, max length {cfg.get('max_length')}, "
             f"evidence block in the prompt: {man.get('evidence')}"
             + (" (with the combined baseline's lookup line)" if man.get("evidence_lookup") else ""),
             f"- lr {optim.get('lr')}, epochs {optim.get('epochs')}, max steps {optim.get('max_steps')}, batch "
             f"{optim.get('batch_size')} x accumulation {optim.get('grad_accum')}, scheduler {optim.get('scheduler')}, "
             f"seed {man.get('seed')}, precision {man.get('precision')}",
             f"- {man.get('n_train')} training examples, {man.get('global_step')} steps, final train loss "
             f"{_num(man.get('train_loss'))}, eval loss {_num(man.get('eval_loss'))}",
             f"- chat template sha256 `{man.get('chat_template_sha256')}` (the template is stored with the adapter: "
             f"serve with it); student prompt sha256 `{man.get('student_prompt_hash')}`",
             f"- libraries: {', '.join(f'{k} {v}' for k, v in (man.get('libraries') or {}).items() if v)}",
             "", "## Evaluation", "",
             "Every evaluation set of the run, the model beside the baselines scored on the same examples. "
             "Intervals: bootstrap over perturbations.", ""]
    not_de_shares = []
    for name, m in sets.items():
        counts = m.get("class_counts") or {}
        total = sum(counts.values()) or 1
        not_de_shares.append(counts.get(SHORT[NOT_DE], 0) / total)
        body += [f"### {name}", "",
                 f"{m.get('n_predicted')} examples ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
                 f"probabilities: {m.get('probability_method')}", ""]
        body += _metrics_table(m)
        body.append("")
    share = max(not_de_shares) if not_de_shares else None
    body += ["## Limitations", "",
             "- Accuracy flatters: about 86% of PerturbQA's (perturbation, gene) pairs are not differentially "
             "expressed, so always answering 'not DE' is already accurate on the natural distribution"
             + (f" (the evaluation sets above hold at most {share:.0%} not-DE pairs)" if share is not None else "")
             + ". Read macro-F1 and per-gene AUROC beside the baselines.",
             "- " + ("The prompt carries an evidence block: statistics of the training cell lines (how the "
                     "perturbation and the gene behaved there), never the test pair's own label"
                     + ("; its last line states a model-free logistic regression's class probabilities (the "
                        "combined baseline), which the model's scores should be read against" if
                        man.get("evidence_lookup") else "")
                     + ". Serving must build the same block." if man.get("evidence") else
                     "The prompt names only the cell line, the perturbation and the gene (no evidence block)."),
             "- A research model trained on CRISPRi screens in a few cell lines: it is not a substitute for an "
             "experiment, and its reasoning text is a distilled rationale, not a verified mechanism.",
             f"- The adapter's license ({license}) does not override the base model's own license.",
             "", "## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
             f"model = AutoPeftModelForCausalLM.from_pretrained({repo_id!r})", "```", "",
             "or `synthpert serve --model BASE --adapter DIR` for an endpoint with class probabilities "
             "(/v1/predict) and an OpenAI-compatible chat API."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").content


def dataset_card_text(run: Path, repo_id: str, rows: list[dict]) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    gen, judge = _json(run / "generate" / "summary.json"), _json(run / "judge" / "summary.json")
    n = len(rows)
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "100K<n<1M"
    data = DatasetCardData(license=PERTURBQA_LICENSE, language=["en"], tags=TAGS[:1] + ["biology", "perturbation",
                                                                                        "reasoning", "distillation"],
                           task_categories=["text-generation"], size_categories=[size],
                           pretty_name=f"{repo_id.split('/')[-1]} reasoning traces")
    counts = {SHORT[lab]: sum(1 for r in rows if r.get("label") == lab) for lab in LABELS}
    cells = sorted({r.get("cell_line") for r in rows})
    body = [f"# {repo_id.split('/')[-1]}", "",
            "Reasoning traces for CRISPRi perturbation-response questions (does knocking down a perturbation gene "
            "make a readout gene go up, down, or not change?), written by a teacher model and kept by a judge; "
            "made by synthpert to distil the reasoning into a small model.", "",
            "## Source and license", "",
            "Questions and labels come from PerturbQA (Wu et al., 2024; Replogle et al. Perturb-seq screens), "
            "licensed CC BY 4.0; these traces are released under the same license. Cite PerturbQA when you use "
            "them.", "",
            "## Contents", "",
            f"- {n} kept traces, cell lines: {', '.join(str(c) for c in cells)}",
            "- per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
            f"- judge keep rate overall: {_num(judge.get('keep_rate'))}",
            "- columns: " + ", ".join(f"`{c}`" for c in _TRACE_COLUMNS) + ", `judge_rating`", "",
            "## Generation", "",
            f"- teacher: `{gen.get('teacher', '?')}`, mode {gen.get('mode', '?')}, prompt `{gen.get('prompt_name')}` "
            f"(sha256 `{gen.get('prompt_hash')}`), sampling {json.dumps(gen.get('sampling') or {})}",
            f"- judge: `{judge.get('judge', '?')}` ({judge.get('kind', '?')}), threshold {judge.get('threshold')}",
            "- the exact settings: `generation/teacher_config.json`, `generation/judge_config.json` and the stage "
            "summaries beside them (API keys are never stored: the configs name the environment variable only)."]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").content


# ---------------------------------------------------------------------------------------------------------
# Folders and upload


def _trace_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        row = {c: r.get(c) for c in _TRACE_COLUMNS}
        row["judge_rating"] = (r.get("judge") or {}).get("rating")
        rows.append(row)
    return rows


def build_folders(run: str | Path, repo_id: str, out: str | Path, what: str | list[str] = WHAT,
                  base_model: str | None = None, license: str = "other") -> dict[str, Path]:
    """Write the folders that would be uploaded: ``<out>/model`` (adapter, card, reports) and
    ``<out>/dataset`` (traces, card, generation config). Returns {"model": path, "dataset": path} for the
    parts asked for."""
    run, out = Path(run).expanduser(), Path(out).expanduser()
    check_repo_id(repo_id)
    what = parse_what(what)
    check_run(run, what)
    dataset_repo = f"{repo_id}-traces" if "traces" in what else None
    folders: dict[str, Path] = {}
    if "adapter" in what or "report" in what:
        model = out / "model"
        if model.exists():
            shutil.rmtree(model)
        model.mkdir(parents=True)
        if "adapter" in what:
            for name in ADAPTER_FILES:
                if (run / "train" / name).exists():
                    shutil.copy2(run / "train" / name, model / name)
        if "report" in what:
            for name in eval_sets(run):
                dst = model / "eval" / name
                dst.mkdir(parents=True)
                for f in ("metrics.json", "report.md"):
                    if (run / "eval" / name / "result" / f).exists():
                        shutil.copy2(run / "eval" / name / "result" / f, dst / f)
        (model / "README.md").write_text(model_card_text(run, repo_id, dataset_repo, base_model, license))
        folders["model"] = model
    if "traces" in what:
        ds = out / "dataset"
        if ds.exists():
            shutil.rmtree(ds)
        (ds / "data").mkdir(parents=True)
        (ds / "generation").mkdir()
        rows = _trace_rows(run / "judge" / "kept.jsonl")
        with open(ds / "data" / "train.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        for stage, names in (("generate", ("teacher_config.json", "summary.json")),
                             ("judge", ("judge_config.json", "summary.json"))):
            for name in names:
                if (run / stage / name).exists():
                    target = name if name != "summary.json" else f"{stage}_summary.json"
                    shutil.copy2(run / stage / name, ds / "generation" / target)
        (ds / "README.md").write_text(dataset_card_text(run, dataset_repo, rows))
        folders["dataset"] = ds
    return folders


def listing(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]


def require_hub_access() -> None:
    """No token or offline mode: a clear error before any request (never a traceback from deep inside)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise SynthpertError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset it (or use --dry-run)")
    if not get_token():
        raise SynthpertError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")


def upload(folders: dict[str, Path], repo_id: str, private: bool) -> dict[str, str]:
    """Create the repos (if missing) and upload the built folders; returns {part: repo url}."""
    from huggingface_hub import HfApi

    require_hub_access()
    api = HfApi()
    urls = {}
    if "model" in folders:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folders["model"]), repo_id=repo_id, repo_type="model",
                          commit_message="synthpert push: adapter, model card, evaluation")
        urls["model"] = str(url)
    if "dataset" in folders:
        from datasets import load_dataset

        ds_repo = f"{repo_id}-traces"
        url = api.create_repo(ds_repo, private=private, exist_ok=True, repo_type="dataset")
        ds = load_dataset("json", data_files=str(folders["dataset"] / "data" / "train.jsonl"), split="train")
        ds.push_to_hub(ds_repo, private=private, commit_message="synthpert push: kept traces")
        # the card and the generation config go up after push_to_hub, which writes a card of its own; the card
        # names no data files, so the Hub finds push_to_hub's data/train-*.parquet by its split-named files
        api.upload_folder(folder_path=str(folders["dataset"]), repo_id=ds_repo, repo_type="dataset",
                          allow_patterns=["README.md", "generation/*"],
                          commit_message="synthpert push: dataset card and generation config")
        urls["dataset"] = str(url)
    return urls


def push(run: str | Path, repo_id: str, out: str | Path | None = None, what: str | list[str] = WHAT,
         private: bool = False, dry_run: bool = False, base_model: str | None = None,
         license: str = "other") -> dict:
    """Build the folders (in ``out``, default <run>/push) and, unless ``dry_run``, upload them."""
    run = Path(run).expanduser()
    check_repo_id(repo_id)
    what = parse_what(what)
    check_run(run, what)
    if not dry_run:
        require_hub_access()  # before building anything: no half-done work for a push that cannot happen
    folders = build_folders(run, repo_id, out or run / "push", what, base_model, license)
    result = {"repo_id": repo_id, "dry_run": dry_run,
              "folders": {k: {"path": str(v), "files": listing(v)} for k, v in folders.items()}}
    if not dry_run:
        result["urls"] = upload(folders, repo_id, private)
    return result
