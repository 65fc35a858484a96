"""The fidelity/diversity curve of classifier-free guidance (Ho & Salimans 2022, Fig. 4).

For every guidance scale w of ``eval.guidance_scales``, a sample set with
uniform random labels (the first sampler of ``eval.sample_sets``,
``eval.num_fid_samples`` images, cached as
``eval/samples_<set>_w<w>_step<step>.npz``) is scored with the metrics at
hand: on digits the small classifier's Fréchet distance, KID and the fraction
read as the asked-for class (:mod:`classifier_metrics`); with
``eval.inception_path`` FID, KID and Inception Score (:mod:`fid`). Larger w
raises fidelity to the label and lowers diversity; the paper's best FID on
ImageNet 64x64 is near w = 0.1-0.3, its best IS at larger w.

Writes ``eval/guidance.csv`` (one row per w) and ``eval/guidance.png``.
"""

from __future__ import annotations


from diffusion_jax import settings
from diffusion_jax.evaluation import classifier_metrics
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples

# Columns of guidance.csv, in order (a metric that was not computed is empty).
COLUMNS = ('guidance_scale', 'num_samples', 'asked_for_accuracy', 'classifier_frechet_at_n',
           'classifier_frechet_real_at_n', 'classifier_kid', 'fid', 'kid', 'inception_score')


def quality_row(config, workdir: str, name: str, images, labels=None) -> dict:
  """The sample-quality metrics available for ``config`` of one sample set, as CSV columns.

  Digits: the classifier's Fréchet distance and KID (:mod:`classifier_metrics`),
  and with ``labels`` the fraction read as the asked-for class; with
  ``eval.inception_path``: FID, KID and Inception Score (:mod:`fid`).
  """
  row = {}
  if config.data.name == 'digits':
    c = classifier_metrics.classifier_metrics(
        config, workdir, {name: images}, None if labels is None else {name: labels})[name]
    row.update(classifier_frechet_at_n=c['frechet_at_n'],
               classifier_frechet_real_at_n=c['frechet_real_at_n'], classifier_kid=c['kid'],
               classifier_kid_std=c['kid_std'])
    if labels is not None:
      row['asked_for_accuracy'] = c['asked_for_accuracy']
  if config.eval.inception_path:
    f = fid.fid_metrics(config, workdir, {name: images})[name]
    row.update(fid=f['fid'], kid=f.get('kid'), inception_score=f['inception_score'])
  return row


def guidance_row(config, workdir: str, w: float, images, labels) -> dict:
  """One row of the curve: the metrics available for ``config`` of one guided sample set."""
  return {'guidance_scale': w, 'num_samples': int(len(images)),
          **quality_row(config, workdir, f'w{w:g}', images, labels)}


def guidance_sweep(config, workdir: str, schedule, apply_fn, params, step: int) -> list[dict]:
  """:func:`guidance_row` for every w of ``eval.guidance_scales`` (uniform random labels)."""
  if not config.model.num_classes:
    raise ValueError('the guidance curve needs a class-conditional model (model.num_classes > 0).')
  ev = settings.eval_settings(config)
  set_label, sampler, steps = ev.sample_sets[0]
  rows = []
  for w in ev.guidance_scales:
    cfg = config.copy_and_resolve_references()
    cfg.sampling.guidance_scale = w
    cfg.sampling.class_label = -1
    images, labels = samples.labeled_sample_set(cfg, workdir, schedule, apply_fn, params, step,
                                                set_label, sampler, steps,
                                                int(config.eval.num_fid_samples))
    rows.append(guidance_row(cfg, workdir, w, images, labels))
  return rows


def write_guidance_curve(rows: list[dict], eval_dir: str) -> tuple[str, str]:
  """``guidance.csv`` (:data:`COLUMNS`) and ``guidance.png``: each computed metric against w."""
  csv_path, png_path, plt = rt.csv_and_pyplot(eval_dir, 'guidance', COLUMNS, rows)
  if plt is None:
    return csv_path, png_path
  shown = [c for c in COLUMNS[2:] if any(r.get(c) is not None for r in rows)]
  fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.4),
                           squeeze=False)
  ws = [r['guidance_scale'] for r in rows]
  for ax, c in zip(axes[0], shown):
    ax.plot(ws, [r.get(c, float('nan')) for r in rows], 'o-')
    ax.set(xlabel='guidance scale w', ylabel=c)
    ax.grid(alpha=0.3)
  rt.save_titled_figure(fig, png_path,
                        'Classifier-free guidance: fidelity vs diversity (Ho & Salimans 2022)')
  return csv_path, png_path
