"""Connectivity gradients: diffusion-map embedding of FC, aligned to a reference.

An equivalent of BrainSpace's ``GradientMaps(approach="dm", kernel="normalized_angle",
sparsity=0.9)``: each ROI's FC row is kept at its top 10 % of values, the affinity between ROIs is
the normalised angle between those rows, and the embedding is the diffusion map (alpha = 0.5,
diffusion time 0 as in BrainSpace's default). Individual gradients are Procrustes-aligned to a
reference built on the training split, so G1 means the same axis for every scan.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import orthogonal_procrustes


def affinity(fc: np.ndarray, sparsity: float = 0.9) -> np.ndarray:
    """Normalised-angle affinity of row-sparsified FC: ``[rois, rois]`` -> ``[rois, rois]`` in [0, 1]."""
    x = np.array(fc, dtype=np.float64)
    np.fill_diagonal(x, 1.0)
    thresh = np.percentile(x, 100 * sparsity, axis=1, keepdims=True)
    x[x < thresh] = 0.0
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    cos = np.clip((x / norm) @ (x / norm).T, -1.0, 1.0)
    return 1.0 - np.arccos(cos) / np.pi


def diffusion_map(a: np.ndarray, n_components: int = 3, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion-map embedding of a symmetric affinity ``[n, n]``.

    Returns ``(gradients [n, n_components], eigenvalues [n_components])``, the trivial constant
    eigenvector removed, each gradient scaled by lambda / (1 - lambda) (diffusion time 0).
    """
    d = a.sum(axis=1)
    k = a / np.outer(d**alpha, d**alpha)  # alpha-normalised kernel
    dk = k.sum(axis=1)
    m = k / np.sqrt(np.outer(dk, dk))  # symmetric conjugate of the Markov matrix
    vals, vecs = np.linalg.eigh(m)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    psi = vecs / vecs[:, [0]]  # right eigenvectors of the Markov matrix
    lam = vals[1 : n_components + 1]
    grads = psi[:, 1 : n_components + 1] * (lam / (1 - lam))
    # sign convention: the largest-magnitude loading of each gradient is positive
    signs = np.sign(grads[np.abs(grads).argmax(axis=0), np.arange(grads.shape[1])])
    return grads * signs, lam


def gradients(fc: np.ndarray, n_components: int = 3) -> np.ndarray:
    """Gradients of one FC matrix: ``[rois, rois]`` -> ``[rois, n_components]``."""
    return diffusion_map(affinity(fc), n_components)[0]


def procrustes_align(g: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate gradients ``[rois, c]`` onto a reference ``[rois, c]`` (orthogonal Procrustes)."""
    r, _ = orthogonal_procrustes(g, reference)
    return g @ r
