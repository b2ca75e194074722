"""`synthpert rl`: GRPO after SFT; torch, TRL & co. are imported inside the command only."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import load_section
from ..config.rl import RLConfig
from ..errors import SynthpertError


def rl_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with RL settings (its `rl:` section or "
                                          "the whole file), e.g. configs/rl_tiny.yaml."),
    adapter: Path | None = typer.Option(None, "--adapter", help="The SFT run folder (`synthpert train --out`). "
                                           "Default: the config's adapter."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Built dataset folder; prompts come from its "
                                           "training split. Default: the config's dataset_dir."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: the config's output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the run folder."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. num_generations=16 max_steps=200"),
) -> None:
    """GRPO (TRL GRPOTrainer) continuing an SFT LoRA adapter, rewarded for correct, well-formed answers."""
    flags = {"adapter": str(adapter) if adapter else None, "dataset_dir": str(dataset) if dataset else None}
    cfg = load_section(RLConfig, "rl", config, overrides or [], flags=flags)
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    out_dir = out or (Path(cfg.output_dir) if cfg.output_dir else None)
    if out_dir is None:
        raise SynthpertError("give the run folder with --out (or `output_dir` in the config)")
    from ..rl import run_rl

    summary = run_rl(cfg, out_dir)
    typer.echo(json.dumps(summary, indent=2, default=str))


def register(app: typer.Typer) -> None:
    app.command("rl")(rl_cmd)
