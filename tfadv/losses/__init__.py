"""Losses."""

from tfadv.losses.center_loss import center_loss

__all__ = ["center_loss"]
