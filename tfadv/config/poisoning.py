"""Settings of `tfadv poison scan`: a face folder checked for planted photos."""

from __future__ import annotations

from dataclasses import dataclass

from tfadv.config.options import setting

SCAN_CHOICES = ("activations", "spectral")
SCAN_POISON = ("off", "report", "exclude")


@dataclass(frozen=True)
class PoisonScanConfig:
    """Which defence reads the embeddings, and how the photos are cropped."""

    method: str = setting("activations", choices=SCAN_CHOICES,
                          help="activation clustering (Chen et al. 2018) or spectral "
                               "signatures (Tran et al. 2018) of the embeddings")
    preset: str = setting("facenet-mscele1m-128", help="the embedder: a FaceNet preset")
    model: str | None = setting(None, help="or an embedder .keras file")
    crop: bool = setting(True, help="find and crop the largest face (MTCNN); --no-crop for "
                                    "photos that are face crops already")

    def __post_init__(self):
        if self.method not in SCAN_CHOICES:
            raise ValueError(f"Expected method in {SCAN_CHOICES}. Received: {self.method!r}")
