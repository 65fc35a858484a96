"""``--mode sample`` and ``--mode eval``: what a user does with a trained DDPM.

:func:`sample` (from :mod:`diffusion_jax.evaluation.samples`) writes
``config.sampling.num_samples`` images from the (EMA) parameters of the latest
checkpoint. :func:`evaluate` runs the experiments of Ho et al. 2020
("Denoising Diffusion Probabilistic Models", DDPM) named by ``eval.parts`` on
a checkpoint and writes them to ``workdir/eval/``; each part is one module of
:mod:`diffusion_jax.evaluation`:

===============  ======================  =====================================
part             module                  output
===============  ======================  =====================================
``bpd``          ``bits_per_dim``        ``bpd.json`` (test NLL in bits/dim and
                                         its L_T / sum L_t / L_0 breakdown, eq. 5,
                                         Table 2), ``bpd_terms.npz``
``rd``           ``rate_distortion``     ``rate_distortion.csv`` / ``.png``
                                         (§4.3, Algorithms 3-4, Fig. 5)
``figures``      ``figures``             ``progressive_generation.png`` (Fig. 6),
                                         ``shared_latent.png`` (Fig. 7),
                                         ``interpolation.png`` (Figs. 8-9)
``fid``          ``fid``                 FID, KID and IS in ``metrics.json``
                                         (needs ``eval.inception_path``)
``classifier``   ``classifier_metrics``  digits only: distances in a small digit
                                         classifier's feature space, ``metrics.json``
``guidance``     ``guidance_sweep``      class-conditional models: the metrics per
                                         guidance scale, ``guidance.csv`` / ``.png``
``ode_bpd``      ``ode_bpd``             ``ode_bpd.json``: test bits/dim under the
                                         probability-flow ODE (score SDE App. D),
                                         uniformly dequantised, with the bound's
                                         bits/dim beside it
``nfe_curve``    ``nfe_curve``           ``nfe_curve.csv`` / ``.png``: sample
                                         quality against model calls for DDIM,
                                         DPM-Solver++, respaced ancestral, ODE
===============  ======================  =====================================

Sample sets for ``fid`` and ``classifier`` come from :mod:`diffusion_jax.evaluation.samples`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from etils import epath
import jax
from jax.sharding import Mesh
import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax import settings
from diffusion_jax.evaluation import bits_per_dim
from diffusion_jax.evaluation import classifier_metrics
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import figures
from diffusion_jax.evaluation import guidance_sweep
from diffusion_jax.evaluation import nfe_curve
from diffusion_jax.evaluation import ode_bpd
from diffusion_jax.evaluation import rate_distortion
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples
from diffusion_jax.evaluation.samples import sample  # noqa: F401  (--mode sample, called by main.py)
from diffusion_jax.schedule import Schedule

PARTS = settings.EVAL_PARTS

# Distinct streams of randomness, folded into PRNGKey(config.seed).
RNG_BPD, RNG_FIGURES, RNG_ODE_BPD = 0xB9D, 0xF16, 0x0DE


@dataclasses.dataclass
class _Context:
  """What the parts share: the checkpoint, and the test images / samples once drawn."""
  config: Any
  workdir: str
  eval_dir: str
  schedule: Schedule
  apply_fn: rt.ApplyFn
  params: Any
  step: int
  mesh: Mesh
  rng: Any
  cache: dict = dataclasses.field(default_factory=dict)

  def test_images(self) -> np.ndarray:
    if 'test' not in self.cache:
      self.cache['test'] = bits_per_dim.eval_images(self.config,
                                                    self.config.eval.num_bpd_examples)
    return self.cache['test']

  def test_labels(self):
    """True labels of :meth:`test_images` (None for an unconditional model)."""
    if 'test_labels' not in self.cache:
      self.cache['test_labels'] = bits_per_dim.eval_labels(self.config,
                                                           self.config.eval.num_bpd_examples)
    return self.cache['test_labels']

  def sample_sets(self) -> dict:
    if 'sets' not in self.cache:
      specs = settings.eval_settings(self.config).sample_sets
      num = int(self.config.eval.num_fid_samples)
      sets = {label: samples.labeled_sample_set(self.config, self.workdir, self.schedule,
                                                self.apply_fn, self.params, self.step, label,
                                                kind, steps, num)
              for label, kind, steps in specs}
      self.cache['sets'] = {label: images for label, (images, _) in sets.items()}
      self.cache['set_labels'] = {label: y for label, (_, y) in sets.items() if y is not None}
    return self.cache['sets']

  def sample_set_labels(self) -> dict:
    """The asked-for labels of :meth:`sample_sets` (class-conditional models; else empty)."""
    self.sample_sets()
    return self.cache['set_labels']


def _part_bpd(ctx: _Context) -> dict:
  result = bits_per_dim.bpd_eval(ctx.config, ctx.schedule, ctx.apply_fn, ctx.params,
                                 ctx.test_images(), jax.random.fold_in(ctx.rng, RNG_BPD),
                                 mesh=ctx.mesh, labels=ctx.test_labels())
  ctx.cache['bpd'] = result
  summary = bits_per_dim.bpd_summary(result)
  summary.update(step=ctx.step, split=ctx.config.data.eval_split)
  path = rt.join(ctx.eval_dir, 'bpd.json')
  rt.write_json(path, summary)
  rt.save_npz(rt.join(ctx.eval_dir, 'bpd_terms.npz'), vb=result['vb'],
              xstart_mse=result['xstart_mse'], mse=result['mse'],
              prior_bpd=np.mean(result['prior_bpd']), total_bpd=np.mean(result['total_bpd']),
              step=ctx.step)
  rt.say(f'  test NLL {summary["total_bpd"]:.4f} ± {summary["total_bpd_stderr"]:.4f} bits/dim '
         f'= L_T {summary["L_T_prior_bpd"]:.4f} + sum L_t {summary["sum_L_t_bpd"]:.4f} '
         f'+ L_0 {summary["L_0_decoder_bpd"]:.4f} ({summary["num_examples"]} images) -> {path}')
  return summary


def _bpd_terms(ctx: _Context):
  """(vb, xstart_mse, prior) of this checkpoint: from the bpd part, its file, or computed."""
  if 'bpd' not in ctx.cache:
    path = rt.join(ctx.eval_dir, 'bpd_terms.npz')
    terms = rt.load_npz(path) if rt.cached(path) else {}
    if 'step' in terms and int(terms['step']) == ctx.step:
      return terms['vb'], terms['xstart_mse'], float(terms['prior_bpd'])
    _part_bpd(ctx)   # no terms of this checkpoint on disk (writes bpd.json too)
  r = ctx.cache['bpd']
  return r['vb'], r['xstart_mse'], np.mean(r['prior_bpd'])


def _part_rd(ctx: _Context) -> dict:
  rd = rate_distortion.rate_distortion(*_bpd_terms(ctx))
  csv_path, png_path = rate_distortion.write_rate_distortion(rd, ctx.eval_dir)
  rt.say(f'  rate {rd["rate_bpd"][0]:.3f} -> {rd["rate_bpd"][-1]:.3f} bits/dim, distortion '
         f'{rd["distortion_rmse"][0]:.2f} -> {rd["distortion_rmse"][-1]:.2f} RMSE: {png_path}')
  return dict(csv=csv_path, png=png_path, final_rate_bpd=float(rd['rate_bpd'][-1]),
              final_distortion_rmse=float(rd['distortion_rmse'][-1]))


def _part_figures(ctx: _Context) -> dict:
  out = figures.write_figures(ctx.config, ctx.schedule, ctx.apply_fn, ctx.params,
                              bits_per_dim.eval_images(ctx.config, 9),
                              jax.random.fold_in(ctx.rng, RNG_FIGURES), ctx.eval_dir)
  rt.say('  ' + ', '.join(out['paths'].values()))
  return out


def _update_metrics(ctx: _Context, key: str, value: dict) -> None:
  """Adds ``{key: value}`` to ``metrics.json`` (dropping entries of another checkpoint)."""
  path = rt.join(ctx.eval_dir, 'metrics.json')
  current = rt.read_json(path) if epath.Path(path).exists() else {}
  if current.get('step') != ctx.step:
    current = {}
  current.update(step=ctx.step, **{key: value})
  rt.write_json(path, current)


def _part_fid(ctx: _Context) -> dict:
  sets = ctx.sample_sets() if ctx.config.eval.inception_path else {}
  out = fid.fid_metrics(ctx.config, ctx.workdir, sets)
  _update_metrics(ctx, 'fid', out)
  return out


def _part_classifier(ctx: _Context) -> dict:
  if ctx.config.data.name != 'digits':
    msg = f'classifier metric skipped: it is for data.name=digits (got {ctx.config.data.name!r}).'
    rt.say(f'  {msg}')
    return {'skipped': msg}
  out = classifier_metrics.classifier_metrics(ctx.config, ctx.workdir, ctx.sample_sets(),
                                             ctx.sample_set_labels())
  _update_metrics(ctx, 'classifier', out)
  return out


def _part_guidance(ctx: _Context) -> dict:
  if not ctx.config.model.num_classes:
    msg = 'guidance curve skipped: it is for class-conditional models (model.num_classes > 0).'
    rt.say(f'  {msg}')
    return {'skipped': msg}
  rows = guidance_sweep.guidance_sweep(ctx.config, ctx.workdir, ctx.schedule, ctx.apply_fn,
                                       ctx.params, ctx.step)
  csv_path, png_path = guidance_sweep.write_guidance_curve(rows, ctx.eval_dir)
  rt.say(f'  {csv_path}\n  {png_path}')
  return dict(csv=csv_path, png=png_path, rows=rows)


def _part_nfe_curve(ctx: _Context) -> dict:
  if ctx.config.model.num_classes:
    msg = 'nfe curve skipped: it is for unconditional models (model.num_classes=0).'
    rt.say(f'  {msg}')
    return {'skipped': msg}
  rows = nfe_curve.nfe_curve(ctx.config, ctx.workdir, ctx.schedule, ctx.apply_fn, ctx.params,
                             ctx.step)
  csv_path, png_path = nfe_curve.write_nfe_curve(rows, ctx.eval_dir)
  rt.say(f'  {csv_path}\n  {png_path}')
  return dict(csv=csv_path, png=png_path, rows=rows)


def _part_ode_bpd(ctx: _Context) -> dict:
  """Bits/dim under the probability-flow ODE of ``eval.num_ode_bpd_examples`` test images.

  An upper bound on the discrete images' bits/dim (one uniform dequantisation
  per image, score_sde's estimator) beside the variational bound of part ``bpd``
  (``bound_bpd``, read from ``bpd.json`` when it holds this checkpoint; and
  ``bound_bpd_same_images``, the bound of the same images, when ``bpd`` ran
  in the same call).
  """
  cfg = ctx.config
  num = int(cfg.eval.num_ode_bpd_examples)
  num = None if num < 0 else num
  images = data_lib.load_uint8(cfg, cfg.data.eval_split, num=num)
  start = time.perf_counter()
  out = ode_bpd.ode_bpd_eval(cfg, ctx.schedule, ctx.apply_fn, ctx.params, images,
                             jax.random.fold_in(ctx.rng, RNG_ODE_BPD), mesh=ctx.mesh,
                             labels=bits_per_dim.eval_labels(cfg, num))
  bpd, n = out['bpd'], int(out['bpd'].size)
  summary = dict(
      bpd=float(np.mean(bpd)),
      bpd_stderr=float(np.std(bpd, ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
      num_examples=n, nfe=float(np.mean(out['nfe'])), nfe_per_batch=out['nfe'].tolist(),
      rtol=float(cfg.sampling.ode_rtol), atol=float(cfg.sampling.ode_atol),
      trace='exact' if cfg.eval.ode_bpd_exact_trace else 'hutchinson',
      dequantization='uniform', wall_s=round(time.perf_counter() - start, 1),
      step=ctx.step, split=cfg.data.eval_split)
  bound_path = rt.join(ctx.eval_dir, 'bpd.json')
  if epath.Path(bound_path).exists():
    bound = rt.read_json(bound_path)
    if bound.get('step') == ctx.step:
      summary.update(bound_bpd=bound['total_bpd'], bound_bpd_stderr=bound['total_bpd_stderr'],
                     bound_num_examples=bound['num_examples'])
  same = ctx.cache.get('bpd', {}).get('total_bpd')   # part bpd ran in this call: per image
  if same is not None and len(same) >= n:
    summary['bound_bpd_same_images'] = float(np.mean(same[:n]))
  path = rt.join(ctx.eval_dir, 'ode_bpd.json')
  rt.write_json(path, summary)
  beside = (f'; bound {summary["bound_bpd"]:.4f} ± {summary["bound_bpd_stderr"]:.4f} '
            f'({summary["bound_num_examples"]} images)' if 'bound_bpd' in summary else '')
  if 'bound_bpd_same_images' in summary:
    beside += f', {summary["bound_bpd_same_images"]:.4f} on these {n}'
  rt.say(f'  ODE {summary["bpd"]:.4f} ± {summary["bpd_stderr"]:.4f} bits/dim ({n} images, '
         f'{summary["nfe"]:.0f} model calls per batch, {summary["wall_s"]} s){beside} -> {path}')
  return summary


_PART_FNS = {
    'bpd': ('test-set bits/dim (calc_bpd_loop)', _part_bpd),
    'rd': ('rate-distortion of progressive lossy decompression (Fig. 5)', _part_rd),
    'figures': ('progressive generation, shared x_t, interpolation (Figs. 6-9)', _part_figures),
    'fid': ('FID, KID and Inception Score', _part_fid),
    'classifier': ('digit-classifier Fréchet distance and KID', _part_classifier),
    'guidance': ('metrics per classifier-free guidance scale', _part_guidance),
    'ode_bpd': ('test-set bits/dim under the probability-flow ODE', _part_ode_bpd),
    'nfe_curve': ('sample quality per model call', _part_nfe_curve),
}


def evaluate(config, workdir: str) -> dict:
  """``--mode eval``: the parts named by ``config.eval.parts`` on the latest checkpoint.

  Writes into ``workdir/eval/`` (see the module docstring) and returns
  ``{part: result}`` plus ``step``; the per-part results are the JSON summaries
  (``bpd``), file paths (``rd``, ``figures``) or metric dicts (``fid``,
  ``classifier``) also written to disk.
  """
  parts = settings.parse_parts(config.eval.parts)
  workdir = rt.workdir_path(workdir)
  model, schedule, mesh, step, params = rt.restore_for_eval(config, workdir)
  eval_dir = rt.join(workdir, 'eval')
  if rt.is_main():
    epath.Path(eval_dir).mkdir(parents=True, exist_ok=True)
  ctx = _Context(config=config, workdir=workdir, eval_dir=eval_dir, schedule=schedule,
                 apply_fn=rt.apply_fn_for(model), params=params, step=step, mesh=mesh,
                 rng=jax.random.PRNGKey(config.seed))
  rt.say(f'Evaluating checkpoint step {step} of {workdir} '
         f'({"EMA" if config.sampling.use_ema else "raw"} parameters): '
         f'{", ".join(parts)}')
  results = {'step': step}
  for i, part in enumerate(parts, 1):
    desc, fn = _PART_FNS[part]
    rt.say(f'[eval {i}/{len(parts)}] {part}: {desc}')
    results[part] = fn(ctx)
  rt.say(f'Evaluation outputs in {eval_dir}')
  return results
