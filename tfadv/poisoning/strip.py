"""STRIP: screening inputs for a backdoor trigger at inference time.

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks",
ACSAC 2019. An input is blended with `copies` clean images; a clean input's
blends are classified all over the place (high entropy), while a trigger
keeps pulling every blend to the target class (low entropy). The threshold
is the entropy that a chosen fraction (the false rejection rate) of clean
held-out inputs fall below.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfadv.attacks.base import call_model
from tfadv.poisoning.defences import DetectionResult

__all__ = ["STRIP"]


class STRIP:
    """Entropy of a classifier's predictions on blends of each input with clean images.

    Args:
        model: classifier mapping x [N, ...] to logits [N, C].
        clean: clean inputs [M, ...] to blend with (held out, never trained on).
        copies: blends per input (Gao et al.: 100).
        alpha: the input's weight in a blend `alpha * x + (1 - alpha) * clean`.
        seed: which clean images each input is blended with.

    Raises:
        ValueError: copies < 1, alpha outside (0, 1) or no clean inputs.
    """

    def __init__(self, model, clean, *, copies: int = 100, alpha: float = 0.5, seed: int = 0):
        clean = np.asarray(clean, np.float32)
        if int(copies) != copies or int(copies) < 1 or not 0.0 < float(alpha) < 1.0 \
                or len(clean) == 0:
            raise ValueError(f"Expected copies >= 1, 0 < alpha < 1 and clean inputs. Received: "
                             f"copies={copies}, alpha={alpha}, {len(clean)} clean inputs.")
        self.model, self.clean = model, clean
        self.copies, self.alpha = int(copies), float(alpha)
        self.rng = np.random.default_rng(seed)
        self.threshold = None

    def entropy(self, x, batch_size: int = 1000) -> np.ndarray:
        """Mean prediction entropy (nats) over each input's blends: float [N]."""
        x = np.asarray(x, np.float32)
        if x.shape[1:] != self.clean.shape[1:]:
            raise ValueError(f"Expected inputs [N, {', '.join(map(str, self.clean.shape[1:]))}] "
                             f"like the clean images. Received {x.shape}.")
        if not np.isfinite(x).all():
            raise ValueError("The inputs hold NaN or inf.")
        out = np.empty(len(x))
        for i, xi in enumerate(x):
            picks = self.clean[self.rng.integers(0, len(self.clean), self.copies)]
            blends = self.alpha * xi[None] + (1.0 - self.alpha) * picks
            ent = []
            for j in range(0, len(blends), batch_size):
                p = tf.nn.softmax(tf.cast(call_model(self.model, blends[j:j + batch_size]),
                                          tf.float32)).numpy()
                ent.append(-np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=1))
            out[i] = np.concatenate(ent).mean()
        return out

    def calibrate(self, clean_held_out, frr: float = 0.01) -> float:
        """Sets the threshold: the `frr` quantile of clean inputs' entropies; returns it.

        Raises:
            ValueError: frr outside (0, 1) or no inputs.
        """
        if not 0.0 < float(frr) < 1.0 or len(clean_held_out) == 0:
            raise ValueError(f"Expected 0 < frr < 1 and clean inputs. Received frr={frr}.")
        self.threshold = float(np.quantile(self.entropy(clean_held_out), frr))
        return self.threshold

    def detect(self, x) -> DetectionResult:
        """Scores (minus the entropy: higher = more suspect) and flags (entropy below the
        calibrated threshold) of inputs x.

        Raises:
            ValueError: `calibrate` was not called.
        """
        if self.threshold is None:
            raise ValueError("Call calibrate(clean_inputs, frr=0.01) first: it sets the "
                             "entropy threshold.")
        ent = self.entropy(x)
        return DetectionResult(-ent, ent < self.threshold, "strip")
