"""Settings of `synthpert run`: every stage's section in one file, the evaluation sets and the tiny model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .data import DataConfig
from .evaluate import EvalConfig
from .generate import JudgeConfig, TeacherConfig
from .rl import RLConfig
from .train import TrainConfig


class EvalSet(StrictModel):
    """One evaluation: a test line (or lines) scored by the trained model, beside the baselines."""

    test_cells: list[str] = Field(..., description="lines whose test split is scored")
    genes: int | None = Field(None, ge=1, description="keep every test pair of this many random readout genes "
                              "(seeded), so PerturbQA's per-gene AUROC is measurable on a sample")
    n: int | None = Field(None, ge=1, description="seeded subsample of that test split (all when unset)")
    seed: int | None = Field(None, description="seed of the genes / n draw (default: the run's data.seed, so each "
                             "seed draws its own sample); fix it to score runs of different seeds on the same pairs")
    protocol: str = Field("split", description="'split' or 'published' (unseen lines only)")


class TinyModelSettings(StrictModel):
    """The offline tiny model built inside the run when ``train.base_model: tiny`` (synthpert.tiny)."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(128, ge=32, description="hidden/heads must be 32, 64, 80, 96, 112 or 128 (vLLM on CPU)")
    heads: int = Field(4, ge=1)
    intermediate: int = Field(256, ge=1)
    vocab_size: int = Field(2048, ge=300)
    initializer_range: float = Field(0.1, gt=0)
    max_position_embeddings: int = Field(4096, ge=64)
    chat_format: Literal["chatml", "r1"] = Field(
        "chatml", description="chatml, or r1: DeepSeek-R1-Distill's special tokens (for its chat template)")


class RunConfig(StrictModel):
    name: str = Field(..., description="run name: the folder runs/NAME (a rerun finds it again)")
    seed: int = Field(0, description="seed for every stage that has none of its own set")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rl: RLConfig | None = Field(
        None, description="optional GRPO stage after train (adapter, dataset_dir and base_model come from the run); "
        "eval then scores the RL adapter, with the SFT adapter beside it as <set>_sft")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    eval_sets: dict[str, EvalSet] = Field(
        default_factory=lambda: {"test": EvalSet(test_cells=["k562"])},
        description="name -> test lines; each is built with data.train_cells as the training lines")
    zero_shot: bool = Field(False, description="also evaluate the base model without the adapter")
    tiny_model: TinyModelSettings = Field(default_factory=TinyModelSettings,
                                          description="the offline tiny model (train.base_model: tiny)")

    @model_validator(mode="after")
    def _checks(self):
        if not self.eval_sets:
            raise ValueError("eval_sets is empty: name at least one test set")
        if not self.train.base_model:
            raise ValueError("train.base_model is not set (a hub id, a local folder, or 'tiny')")
        if self.rl is not None and self.train.method == "full":
            raise ValueError("rl continues the SFT LoRA adapter; train.method=full writes a whole model instead: "
                             "use train.method=lora with an rl stage, or drop rl")
        if self.judge.kind == "consistency" and (self.teacher.mode not in ("predict", "evidence_blind")
                                                 or self.teacher.samples < 2):
            raise ValueError(f"judge.kind=consistency compares label-blind samples: set teacher.mode to predict or "
                             f"evidence_blind and teacher.samples >= 2 (now mode={self.teacher.mode}, samples="
                             f"{self.teacher.samples})")
        if self.judge.rank_by == "cocoa" and not (self.teacher.mode == "predict" and self.teacher.sampling.logprobs):
            raise ValueError("judge.rank_by=cocoa ranks by token confidence: set teacher.mode=predict and "
                             "teacher.sampling.logprobs=true (the offline teacher returns no log-probabilities)")
        return self
