"""Settings of the MNIST commands: `tfadv train mnist`, `tfadv eval`, `tfadv curve`,
`tfadv autoattack`."""

from __future__ import annotations

import dataclasses
import warnings

from tfadv import argtypes
from tfadv.config.core import FAST_METHODS, METHODS, NOISE_METHODS, check_unit_budget
from tfadv.config.options import comma_list, setting

SOURCES = ("embedded", "tfds", "full")
MODELS = ("reference", "madry", "smallcnn")
GUARD_CHOICES = ("auto", "off", "stop", "reduce_step")
LR_SCHEDULES = ("flat", "cyclic")
STRATEGIES = ("default", "mirrored", "multi-worker")
EVAL_ATTACKS = ("fgsm", "pgd", "apgd", "cw")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
MIXED_PRECISION = ("mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class MnistTrainConfig:
    """Settings of `tfadv.recipes.mnist.train_mnist`; validated on construction.

    Eval settings (`eval_steps`, `eval_step_size`) define the robust
    validation accuracy reported every epoch and in metrics.json. Pixel
    values and budgets are in [0, 1] units.
    """

    out: str = setting(help="output directory (re-use it to resume)")
    method: str = setting("pgd", choices=METHODS,
                          help="training method: Madry PGD, TRADES, the fast fgsm_rs, n_fgsm, "
                               "free, clean (standard), or for randomized smoothing gaussian "
                               "(noise augmentation) and smoothadv")
    model: str = setting("reference", choices=MODELS,
                         help="classifier: the reference CNN, Madry et al.'s CNN, TRADES' "
                              "SmallCNN")
    epochs: int = setting(20, type=argtypes.positive_int, help="training epochs")
    eps: float = setting(0.3, type=argtypes.nonneg_float,
                         help="training and validation budget ([0, 1] units, in --norm)")
    norm: str = setting("inf", type=argtypes.norm,
                        help="threat model of the attacks: inf or 2 (smoothadv: 2)")
    steps: int = setting(10, type=argtypes.positive_int, help="PGD steps of the training attack")
    step_size: float = setting(0.04, type=argtypes.nonneg_float,
                               help="PGD step of the training attack")
    batch_size: int = setting(50, type=argtypes.positive_int, help="examples per batch")
    seed: int = setting(0, help="random seed")
    data: str = setting("embedded", choices=SOURCES,
                        help="MNIST source: the embedded 5,000 digits, tfds, or the full 70k")
    data_dir: str | None = setting(None, help="tfds data directory (--data tfds)")
    learning_rate: float = setting(1e-3, type=argtypes.nonneg_float, flags=("--lr",),
                                   help="Adam learning rate")
    lr_schedule: str = setting("flat", choices=LR_SCHEDULES,
                               help="flat --lr, or cyclic: linear from 0 up to --lr at half the "
                                    "run and back to 0 (Wong et al.'s fast training)")
    adv_ratio: float = setting(1.0, help="weight of the adversarial loss (pgd); 0.5 = balanced "
                                         "clean/adversarial")
    trades_beta: float = setting(6.0, type=argtypes.nonneg_float, help="TRADES beta")
    fast_step: float | None = setting(
        None, type=argtypes.nonneg_float,
        help="fast methods' step as a multiple of eps (default: fgsm_rs 1.25, n_fgsm 1, free 1)")
    fast_noise: float | None = setting(
        None, type=argtypes.nonneg_float,
        help="fast methods' start-noise radius as a multiple of eps (fgsm_rs 1, n_fgsm 2)")
    free_replays: int = setting(8, type=argtypes.positive_int,
                                help="free: replays of each batch (an epoch costs that many "
                                     "passes)")
    noise_sigma: float = setting(0.25, type=argtypes.positive_float,
                                 help="gaussian, smoothadv: the noise's standard deviation "
                                      "([0, 1] units; certify with the same sigma)")
    noise_samples: int = setting(1, type=argtypes.positive_int,
                                 help="gaussian, smoothadv: noisy copies of each digit per step")
    guard: str = setting("auto", choices=GUARD_CHOICES,
                         help="catastrophic-overfitting guard: a PGD check after each epoch; "
                              "on a collapse restore the best weights and stop or halve the "
                              "step (auto: stop, for the fast methods only)")
    guard_size: int = setting(500, type=argtypes.positive_int,
                              help="training digits the guard attacks (fixed)")
    guard_threshold: float = setting(0.2, type=argtypes.positive_float,
                                     help="accuracy drop from the best that counts as a "
                                          "collapse")
    guard_gap: float = setting(0.4, type=argtypes.positive_float,
                               help="FGSM accuracy above the PGD accuracy by more than this, two "
                                    "epochs in a row, also counts as a collapse (catastrophic "
                                    "overfitting before the run was robust; 1: never)")
    # PGD at the full budget from a random init can collapse to a constant
    # prediction (measured: seed 0, Adam 1e-3, loss stuck at log 10 for 20 epochs).
    eps_warmup_epochs: float = setting(
        2.0, type=argtypes.nonneg_float,
        help="ramp the training budget linearly from 0 to --eps over this many epochs "
             "(0: full budget from the start)")
    eval_steps: int = setting(20, type=argtypes.positive_int,
                              help="PGD steps of the robust validation attack")
    eval_step_size: float | None = setting(None, type=argtypes.nonneg_float,
                                           help="its step (default 2.5 * eps / eval_steps)")
    jit_compile: bool = setting(False, help="compile train steps with XLA")
    mixed_precision: str | None = setting(None, choices=MIXED_PRECISION,
                                          help="Keras mixed-precision policy")
    strategy: str = setting("default", choices=STRATEGIES, help="tf.distribute strategy")
    limit: int | None = setting(None, type=argtypes.positive_int,
                                help="use only N examples per split")
    val_limit: int | None = setting(None, type=argtypes.positive_int,
                                    help="validate each epoch on a fixed random N test digits "
                                         "(the final evaluation uses all)")
    overwrite: bool = setting(False, help="train again over a finished run in --out")
    verbose: int | str = setting("auto", cli=False, help="Keras fit verbosity")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Expected method to be one of {METHODS}. Received: {self.method!r}")
        check_unit_budget(self.eps, self.norm)
        if self.method == "smoothadv" and self.norm != "2":
            raise ValueError("--method smoothadv attacks the smoothed classifier in L2: pass "
                             "--norm 2 with an L2 --eps and --step-size, e.g. --norm 2 "
                             "--eps 1.0 --step-size 0.25 --steps 8.")
        if self.method in NOISE_METHODS and not self.noise_sigma > 0:
            raise ValueError(f"Expected noise_sigma > 0. Received: {self.noise_sigma}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Expected strategy to be one of {STRATEGIES}. Received: {self.strategy!r}"
            )
        if self.model not in MODELS:
            raise ValueError(f"Expected model to be one of {MODELS}. Received: {self.model!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES}. "
                             f"Received: {self.lr_schedule!r}")
        if self.guard not in GUARD_CHOICES:
            raise ValueError(f"Expected guard in {GUARD_CHOICES}. Received: {self.guard!r}")
        if self.data not in SOURCES:
            raise ValueError(f"Expected data to be one of {SOURCES}. Received: {self.data!r}")
        for name in ("epochs", "steps", "batch_size", "eval_steps", "free_replays",
                     "guard_size", "noise_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Expected {name} >= 1. Received: {name}={getattr(self, name)}")
        if self.eps < 0 or self.step_size < 0:
            raise ValueError(f"Expected eps, step_size >= 0. Received: {self.eps}, {self.step_size}")
        if not 0.0 < self.guard_gap <= 1.0:
            raise ValueError(f"Expected 0 < guard_gap <= 1 (1: the gap rule never fires). "
                             f"Received: {self.guard_gap}")
        if self.guard == "reduce_step" and self.method not in FAST_METHODS:
            raise ValueError(f"guard reduce_step shrinks the step of the fast methods "
                             f"({', '.join(FAST_METHODS)}); method {self.method}'s attack is not "
                             f"changed by it. Use guard stop.")
        if self.guard_action is None:
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name.startswith("guard_") and getattr(self, f.name) != f.default]
            if changed:
                verb = "has" if len(changed) == 1 else "have"
                warnings.warn(f"{', '.join(changed)} {verb} no effect: the guard is off for "
                              f"method {self.method} with guard {self.guard} (auto watches the "
                              "fast methods only; guard stop turns it on).", UserWarning,
                              stacklevel=3)
        if not 0.0 < self.guard_threshold <= 1.0:
            raise ValueError(f"Expected 0 < guard_threshold <= 1. "
                             f"Received: {self.guard_threshold}")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise ValueError(
                "Expected mixed_precision to be None, 'mixed_float16' or 'mixed_bfloat16'. "
                f"Received: {self.mixed_precision!r}"
            )


    @property
    def guard_action(self) -> str | None:
        """What the guard does on a collapse ("stop", "reduce_step"), or None: no guard."""
        if self.guard == "auto":
            return "stop" if self.method in FAST_METHODS else None
        return None if self.guard == "off" else self.guard


@dataclasses.dataclass(frozen=True)
class MnistDataConfig:
    """Which MNIST test digits an evaluation command reads."""

    data: str = setting("embedded", choices=SOURCES, help="MNIST source")
    data_dir: str | None = setting(None, help="tfds data directory (--data tfds)")
    limit: int | None = setting(None, type=argtypes.positive_int,
                                help="use only the first N test digits")


@dataclasses.dataclass(frozen=True)
class AttackEvalConfig:
    """Settings of `tfadv eval`: the attacks robust accuracy is the worst case over."""

    attacks: tuple = setting(("pgd",), choices=EVAL_ATTACKS, flags=("--attack",),
                             help="attacks, comma-separated or repeated: robust accuracy is "
                                  "the worst case over them")
    eps: float = setting(0.3, type=argtypes.nonneg_float, help="budget ([0, 1] units)")
    steps: int = setting(40, type=argtypes.positive_int, help="iterations (C&W: Adam steps)")
    step_size: float | None = setting(None, type=argtypes.nonneg_float,
                                      help="PGD step (default 2.5 * eps / steps, in the norm "
                                           "of --norm)")
    norm: str = setting("inf", type=argtypes.norm, help="perturbation norm: inf or 2")
    restarts: int = setting(1, type=argtypes.positive_int, help="random restarts per attack")
    batch_size: int = setting(250, type=argtypes.positive_int, help="examples per attack call")
    seed: int = setting(0, help="random seed")

    def __post_init__(self):
        bad = [a for a in self.attacks if a not in EVAL_ATTACKS]
        if bad or not self.attacks:
            raise ValueError(f"Expected attacks from {EVAL_ATTACKS}. Received: {self.attacks}")
        check_unit_budget(self.eps, self.norm)


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """Settings of `tfadv curve`: robust accuracy against PGD at each budget."""

    out: str = setting(help="output prefix: writes PREFIX.json, PREFIX.png")
    eps: tuple = setting((0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
                         type=comma_list(argtypes.nonneg_float),
                         help="comma-separated budgets ([0, 1] units)")
    steps: int = setting(20, type=argtypes.positive_int, help="PGD steps (step 2.5 * eps / steps)")
    norm: str = setting("inf", type=argtypes.norm, help="perturbation norm: inf or 2")
    restarts: int = setting(1, type=argtypes.positive_int, help="random restarts per budget")
    batch_size: int = setting(256, type=argtypes.positive_int, help="examples per attack call")

    def __post_init__(self):
        if not self.eps:
            raise ValueError("Expected at least one budget in eps.")
        check_unit_budget(max(self.eps), self.norm)


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """Settings of `tfadv autoattack`: AutoAttack (Croce & Hein, 2020) on a saved classifier."""

    norm: str = setting("inf", type=argtypes.norm, help="threat model: inf or 2")
    eps: float = setting(0.3, type=argtypes.positive_float, help="budget ([0, 1] units)")
    version: str = setting("standard", choices=AUTOATTACK_VERSIONS,
                           help="standard (APGD-CE, APGD-T, FAB-T, Square), plus, or rand "
                                "(randomised models, EOT)")
    n: int | None = setting(None, type=argtypes.positive_int,
                            help="attack only the first N digits of the split, in its order")
    seed: int = setting(0, help="random seed (the same seed gives the same result)")
    batch_size: int = setting(500, type=argtypes.positive_int, help="examples per attack call")
    out: str | None = setting(None, help="also write autoattack.json and autoattack.md here")
    chunk: int | None = setting(None, type=argtypes.positive_int,
                                help="attack N digits at a time; with --out each finished "
                                     "chunk is kept in OUT/chunks and a killed run resumes")

    def __post_init__(self):
        check_unit_budget(self.eps, self.norm)
