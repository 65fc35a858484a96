"""Progressive lossy decompression: the rate-distortion curve of DDPM §4.3 (Fig. 5).

:func:`rate_distortion` turns the per-t terms of the bound (bits/dim) and the
x_0-prediction error of :func:`diffusion.calc_bpd_loop` into the rate and
distortion along Algorithms 3-4 (sending x_T, then x_{T-1}, ..., x_1);
:func:`write_rate_distortion` writes the CSV and the paper's three panels.
"""

from __future__ import annotations


import numpy as np

from diffusion_jax.evaluation import runtime as rt


def rate_distortion(vb, xstart_mse, prior_bpd) -> dict:
  """Rate and distortion along progressive decoding (DDPM §4.3, Algorithms 3-4, Fig. 5).

  The sender transmits x_T ~ q(x_T | x_0) at a cost of L_T bits/dim, then
  x_{T-1}, ..., x_1 (paper indices), each x_s coded with p(x_s | x_{s+1}) at a
  cost of L_s (zero-based column s of ``vb``). Once the receiver holds the
  model input at zero-based step t (the paper's x_{t+1}) it has received
  ``rate(t) = L_T + sum_{s > t} vb[s]`` bits/dim and predicts x_0 from it with
  distortion ``sqrt(xstart_mse[t]) * 127.5``, the RMSE on the [0, 255] scale.
  The last point (t = 0) has rate ``total - L_0``; sending x_0 itself (L_0)
  would make it lossless.

  Args:
    vb: ``[T]`` (or ``[B, T]``, averaged over B) terms in bits/dim, column 0 = L_0.
    xstart_mse: ``[T]`` (or ``[B, T]``) mean squared error of the x_0 prediction
      in [-1, 1] units.
    prior_bpd: L_T (scalar or ``[B]``).

  Returns:
    NumPy dict with ``t`` (T-1 .. 0, the order of transmission),
    ``reverse_steps`` (T - 1 - t: steps of the reverse process run so far),
    ``rate_bpd`` (non-decreasing) and ``distortion_rmse``, all ``[T]``.
  """
  vb = np.asarray(vb, np.float64)
  mse = np.asarray(xstart_mse, np.float64)
  if vb.ndim == 2:
    vb = vb.mean(axis=0)
  if mse.ndim == 2:
    mse = mse.mean(axis=0)
  if vb.ndim != 1 or vb.shape != mse.shape:
    raise ValueError(f'vb and xstart_mse must both be [T] or [B, T]; got {vb.shape}, {mse.shape}.')
  prior = float(np.mean(prior_bpd))
  T = vb.size
  tail = np.cumsum(vb[::-1])[::-1]                # tail[t] = sum_{s >= t} vb[s]
  sent = np.append(tail[1:], 0.0)                 # sum_{s > t} vb[s]
  t = np.arange(T - 1, -1, -1)
  return dict(t=t, reverse_steps=T - 1 - t, rate_bpd=prior + sent[t],
              distortion_rmse=np.sqrt(np.maximum(mse[t], 0.0)) * 127.5)


def write_rate_distortion(rd: dict, eval_dir: str) -> tuple[str, str]:
  """Writes ``rate_distortion.csv`` (t, rate_bpd, distortion_rmse) and the Fig. 5 plot.

  The PNG has the paper's three panels: distortion and rate against reverse
  process steps (T - t), and distortion against rate.
  """
  rows = [dict(t=int(t), rate_bpd=r, distortion_rmse=d)
          for t, r, d in zip(rd['t'], rd['rate_bpd'], rd['distortion_rmse'])]
  csv_path, png_path, plt = rt.csv_and_pyplot(eval_dir, 'rate_distortion',
                                              ('t', 'rate_bpd', 'distortion_rmse'), rows)
  if plt is None:
    return csv_path, png_path
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  steps = rd['reverse_steps']
  axes[0].plot(steps, rd['distortion_rmse'])
  axes[0].set(xlabel='Reverse process steps (T - t)', ylabel='Distortion (RMSE [0, 255])')
  axes[1].plot(steps, rd['rate_bpd'])
  axes[1].set(xlabel='Reverse process steps (T - t)', ylabel='Rate (bits/dim)')
  axes[2].plot(rd['rate_bpd'], rd['distortion_rmse'])
  axes[2].set(xlabel='Rate (bits/dim)', ylabel='Distortion (RMSE [0, 255])')
  for ax in axes:
    ax.grid(alpha=0.3)
  rt.save_titled_figure(fig, png_path, 'Progressive lossy decompression (DDPM §4.3, Fig. 5)')
  return csv_path, png_path
