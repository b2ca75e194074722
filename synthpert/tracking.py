"""Experiment trackers: the names `train.report_to` / `rl.report_to` accept, the pip extra each needs, where a run's
tracker lives (recorded in the adapter manifest), and evaluation metrics logged into that same run.

Training logs through transformers' own callbacks (TRL passes ``report_to`` on); evaluation reads the
``tracking`` block of the adapter's manifest and writes its per-set metrics to the same place, so one
TensorBoard log dir (or one W&B / MLflow / Trackio run) holds the loss curve and the test metrics.
Every tracker package is imported lazily: none is a dependency of a run that does not ask for it.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from .errors import SynthpertError
from .metric_table import scalar_keys

TRACKERS = ("none", "tensorboard", "trackio", "wandb", "mlflow")
# the module each tracker needs; the pip extra of the same name installs it (pip install 'synthpert[NAME]')
_MODULES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD_DIR = "tensorboard"  # inside the training run folder
PROJECT = "synthpert"  # Trackio / W&B project


def check_report_to(value) -> list[str]:
    """``report_to`` as a list of known tracker names ("none" alone means no tracking); a misspelt name is
    an error with the nearest valid one."""
    names = [value] if isinstance(value, str) else list(value or [])
    names = [str(n).strip().lower() for n in names] or ["none"]
    for n in names:
        if n not in TRACKERS:
            guess = difflib.get_close_matches(n, TRACKERS, n=1, cutoff=0.5)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            raise ValueError(f"unknown tracker '{n}' ({hint}choose from {', '.join(TRACKERS)})")
    if "none" in names and len(names) > 1:
        raise ValueError("'none' cannot be combined with a tracker")
    return list(dict.fromkeys(names))


def active(report_to: list[str]) -> list[str]:
    return [n for n in report_to if n != "none"]


def require(report_to: list[str], section: str = "train") -> None:
    """Fail before any model is loaded when a tracker's package is missing, naming the extra to install."""
    missing = [n for n in active(report_to) if importlib.util.find_spec(_MODULES[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise SynthpertError(f"report_to {missing} needs {', '.join(_MODULES[n] for n in missing)}: "
                             f"pip install 'synthpert[{extras}]' (or set {section}.report_to=none)")


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def point_tensorboard_at(trainer, run_dir: str | Path) -> None:
    """TensorBoard logs go to <run>/tensorboard (not a dated folder inside checkpoints/, which
    save_total_limit housekeeping and a rerun would scatter), where `synthpert eval` adds its metrics. The
    callback reads its folder once at train start; setting it here avoids a process-wide environment
    variable (TENSORBOARD_LOGGING_DIR)."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback":
            cb.logging_dir = str(tensorboard_dir(run_dir))


def trainer_kwargs(report_to: list[str], run_dir: Path, fields) -> dict:
    """The TrainingArguments fields of tracking (TRL's SFTConfig and GRPOConfig alike): the trackers, the
    run named after its folder, and Trackio's project where transformers has that field."""
    kwargs = {"report_to": active(report_to) or "none", "run_name": Path(run_dir).name}
    if "project" in fields:  # transformers >= 5.x
        kwargs["project"] = PROJECT
    return kwargs


def run_record(report_to: list[str], run_name: str, run_dir: str | Path) -> dict:
    """What the manifest keeps so evaluation (and a person) can find the run again: the run name, the
    TensorBoard log dir, and the W&B / MLflow run id where those trackers ran."""
    names = active(report_to)
    rec: dict = {"report_to": names, "run_name": run_name, "project": PROJECT}
    if "tensorboard" in names:
        rec["tensorboard_log_dir"] = str(tensorboard_dir(run_dir).resolve())
    if "wandb" in names:
        import wandb

        run = wandb.run
        rec["wandb_run_id"] = run.id if run is not None else None
        rec["wandb_project"] = run.project if run is not None else None
    if "mlflow" in names:
        import mlflow

        run = mlflow.active_run() or mlflow.last_active_run()
        rec["mlflow_run_id"] = run.info.run_id if run is not None else None
    return rec


def flat_eval_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json as scalars: each model row (strict, lenient, scored, decided) and each baseline, overall:
    accuracy, macro-F1, balanced accuracy, per-class F1, per-gene AUROCs."""
    out: dict[str, float] = {}

    def add(prefix: str, overall: dict) -> None:
        for k in scalar_keys():  # every single-number entry of the metric table
            v = overall.get(k)
            if isinstance(v, (int, float)) and v == v:  # NaN: nothing to plot
                out[f"{prefix}/{k}"] = float(v)
        for cls, pc in (overall.get("per_class") or {}).items():
            f1 = pc.get("f1")
            if isinstance(f1, (int, float)) and f1 == f1:
                out[f"{prefix}/f1_{cls}"] = float(f1)

    for row, res in (metrics.get("model") or {}).items():
        add(f"model_{row}", res.get("overall") or {})
    for name, res in (metrics.get("baselines") or {}).items():
        if "overall" in res:
            add(f"baseline_{name}", res["overall"])
    return out


def log_eval_metrics(tracking: dict, set_name: str, metrics: dict, step: int) -> list[str]:
    """Log one evaluation set's metrics under ``eval/<set_name>/...`` into the training run's trackers (the
    manifest's ``tracking`` block); returns the trackers written to."""
    names = tracking.get("report_to") or []
    require(names)
    scalars = {f"eval/{set_name}/{k}": v for k, v in flat_eval_metrics(metrics).items()}
    done = []
    if "tensorboard" in names and tracking.get("tensorboard_log_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=tracking["tensorboard_log_dir"])
        try:
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
        finally:
            writer.close()
        done.append("tensorboard")
    if "wandb" in names and tracking.get("wandb_run_id"):
        import wandb

        run = wandb.init(project=tracking.get("wandb_project") or PROJECT, id=tracking["wandb_run_id"],
                         resume="allow")
        run.log(scalars, step=step)
        run.finish()
        done.append("wandb")
    if "mlflow" in names and tracking.get("mlflow_run_id"):
        import mlflow

        with mlflow.start_run(run_id=tracking["mlflow_run_id"]):
            mlflow.log_metrics(scalars, step=step)
        done.append("mlflow")
    if "trackio" in names:
        import trackio

        trackio.init(project=tracking.get("project") or PROJECT, name=tracking.get("run_name"), resume="allow")
        trackio.log(scalars, step=step)
        trackio.finish()
        done.append("trackio")
    return done
