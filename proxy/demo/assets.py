"""The demo's shipped files: three ONNX models, the held-out traffic pool, a manifest.

Built by ``scripts/build_demo_models.py`` (fixed seeds); see docs/demo.md. Only numpy is
needed to read them; the models run in onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proxy.demo.capture import FEATURE_NAMES, N_FEATURES, PLATFORMS

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CHAMPION = "champion"
CANDIDATE_REGRESSED = "candidate_regressed"
CANDIDATE_GOOD = "candidate_good"
MODEL_NAMES: tuple[str, ...] = (CHAMPION, CANDIDATE_REGRESSED, CANDIDATE_GOOD)
POOL_FILE = "digits_pool.npz"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
N_CLASSES = 10


def model_path(name: str, assets_dir: Path = ASSETS_DIR) -> Path:
    """Path of one shipped model: ``champion``, ``candidate_regressed``, ``candidate_good``."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown demo model {name!r}; expected one of {MODEL_NAMES}")
    return assets_dir / f"{name}.onnx"


@dataclass(frozen=True, slots=True)
class DemoPool:
    """The held-out traffic pool: every held-out image captured on every platform.

    ``features`` float32 [n, 64] pixel counts 0..16 (the models' ``features`` input);
    ``labels`` int64 digit classes; ``platform`` index into ``platforms``; ``image``
    the index of the source image in scikit-learn's ``load_digits`` (the same image
    appears once per platform).
    """

    features: np.ndarray
    labels: np.ndarray
    platform: np.ndarray
    image: np.ndarray
    platforms: tuple[str, ...] = PLATFORMS

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows_of(self, platform: str) -> np.ndarray:
        """Indices of the pool rows captured on ``platform``."""
        if platform not in self.platforms:
            raise ValueError(f"unknown platform {platform!r}; expected one of {self.platforms}")
        return np.flatnonzero(self.platform == self.platforms.index(platform))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES


def load_pool(assets_dir: Path = ASSETS_DIR) -> DemoPool:
    """Read the pool file; raises FileNotFoundError / ValueError on a missing or bad file."""
    path = assets_dir / POOL_FILE
    with np.load(path, allow_pickle=False) as data:
        pixels = np.asarray(data["pixels"])
        labels = np.asarray(data["labels"], dtype=np.int64)
        platform = np.asarray(data["platform"], dtype=np.int64)
        image = np.asarray(data["image"], dtype=np.int64)
        platforms = tuple(str(p) for p in data["platforms"])
    n = labels.shape[0]
    if pixels.shape != (n, N_FEATURES) or platform.shape != (n,) or image.shape != (n,):
        raise ValueError(f"{path}: inconsistent array shapes")
    if platforms != PLATFORMS:
        raise ValueError(f"{path}: platforms {platforms} differ from {PLATFORMS}")
    return DemoPool(
        features=pixels.astype(np.float32),
        labels=labels,
        platform=platform,
        image=image,
        platforms=platforms,
    )


def load_manifest(assets_dir: Path = ASSETS_DIR) -> dict[str, Any]:
    """The build report: data split, model digests and held-out accuracy per platform."""
    data: dict[str, Any] = json.loads((assets_dir / MANIFEST_FILE).read_text())
    return data
