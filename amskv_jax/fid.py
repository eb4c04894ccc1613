"""Fréchet distance between two sets of features (FID when the features are a classifier's, here
`amskv_jax.classifier.Classifier.features`): ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)."""
from __future__ import annotations

import numpy as np
import scipy.linalg

from amskv_jax.errors import UserError


def fid(features_a, features_b) -> float:
    """Fréchet distance of Gaussians fitted to features [N_a, F] and [N_b, F] (float64 throughout).

    The matrix square root is scipy's; round-off leaves it tiny imaginary parts (kept only when they are below
    1e-3 of the largest entry; larger ones mean the product is far from positive semi-definite, and raise).
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise UserError(f"features must be [N, F] with the same F and N >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(root).all():
        # A singular product (fewer samples than features): regularise both covariances, as pytorch-fid does.
        eye = np.eye(len(sigma_a)) * 1e-6
        root = scipy.linalg.sqrtm((sigma_a + eye) @ (sigma_b + eye))
    if np.iscomplexobj(root):
        imag = np.abs(root.imag).max()
        if imag > 1e-3 * max(np.abs(root.real).max(), 1e-12):
            raise UserError(f"the covariance product's square root has imaginary part {imag:.3g}: not a valid FID")
        root = root.real
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(root)
    return float(max(distance, 0.0))
