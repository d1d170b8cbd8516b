"""Settings of the centres study (`tfadv centers`): inverse adversaries vs center loss."""

from __future__ import annotations

import dataclasses

from tfadv import argtypes
from tfadv.config.core import CENTER_TARGETS, check_unit_budget
from tfadv.config.mnist import SOURCES
from tfadv.config.options import setting

MODELS = {
    "A": "softmax + center loss (learned centres)",
    "B": "softmax only",
    "C": "softmax + center loss toward inverse-adversary centres",
    "D": "PGD adversarial training + center loss",
}

_pos = argtypes.positive_int
_nonneg = argtypes.nonneg_float


def _model_names(text):
    return tuple(m.strip().upper() for m in str(text).split(",") if m.strip())


@dataclasses.dataclass(frozen=True)
class CentersStudyConfig:
    """Settings of the study. Defaults are the full setting of the seed study.

    Inputs are MNIST digits in [0, 1]; budgets are in the same units.
    """

    out: str = setting(help="output directory (report.md, results.json, PNGs; re-use it to "
                            "resume)")
    models: tuple = setting(("A", "B", "C", "D"), type=_model_names,
                            help="models to train, a subset of A,B,C,D")
    epochs: int = setting(25, type=_pos, help="training epochs per model")
    arch: str = setting("lenetpp", choices=("lenetpp", "small"), help="network")
    feature_dim: int = setting(2, type=_pos, help="feature (centre) dimension")
    data: str = setting("embedded", choices=SOURCES, help="MNIST source")
    data_dir: str | None = setting(None, help="tfds data directory (--data tfds)")
    limit: int | None = setting(None, type=_pos, help="training digits used")
    eval_limit: int | None = setting(None, type=_pos, help="test digits analysed")
    # 32, not 128: LeNets++ with 2-D features and SGD at max LR 0.01 stays at
    # chance for 25 epochs of the 4,000 embedded images at batch 128 (measured:
    # val accuracy 0.11 after 5 epochs); batch 32 gives 4x the steps and
    # leaves chance by epoch 4.
    batch_size: int = setting(32, type=_pos, help="digits per batch")
    max_lr: float = setting(0.01, type=_nonneg, help="peak SGD learning rate")
    lr_mode: str = setting("one_cycle", choices=("one_cycle", "constant"),
                           help="learning-rate schedule")
    momentum: float = setting(0.9, type=_nonneg, help="SGD momentum")
    weight_decay: float = setting(5e-4, type=_nonneg, help="L2 weight decay")
    center_weight: float = setting(0.1, type=_nonneg, help="center-loss weight lambda")
    center_alpha: float = setting(0.5, type=_nonneg, help="centre update rate alpha")
    inverse_eps: float = setting(4 / 255, type=_nonneg, help="inverse adversaries' budget")
    inverse_step_size: float = setting(2 / 255, type=_nonneg, help="their PGD step")
    inverse_steps: int = setting(5, type=_pos, help="their PGD steps")
    uiat: bool = setting(True, help="also extract universal inverse-perturbation centres")
    uiat_epochs: int = setting(3, type=_pos, help="epochs of the universal perturbations")
    adv_eps: float = setting(0.3, type=_nonneg, help="model D's training budget (Linf)")
    adv_steps: int = setting(5, type=_pos, help="model D's PGD steps")
    adv_step_size: float = setting(0.1, type=_nonneg, help="model D's PGD step")
    # D: clean epochs first (eps 0 while the one-cycle LR is still small and the
    # model is at chance), then a slow linear ramp to adv_eps. Measured: a
    # 2-epoch ramp from epoch 0 left D at chance (0.10) for all 25 epochs; 4
    # clean epochs and a 6-epoch ramp collapsed the features to one point when
    # the full budget arrived at the LR peak (epoch 10: val accuracy 0.69 -> 0.13).
    adv_clean_epochs: float = setting(5.0, type=_nonneg,
                                      help="model D: clean epochs before its budget ramps up")
    adv_warmup_epochs: float = setting(12.0, type=_nonneg,
                                       help="model D: epochs of the linear budget ramp")
    adv_center_on: str = setting("both", choices=CENTER_TARGETS,
                                 help="model D: the features center loss pulls")
    robust_eps: float = setting(0.3, type=_nonneg, help="budget of the robust-accuracy attacks")
    autoattack: bool = setting(True, help="also run AutoAttack (standard, Linf robust_eps) on "
                                          "each model's test digits")
    robust_steps: int = setting(40, type=_pos, help="steps of the robust-accuracy attacks")
    # Robust validation each epoch (PGD-10) runs on this many test images;
    # the final analysis uses the whole test split.
    val_limit: int | None = setting(300, type=_pos,
                                    help="test digits of the per-epoch robust validation")
    seed: int = setting(0, help="random seed")

    def __post_init__(self):
        unknown = set(self.models) - set(MODELS)
        if unknown or not self.models:
            raise ValueError(f"Expected models from {sorted(MODELS)}. Received: {self.models}")
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError("Expected epochs >= 1 and batch_size >= 1.")
        if self.adv_center_on not in CENTER_TARGETS:
            raise ValueError(f"Expected adv_center_on to be one of {CENTER_TARGETS}. "
                             f"Received: {self.adv_center_on!r}")
        for name in ("inverse_eps", "adv_eps", "robust_eps"):
            check_unit_budget(getattr(self, name), name=name)

    @classmethod
    def quick(cls, out, **overrides):
        """Settings that finish in a few minutes on 2 CPU cores (too small to decide the
        study's question: the report says so)."""
        # A higher peak LR than the study's 0.01: a few epochs must still learn.
        base = dict(out=out, epochs=4, arch="small", limit=1500, eval_limit=300, batch_size=64,
                    max_lr=0.05,
                    adv_steps=3, adv_step_size=0.12, adv_clean_epochs=1.0,
                    adv_warmup_epochs=1.0, robust_steps=10,
                    uiat_epochs=1, autoattack=False)
        base.update(overrides)
        return cls(**base)
