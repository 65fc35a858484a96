"""Sample-quality metrics: Fréchet distance (FID) and Inception Score.

- Fréchet Inception Distance: Heusel et al. 2017, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium" (TTUR). The
  Fréchet (2-Wasserstein) distance between the Gaussians fitted to two sets of
  features, ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``. The numerics
  (``ddof=1`` covariances, float64) follow TTUR's ``fid.py`` and pytorch-fid's
  ``fid_score.py`` so that numbers are comparable; the matrix square root's
  trace is taken through symmetric eigenvalues rather than ``sqrtm`` (the
  same value for covariance matrices, exact when they are singular).
- Inception Score: Salimans et al. 2016, "Improved Techniques for Training
  GANs": ``exp(E_x KL(p(y|x) || p(y)))``, averaged over ``num_splits`` splits
  as in the paper's code (openai/improved-gan ``inception_score/model.py``).

Everything here is NumPy/SciPy in float64 on the host: the statistics are
small (2048-d at most) and the eigenvalues need float64 for stable values.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import scipy.special


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of ``[N, D]`` features, in float64.

  The covariance is the unbiased estimate (``ddof=1``,
  ``np.cov(features, rowvar=False)``), as in TTUR and pytorch-fid.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f'features must be [N, D], got shape {features.shape}')
  if features.shape[0] < 2:
    raise ValueError('need at least 2 feature vectors for a covariance, got '
                     f'{features.shape[0]}')
  mu = np.mean(features, axis=0)
  sigma = np.cov(features, rowvar=False, ddof=1)
  return mu, np.atleast_2d(sigma)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``
  (Heusel et al. 2017, eq. in Sec. "FID"; Dowson & Landau 1982).

  The trace term uses tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i) with lambda_i
  the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2} (similar to
  S1 S2): two ``eigh`` calls instead of pytorch-fid's ``sqrtm``, the same value
  for PSD inputs, exact for singular covariances and ~10x faster at 2048-d.
  ``eps`` is kept for API compatibility: negative round-off eigenvalues
  (> -eps * scale) are clipped to zero.

  Returns:
    The squared Fréchet distance (what FID reports), a Python float.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f'mean vectors differ in shape: {mu1.shape} vs {mu2.shape}')
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f'covariances must be {(mu1.size, mu1.size)}, got '
                     f'{sigma1.shape} and {sigma2.shape}')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * _trace_sqrt_product(sigma1, sigma2))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """The symmetric square root of a PSD matrix (negative round-off clipped)."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  if w.min() < -1e-6 * max(1.0, abs(w.max())):
    raise ValueError(f'covariance is not positive semi-definite (eigenvalue {w.min():.3g}).')
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^{1/2}) for PSD sigma1, sigma2."""
  root = _psd_sqrt(sigma1)
  m = root @ sigma2 @ root
  lam = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(lam, 0, None))))


def frechet_distance_from_features(features1: np.ndarray,
                                   features2: np.ndarray,
                                   eps: float = 1e-6) -> float:
  """:func:`frechet_distance` between the statistics of two feature sets."""
  return frechet_distance(*feature_statistics(features1),
                          *feature_statistics(features2), eps=eps)


def inception_score(logits_or_probs: np.ndarray, num_splits: int = 10, *,
                    from_logits: bool | None = None) -> tuple[float, float]:
  """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016).

  As in the paper's code, the ``N`` predictions are cut into ``num_splits``
  consecutive splits, ``p(y)`` is the mean prediction of a split, and the
  score is the mean (and standard deviation) over splits of
  ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))``. Terms with
  ``p(y|x) = 0`` contribute 0 (``0 log 0 = 0``).

  Args:
    logits_or_probs: ``[N, K]`` class logits or probabilities (e.g. the
      1008-way Inception logits).
    num_splits: number of splits (10 in the paper).
    from_logits: whether the input is logits (softmax applied). ``None``
      decides from the data: rows that are non-negative and sum to 1 are
      taken as probabilities.

  Returns:
    ``(mean, std)`` over the splits.
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2:
    raise ValueError(f'expected [N, K] logits or probabilities, got {x.shape}')
  n = x.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f'num_splits must be in [1, N={n}], got {num_splits}')
  if from_logits is None:
    from_logits = not (np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0,
                                                      atol=1e-4))
  if from_logits:
    log_p = scipy.special.log_softmax(x, axis=1)
    p = np.exp(log_p)
  else:
    p = x / x.sum(axis=1, keepdims=True)
    log_p = np.log(np.where(p > 0, p, 1.0))   # unused where p == 0
  scores = []
  for k in range(num_splits):
    sl = slice(k * n // num_splits, (k + 1) * n // num_splits)
    part, log_part = p[sl], log_p[sl]
    py = np.mean(part, axis=0, keepdims=True)
    log_py = np.log(np.where(py > 0, py, 1.0))  # py > 0 wherever part > 0
    # sum_y p (log p - log py), with 0 log 0 = 0.
    kl = np.where(part > 0, part * (log_part - log_py), 0.0).sum(axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes reference statistics as ``.npz`` with keys ``mu`` and ``sigma``.

  The layout of TTUR's and pytorch-fid's precomputed statistics files.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
  os.replace(tmp, path)


def load_stats(path: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``(mu, sigma)`` from an ``.npz`` with keys ``mu`` and ``sigma``.

  Raises:
    FileNotFoundError: ``path`` is None or missing (names ``eval.fid_stats_path``).
  """
  if path is None or not os.path.exists(os.fspath(path)):
    raise FileNotFoundError(
        'No reference FID statistics: eval.fid_stats_path is '
        + ('not set' if path is None else f'{os.fspath(path)!r}, which does not exist')
        + '. Give a local .npz with keys mu and sigma (e.g. TTUR / pytorch-fid '
        'precomputed statistics, or diffusion_jax.evaluation.metrics.save_stats of '
        'Inception pool3 features of the training set).')
  with np.load(os.fspath(path)) as f:
    if 'mu' not in f.files or 'sigma' not in f.files:
      raise ValueError(f'{os.fspath(path)}: expected keys mu and sigma, found {f.files}')
    return np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64)


def gaussian_frechet_distance_closed_form(mu1: Sequence[float], var1: Sequence[float],
                                          mu2: Sequence[float], var2: Sequence[float]
                                          ) -> float:
  """Fréchet distance for *diagonal* covariances, with no matrix square root.

  ``||mu1 - mu2||^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2``: a closed form
  for checks (diagonal covariances commute, so (S1 S2)^{1/2} = S1^{1/2} S2^{1/2}).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.sqrt(np.asarray(var1, np.float64)), np.sqrt(np.asarray(var2, np.float64))
  return float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
