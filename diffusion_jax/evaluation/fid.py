"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) of sample sets.

The DDPM paper reports FID 3.17 and IS 9.46 on CIFAR-10 (Table 1), from 50,000
samples against the training set's Inception pool3 statistics. Nothing is
downloaded: the Inception weights are a local file (``eval.inception_path``,
see :mod:`diffusion_jax.evaluation.inception`), and without it the part is skipped
with a message naming the key.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from etils import epath
import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax.evaluation import kernel_distance
from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation import runtime as rt

KID_REFERENCE_SIZE = 10_000   # reference features kept for KID


def fid_reference_stats(config, workdir: str, inception_fn, batch_size: Optional[int] = None
                        ) -> tuple[np.ndarray, np.ndarray, str]:
  """(mu, sigma, description) of the reference Inception pool3 features.

  ``eval.fid_stats_path`` if set (a TTUR / pytorch-fid style ``.npz``), else
  computed from the first ``eval.num_fid_reference`` (-1: all) images of the
  training split (:func:`data.load_uint8`) and cached in ``workdir/eval/``.
  """
  ev = config.eval
  if ev.fid_stats_path:
    mu, sigma = metrics.load_stats(ev.fid_stats_path)
    return mu, sigma, str(ev.fid_stats_path)
  num = int(ev.num_fid_reference)
  split = config.data.train_split
  weights = os.path.splitext(os.path.basename(str(ev.inception_path)))[0]
  tag = re.sub(r'[^A-Za-z0-9_.-]+', '_', f'{config.data.name}_{split}_{num}_{weights}')
  path = rt.join(workdir, 'eval', f'fid_stats_{tag}.npz')
  if epath.Path(path).exists():
    stats = rt.load_npz(path)
    return stats['mu'], stats['sigma'], path
  images = data_lib.load_uint8(config, split, num=None if num < 0 else num)
  rt.say(f'  reference statistics: Inception features of {len(images)} {split} images')
  feats, _ = inception_features(inception_fn, images,
                                int(batch_size or min(ev.batch_size, len(images))))
  mu, sigma = metrics.feature_statistics(feats)
  # A subset of the features themselves, for KID (float32, <= 80 MB at 2048-d).
  rt.save_npz(path, mu=mu, sigma=sigma, features=feats[:KID_REFERENCE_SIZE].astype(np.float32))
  return mu, sigma, path


def reference_features(path: str) -> Optional[np.ndarray]:
  """The reference features cached beside the statistics, or None (e.g. ``eval.fid_stats_path``)."""
  if not str(path).endswith('.npz') or not epath.Path(path).exists():
    return None
  return rt.load_npz(path).get('features')


def real_baseline(config, inception_fn, num: int, batch_size: int, mu_ref, sigma_ref,
                  ref_feats) -> dict:
  """FID (and KID) of ``num`` held-out real images (``data.eval_split``) against the reference:
  what a perfect model's ``num`` samples would score, sample-size bias included."""
  images = data_lib.load_uint8(config, config.data.eval_split, num=num)
  feats, _ = inception_features(inception_fn, images, batch_size)
  out = dict(num_images=int(len(images)), split=config.data.eval_split,
             fid=metrics.frechet_distance(*metrics.feature_statistics(feats), mu_ref, sigma_ref))
  if ref_feats is not None:
    out['kid'], out['kid_std'] = kernel_distance.kernel_inception_distance(feats, ref_feats)
  return out


def inception_features(inception_fn, images: np.ndarray, batch_size: int):
  """pool3 ``[N, 2048]`` and logits ``[N, 1008]`` of uint8 images.

  Every call of ``inception_fn`` gets exactly ``batch_size`` images (the last
  chunk is padded by repetition, the padding dropped): one compiled shape.
  """
  images = np.asarray(images)
  feats, logits = [], []
  for i in range(0, images.shape[0], batch_size):
    k = min(batch_size, images.shape[0] - i)
    f, l = inception_fn(rt.pad_batch(images[i:i + batch_size], batch_size))
    feats.append(np.asarray(f, np.float64)[:k])
    logits.append(np.asarray(l, np.float64)[:k])
  return np.concatenate(feats, 0), np.concatenate(logits, 0)


def fid_metrics(config, workdir: str, sample_sets: dict) -> dict:
  """FID (Heusel et al. 2017), KID and Inception Score (Salimans et al. 2016) of each sample set.

  Each set's FID is reported beside ``real_baseline``: the FID (and KID) of
  as many held-out real images (``data.eval_split``, as many as it has) against
  the same reference, the floor at that count. KID needs the reference
  features, cached when the statistics are computed here (not with
  ``eval.fid_stats_path``).

  ``sample_sets`` maps a label to uint8 images ``[N, H, W, C]``. When
  ``eval.inception_path`` is None nothing is computed: a message saying which
  key to set is printed and returned (``{'skipped': message}``); a path that
  does not exist raises FileNotFoundError.
  """
  from diffusion_jax.evaluation import inception, inception_weights  # pylint: disable=g-import-not-at-top
  ev = config.eval
  if not ev.inception_path:
    msg = ('FID / Inception Score skipped: eval.inception_path is not set. Set it to a local '
           'weights file to compute them (--config.eval.inception_path=PATH; a .npz of '
           "pytorch-fid's weights or a .msgpack from inception_weights.save_inception_params); "
           'nothing is downloaded. '
           f'See diffusion_jax/evaluation/inception_weights.py for how to make the file from {inception_weights.FID_WEIGHTS_NAME}.')
    rt.say(f'  {msg}')
    return {'skipped': msg}
  variables = inception_weights.load_inception_params(ev.inception_path)
  fn = inception.make_inception_fn(variables)   # uint8 [0, 255] in, resized to 299
  # One batch shape for references and samples (small sample sets: their size).
  bs = int(min(ev.batch_size, max([len(x) for x in sample_sets.values()] or [ev.batch_size])))
  mu_ref, sigma_ref, ref = fid_reference_stats(config, workdir, fn, bs)
  ref_feats = reference_features(ref)
  out = {'reference': ref, 'inception_path': str(ev.inception_path)}
  baselines = {}   # real-versus-real at each sample count
  for label, images in sample_sets.items():
    feats, logits = inception_features(fn, images, bs)
    mu, sigma = metrics.feature_statistics(feats)
    is_mean, is_std = metrics.inception_score(logits, num_splits=min(10, len(images)))
    res = dict(num_samples=int(len(images)),
               fid=metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
               inception_score=is_mean, inception_score_std=is_std)
    if ref_feats is not None:
      res['kid'], res['kid_std'] = kernel_distance.kernel_inception_distance(feats, ref_feats)
    if len(images) not in baselines:
      baselines[len(images)] = real_baseline(config, fn, len(images), bs, mu_ref, sigma_ref,
                                             ref_feats)
    res['real_baseline'] = baselines[len(images)]
    out[label] = res
    kid = f', KID {res["kid"]:.4f}' if 'kid' in res else ''
    rt.say(f'  {label}: FID {res["fid"]:.3f}{kid}, IS {is_mean:.3f} ± {is_std:.3f} '
           f'(real {config.data.eval_split} images at {res["real_baseline"]["num_images"]}: '
           f'FID {res["real_baseline"]["fid"]:.3f})')
  return out
