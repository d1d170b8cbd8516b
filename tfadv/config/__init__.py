"""Validated configuration dataclasses: the single source of every command setting.

Each field is declared once with `setting(default, help=...)`; the `tfadv`
command line generates its options from these classes
(`tfadv.config.options`).
"""

from tfadv.config.centers import CentersStudyConfig
from tfadv.config.core import (CENTER_SOURCES, CENTER_TARGETS, METHODS, CenterLossConfig,
                               check_threshold)
from tfadv.config.faces import FaceEvalConfig, FaceFinetuneConfig, GenerateConfig, SweepConfig
from tfadv.config.mnist import (AttackEvalConfig, AutoAttackConfig, CurveConfig, MnistDataConfig,
                                MnistTrainConfig)
from tfadv.config.options import setting
from tfadv.config.serving import (BatchingOptions, EndpointAttackConfig, ExportConfig,
                                  QueryConfig, ServeConfig)

__all__ = [
    "AttackEvalConfig",
    "AutoAttackConfig",
    "BatchingOptions",
    "CENTER_SOURCES",
    "CENTER_TARGETS",
    "CenterLossConfig",
    "CentersStudyConfig",
    "CurveConfig",
    "EndpointAttackConfig",
    "ExportConfig",
    "FaceEvalConfig",
    "FaceFinetuneConfig",
    "GenerateConfig",
    "METHODS",
    "MnistDataConfig",
    "MnistTrainConfig",
    "QueryConfig",
    "ServeConfig",
    "SweepConfig",
    "check_threshold",
    "setting",
]
