"""The seed's input corruptions, applied to the decoded RGB image before any network's own
preprocessing: grayscale, Gaussian blur 3×3 / 5×5, channel orders BGR / BRG, salt-and-pepper.

Every function maps uint8 [H, W, 3] → uint8 [H, W, 3]. Grayscale uses PIL's integer ITU-R 601
luma (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16, whose weights sum to 2¹⁶, so a grey pixel
(R = G = B) maps to itself exactly; a channel permutation of a grey image is also the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from affeq_rt.errors import AffeqError

SALT_PEPPER_AMOUNTS = (0.0005, 0.005, 0.05, 0.2)  # the seed's two λ, then stronger (tiny images)


def grayscale(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:  # noqa: ARG001
    """Luma replicated on three channels (PIL's exact integer conversion)."""
    from PIL import Image

    g = np.asarray(Image.fromarray(np.ascontiguousarray(img, np.uint8), "RGB").convert("L"))
    return np.repeat(g[:, :, None], 3, axis=2)


def gaussian_kernel(size: int) -> np.ndarray:
    """OpenCV's default Gaussian for ``ksize`` (σ = 0.3·((k − 1)/2 − 1) + 0.8), normalised."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = np.arange(size) - (size - 1) / 2.0
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def blur(size: int) -> Callable[[np.ndarray, np.random.Generator | None], np.ndarray]:
    """A separable Gaussian blur of ``size``×``size`` (border: reflect-101, as OpenCV)."""
    k = gaussian_kernel(size)

    def run(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:  # noqa: ARG001
        from scipy.ndimage import correlate1d

        x = np.asarray(img, np.float64)
        x = correlate1d(correlate1d(x, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    return run


def channels(order: str) -> Callable[[np.ndarray, np.random.Generator | None], np.ndarray]:
    """Reorder the RGB channels, e.g. ``"BGR"`` (the seed's [B, G, R]) or ``"BRG"``."""
    idx = ["RGB".index(c) for c in order]

    def run(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:  # noqa: ARG001
        return np.ascontiguousarray(np.asarray(img)[:, :, idx])

    return run


def salt_pepper(amount: float) -> Callable[[np.ndarray, np.random.Generator | None], np.ndarray]:
    """The seed's S&P noise: about λ·H·W·C values (a binomial count, so small images get the
    right expectation), each set to 0 or 255 with equal odds, positions drawn from ``rng``."""

    def run(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        if rng is None:
            raise AffeqError("salt-and-pepper noise needs a random generator", "pass rng")
        x = np.array(img, np.uint8).reshape(-1)
        m = int(rng.binomial(x.size, amount))
        pos = rng.choice(x.size, size=m, replace=False)
        x[pos] = np.where(rng.random(m) < 0.5, 0, 255).astype(np.uint8)
        return x.reshape(np.shape(img))

    return run


@dataclass(frozen=True)
class Corruption:
    """One corruption: display ``name``, plot ``family``, ``strength`` and the function."""

    name: str
    family: str
    strength: float
    fn: Callable[[np.ndarray, np.random.Generator | None], np.ndarray]

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The corrupted copy of ``img`` (uint8 [H, W, 3])."""
        return self.fn(img, rng)


def default_corruptions(amounts: tuple[float, ...] = SALT_PEPPER_AMOUNTS) -> list[Corruption]:
    """The seed's set: clean first (the reference), then colour, blur and noise."""
    ident: Callable[[np.ndarray, np.random.Generator | None], np.ndarray] = \
        lambda img, rng=None: np.asarray(img)  # noqa: ARG005, E731
    out = [Corruption("clean", "clean", 0.0, ident),
           Corruption("grayscale", "colour", 1.0, grayscale),
           Corruption("channels BGR", "colour", 2.0, channels("BGR")),
           Corruption("channels BRG", "colour", 3.0, channels("BRG")),
           Corruption("blur 3x3", "blur", 3.0, blur(3)),
           Corruption("blur 5x5", "blur", 5.0, blur(5))]
    out += [Corruption(f"s&p {a:g}", "salt & pepper", float(a), salt_pepper(a))
            for a in sorted(amounts)]
    return out
