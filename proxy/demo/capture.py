"""How each platform "captures" a handwritten digit: the demo's slice definition.

The data set (UCI optical digits, 8x8 images of pixel counts 0..16) was scanned on a
flatbed; that is the ``web`` platform (customers upload scans in a browser). The other
platforms re-render the same image the way their capture path degrades it:

- ``mobile``: a phone camera photo of the form — defocus blur, under-exposure (lower
  contrast) and sensor noise;
- ``tablet``: a stylus on a touch screen — slightly heavier strokes and a little noise.

Every rendering is quantised back to integer counts 0..16, so all platforms share one
input space and a model trained on one platform can be (mis)applied to another; that
shift is what makes a retrained model regress on mobile when mobile captures are missing
from its training data. Noise is seeded by (platform, image index), so the rendering of
any image on any platform is deterministic.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PLATFORMS: tuple[str, ...] = ("web", "mobile", "tablet")
IMAGE_SHAPE = (8, 8)
N_FEATURES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
PIXEL_MAX = 16
# Column names of the ``features`` tensor (row-major pixels), used for the records'
# ``features`` dict and drift gates.
FEATURE_NAMES: tuple[str, ...] = tuple(
    f"px_{r}_{c}" for r in range(IMAGE_SHAPE[0]) for c in range(IMAGE_SHAPE[1])
)

# Capture parameters (documented in docs/demo.md; changing them changes every asset).
MOBILE_BLUR_SIGMA = 0.7
MOBILE_CONTRAST = 0.72
MOBILE_NOISE_SD = 1.2
TABLET_GAIN = 1.15
TABLET_NOISE_SD = 0.5
_CAPTURE_SEED = 7


def render(image: np.ndarray, platform: str, index: int) -> np.ndarray:
    """One image (64 pixel counts) as captured on ``platform``; ``index`` seeds the noise."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")
    img = np.asarray(image, dtype=np.float64).reshape(IMAGE_SHAPE)
    rng = np.random.default_rng([_CAPTURE_SEED, PLATFORMS.index(platform), int(index)])
    if platform == "mobile":
        img = ndimage.gaussian_filter(img, sigma=MOBILE_BLUR_SIGMA) * MOBILE_CONTRAST
        img = img + rng.normal(0.0, MOBILE_NOISE_SD, size=IMAGE_SHAPE)
    elif platform == "tablet":
        img = img * TABLET_GAIN + rng.normal(0.0, TABLET_NOISE_SD, size=IMAGE_SHAPE)
    return np.clip(np.round(img), 0, PIXEL_MAX).astype(np.uint8).ravel()


def render_many(images: np.ndarray, platform: str, indices: np.ndarray) -> np.ndarray:
    """Rows of ``images`` captured on one platform: uint8 array [n, 64]."""
    out = np.empty((len(indices), N_FEATURES), dtype=np.uint8)
    for k, (image, index) in enumerate(zip(images, indices, strict=True)):
        out[k] = render(image, platform, int(index))
    return out
