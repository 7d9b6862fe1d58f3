"""Fully connected CRF (Krähenbühl & Koltun, NIPS 2011) over an image's class probabilities: the refinement
of PSL+ (methods.md section 7) and of DeepLab-CRF-LargeFOV's outputs, with the package ``pydensecrf2``
(Philipp Krähenbühl's C++ inference, mean field with permutohedral-lattice filtering).

Energy: unary ``-ln p`` of the network's probabilities; pairwise terms a smoothness kernel (positions, width
``pos_xy``, weight ``pos_w``) and an appearance kernel (positions ``bi_xy`` and RGB ``bi_rgb``, weight
``bi_w``), Potts compatibility. Defaults: DeepLab-CRF-LargeFOV's values for PASCAL VOC (Chen et al., ICLR
2015: w1 4, sigma_alpha 121, sigma_beta 5, w2 3, sigma_gamma 3; 10 mean-field iterations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CrfParams", "crf_missing", "dense_crf"]


@dataclass(frozen=True)
class CrfParams:
    iters: int = 10
    pos_xy: float = 3.0
    pos_w: float = 3.0
    bi_xy: float = 121.0
    bi_rgb: float = 5.0
    bi_w: float = 4.0

    @classmethod
    def of(cls, method) -> CrfParams:
        """The ``crf_*`` settings of a method's config (``ae``, ``psl``)."""
        return cls(method.crf_iters, method.crf_pos_xy, method.crf_pos_w, method.crf_bi_xy, method.crf_bi_rgb,
                   method.crf_bi_w)


def crf_missing() -> str | None:
    """Why the dense CRF cannot run here (the package is not installed), or None when it can."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as e:
        return (f"the dense CRF needs the package pydensecrf2 (pip install 'lesseg[crf]' or pip install "
                f"pydensecrf2; it builds with a C++ compiler): {e}")
    return None


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """The CRF's marginals after ``params.iters`` mean-field steps (0 steps: ``probs`` renormalised).

    image H,W,3 uint8 RGB ; probs K,H,W (>= 0, summing to 1 over K; clipped at 1e-8 before the log)
    -> K,H,W float32"""
    import pydensecrf.densecrf as dcrf

    k, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"dense_crf takes an {h}x{w}x3 uint8 image for {k},{h},{w} probabilities, not "
                         f"{image.dtype} {image.shape}")
    crf = dcrf.DenseCRF2D(w, h, k)
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(k, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    crf.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb, rgbim=np.ascontiguousarray(image),
                             compat=params.bi_w)
    return np.asarray(crf.inference(params.iters), dtype=np.float32).reshape(k, h, w)
