"""Checkpoints of the trainer-based stages (train, rl): the newest complete one, Ctrl-C that saves one, and
the quiet console they train under (a progress bar; the logged losses go to a file)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("synthpert.checkpoints")


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written to the end. The Trainer writes a checkpoint's files one by one
    and trainer_state.json last, so a process killed while saving leaves a newer folder without it, whose
    weights may be torn: resuming from that one would fail or load garbage."""
    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        log.warning("%s is incomplete (no trainer_state.json: the run was killed while saving it); resuming from "
                    "an earlier checkpoint", path)
    return None


def graceful_stop_callback():
    """First Ctrl-C: finish the step, save a checkpoint, stop (resume with --resume). Second: abort now."""
    import signal

    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    cb = GracefulStop()

    def handler(signum, frame):
        if cb.requested:
            raise KeyboardInterrupt
        cb.requested = True
        log.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    try:
        cb.previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. inside a server): no signal handling
        cb.previous = None
    return cb


def restore_signal(cb) -> None:
    import signal

    if getattr(cb, "previous", None) is not None:
        signal.signal(signal.SIGINT, cb.previous)


VERBOSE_ENV = "SYNTHPERT_VERBOSE"  # set (by `synthpert run -v`) to keep the trainer's own log lines on the console


def quiet_progress(trainer, log_path: Path) -> None:
    """Keep the trainer's progress bar, with the latest loss on it, but write each logged dict as a JSON line
    to ``log_path`` instead of the console: the quickstart printed 64 raw `{'loss': ...}` dicts."""
    import json
    import os

    from transformers.trainer_callback import ProgressCallback

    if os.environ.get(VERBOSE_ENV) or not any(isinstance(c, ProgressCallback)
                                              for c in trainer.callback_handler.callbacks):
        return  # verbose, or no bar to keep (disable_tqdm): the trainer's own printing stays

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
            if self.training_bar is not None and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3g}", refresh=False)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
