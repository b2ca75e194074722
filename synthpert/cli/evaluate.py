"""`synthpert eval` (score a model beside the baselines) and `synthpert serve` (the local endpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import load_section
from ..config.evaluate import EvalConfig
from ..config.serve import ServeConfig
from ..run_folder import resolve_model_paths


def eval_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with eval settings (its `eval:` "
                                          "section or the whole file)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Folder written by `synthpert data build`."),
    split: str | None = typer.Option(None, "--split", help="train / validation / test (default test)."),
    out: Path = typer.Option(..., "--out", help="Output folder (predictions.jsonl, metrics.json, report.md)."),
    backend: str | None = typer.Option(None, "--backend", help="transformers (default), vllm or openai."),
    run: Path | None = typer.Option(None, "--run", help="A folder `synthpert run` wrote (e.g. runs/quickstart): "
                                    "supplies the model, adapter, evidence data, decision rule and cell lines."),
    model: str | None = typer.Option(None, "--model", help="Model folder, or model name with --backend openai."),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter folder (omit for zero-shot)."),
    n: int | None = typer.Option(None, "--n", help="Seeded subsample of the split."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the subsample and bootstrap."),
    evidence: bool | None = typer.Option(None, "--evidence/--no-evidence", help="Evidence context in the "
                                            "prompt (default: as the adapter was trained)."),
    base_url: str | None = typer.Option(None, "--base-url", help="openai backend: endpoint URL."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard earlier predictions in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary as JSON instead of a few lines."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. inference.max_new_tokens=256"),
) -> None:
    """Evaluate a model (+ adapter) on a built dataset: resumable predictions, metrics beside the baselines,
    report.md and figures."""
    from ..evaluate import run_eval

    if run is not None:
        model, adapter, _, _ = resolve_model_paths(run, model, adapter, None)
    flags = {"dataset": str(dataset) if dataset else None, "split": split, "n": n, "seed": seed,
             "evidence": evidence, "inference.backend": backend, "inference.model": model,
             "inference.adapter": adapter, "inference.base_url": base_url}
    cfg = load_section(EvalConfig, "eval", config, overrides, flags)
    summary = run_eval(cfg, out_dir=out, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        todo = "" if summary["complete"] else " (incomplete: rerun to finish)"
        typer.echo(f"evaluated {summary['n']:,} pairs{todo}: "
                   f"accuracy {f(summary['accuracy'])}, macro-F1 {f(summary['macro_f1'])}, per-gene AUROC DE "
                   f"{f(summary['auroc_de_per_gene'])}, unparseable {f(summary['unparseable_rate'])}")
        if summary.get("decision") and summary.get("macro_f1_decided") is not None:
            typer.echo(f"decided ({summary['decision']} rule): accuracy {f(summary['accuracy_decided'])}, "
                       f"macro-F1 {f(summary['macro_f1_decided'])}")
        typer.echo(f"written: {summary['out']} (predictions.jsonl, metrics.json; the baselines are in the report)")
    typer.echo(f"report: {Path(summary['out']) / 'report.md'}")


def decide_cmd(
    run: Path | None = typer.Option(None, "--run", help="A folder `synthpert run` wrote (e.g. runs/quickstart): "
                                    "supplies the model, adapter, evidence data, decision rule and cell lines."),
    model: str | None = typer.Option(None, "--model", help="Base model folder."),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter folder (decision.json is written "
                                       "there)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Built dataset folder whose VALIDATION split is "
                                        "used (with --run: the run's training data)."),
    out: Path | None = typer.Option(None, "--out", help="Folder for the validation predictions (default: "
                                       "ADAPTER/decision_fit)."),
    n: int | None = typer.Option(None, "--n", help="Seeded subsample of the validation split (default: the "
                                 "config's n, else 2000)."),
    objective: str = typer.Option("macro_f1", "--objective", help="macro_f1, balanced_accuracy or accuracy."),
    backend: str | None = typer.Option(None, "--backend", help="transformers (default) or vllm."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with eval settings (inference)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. inference.batch_size=64"),
) -> None:
    """Fit the adapter's decision rule on validation rows (never test rows) and save it as decision.json."""
    from ..errors import SynthpertError
    from ..evaluate import fit_decision

    model, adapter, _, folder = resolve_model_paths(run, model, adapter, None)
    if dataset is None and folder is not None and folder.dataset:
        dataset = Path(folder.dataset)
    if adapter is None or dataset is None:
        raise SynthpertError("decide needs --adapter and --dataset (or --run RUN_DIR, which supplies both)")
    flags = {"dataset": str(dataset), "split": "validation", "n": n, "inference.backend": backend,
             "inference.model": model, "inference.adapter": adapter}
    cfg = load_section(EvalConfig, "eval", config, overrides, flags)
    if cfg.n is None:
        cfg = cfg.model_copy(update={"n": 2000})
    res = fit_decision(cfg, out or Path(adapter) / "decision_fit", objective)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in res[f"validation_{objective}"].items())
    typer.echo(f"{res['rule']}\nvalidation {objective} ({res['n_validation']} rows): {scores}\n"
               f"saved {res['decision']} (synthpert eval and serve apply it to this adapter)")


def predict_cmd(
    run: Path | None = typer.Option(None, "--run", help="A folder `synthpert run` wrote (e.g. runs/quickstart): "
                                    "supplies the model, adapter, evidence data, decision rule and cell lines."),
    model: str | None = typer.Option(None, "--model", help="Base (or merged) model folder."),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter folder."),
    input_csv: Path | None = typer.Option(None, "--input", help="CSV with columns cell_line, perturbation, gene."),
    out: Path | None = typer.Option(None, "--out", help="CSV to write (label, decision_rule, p_up, p_down, "
                                       "p_not_de, label_generated, warnings, reasoning)."),
    cell: str | None = typer.Option(None, "--cell", help="One triple instead of --input: the cell line ..."),
    perturbation: str | None = typer.Option(None, "--perturbation", help="... the knocked-down gene ..."),
    gene: str | None = typer.Option(None, "--gene", help="... and the readout gene (printed as JSON)."),
    backend: str | None = typer.Option(None, "--backend", help="transformers (default) or vllm."),
    evidence_from: str | None = typer.Option(None, "--evidence-from", help="Built dataset folder giving the "
                                                "evidence context (for models trained with it) and the priors."),
    decision: str | None = typer.Option(None, "--decision", help="auto (default), argmax, prior, tuned or a "
                                           "decision.json path."),
    reasoning: bool = typer.Option(False, "--reasoning", help="Include the reasoning (a multitask student writes "
                                   "its explanation after answering)."),
    baseline: str | None = typer.Option(None, "--baseline", help="A model-free baseline instead of the model "
                                        "(majority, gene_prior, gene_prior_balanced, crosscell, combined), from "
                                        "the training data of --run or --evidence-from; no model is loaded."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. inference.max_new_tokens=256"),
) -> None:
    """Predict your own (cell line, perturbation, gene) triples with a trained model (or a baseline), without a
    server."""
    import pandas as pd

    from ..errors import SynthpertError
    from ..predict import check_triples, predict_baseline, predict_triples, read_triples, write_predictions
    from ..run_folder import read_run_folder, register_cell_lines_for, register_run_cell_lines

    one = (cell, perturbation, gene)
    if input_csv is None and not all(one):
        raise SynthpertError("give --input pairs.csv (with --out), or one triple with --cell, --perturbation, --gene")
    if input_csv is not None and any(one):
        raise SynthpertError("give either --input or --cell/--perturbation/--gene, not both")
    if input_csv is not None and out is None:
        raise SynthpertError("--input needs --out (the CSV to write the predictions to)")
    if baseline is not None:
        folder = read_run_folder(run) if run is not None else None
        dataset = evidence_from or (folder.dataset if folder else None)
        if not dataset:
            raise SynthpertError("--baseline needs training data: --run RUN_DIR, or --evidence-from DATASET_DIR "
                                 "(a `synthpert data build` folder)")
        if folder is not None:
            register_run_cell_lines(folder)
        register_cell_lines_for(None, dataset)
    else:
        model, adapter, evidence_from, _ = resolve_model_paths(run, model, adapter, evidence_from)
    triples = (read_triples(input_csv) if input_csv is not None else
               check_triples(pd.DataFrame([dict(zip(("cell_line", "perturbation", "gene"), one))]),
                             "--cell/--perturbation/--gene", rows=False))
    if baseline is not None:
        records = predict_baseline(dataset, triples, baseline)
    else:
        flags = {"evidence_dataset": evidence_from, "decision": decision, "inference.backend": backend,
                 "inference.model": model, "inference.adapter": adapter}
        cfg = load_section(ServeConfig, "serve", None, overrides, flags)
        records = predict_triples(cfg, triples, return_reasoning=reasoning)
    if input_csv is None:
        typer.echo(json.dumps(records[0], indent=2))
        return
    path = write_predictions(records, out)
    labels = pd.Series([r["label"] for r in records]).value_counts().to_dict()
    warned = sum(1 for r in records if r["warnings"])
    typer.echo(f"{len(records)} predictions written to {path}; labels {labels}; "
               f"decision rule: {records[0]['decision']['rule']}" + (f"; {warned} with warnings" if warned else ""))


def serve_cmd(
    run: Path | None = typer.Option(None, "--run", help="A folder `synthpert run` wrote (e.g. runs/quickstart): "
                                    "supplies the model, adapter, evidence data, decision rule and cell lines."),
    model: str | None = typer.Option(None, "--model", help="Base (or merged) model folder."),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter folder."),
    backend: str = typer.Option("transformers", "--backend", help="transformers or vllm."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port"),
    api_key_env: str = typer.Option("SYNTHPERT_API_KEY", "--api-key-env", help="Env var whose value, when set, "
                                    "is the required Bearer key."),
    evidence_from: str | None = typer.Option(None, "--evidence-from", help="Built dataset folder providing the "
                                                "evidence context (for models trained with it)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of serve/inference settings, e.g. "
                                          "max_batch=32 inference.temperature=0.7"),
) -> None:
    """Serve a model: POST /v1/predict, /v1/predict/batch, OpenAI-compatible /v1/chat/completions, GET /health."""
    from ..serve import serve

    model, adapter, evidence_from, _ = resolve_model_paths(run, model, adapter, evidence_from)
    flags = {"host": host, "port": port, "api_key_env": api_key_env, "evidence_dataset": evidence_from,
             "inference.backend": backend, "inference.model": model, "inference.adapter": adapter,
             "inference.max_new_tokens": max_new_tokens}
    serve(load_section(ServeConfig, "serve", None, overrides, flags))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("decide")(decide_cmd)
    app.command("predict")(predict_cmd)
    app.command("serve")(serve_cmd)
