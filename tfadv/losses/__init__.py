"""Losses."""

from tfadv.losses.center_loss import center_loss
from tfadv.losses.reduction import global_batch_mean, sample_weights, scale_for_replicas

__all__ = ["center_loss", "global_batch_mean", "sample_weights", "scale_for_replicas"]
