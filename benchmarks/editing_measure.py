"""The README's inpainting and SDEdit tables: the class a digit classifier reads, kept or not.

Runs ``--mode inpaint`` / ``--mode edit`` (``editing_cli.run_inpaint`` /
``run_edit``) on a trained digits workdir for each setting, reads the
original's and the result's class with the project's digit classifier
trained on the training split (:func:`digit_classifier`) and prints one JSON line per
setting (also appended to ``--out``):

* inpainting: ``class_kept`` (the result's class is the original's label),
  ``rms_missing`` (RMS distance to the original on the missing pixels, in
  [-1, 1] units: generated, not copied), ``known_kept`` (known pixels equal,
  uint8);
* editing: ``class_kept`` and ``rms`` (RMS distance to the original).

Each run's npz and PNG grid are copied to ``samples/<tag>.npz|png``.

Usage::

  python benchmarks/editing_measure.py --workdir runs/digits_edit --num 200 \\
      --inpaint 'bottom_half:replace:1:10:0,bottom_half:repaint:10:10:250' \\
      --edit '0.1,0.15,0.2,0.3,0.5,1'

An inpainting setting is ``missing:method:resample:jump_length:num_steps[:ancestral|ddim]``
(the reverse step; ddim with eta = 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np

from diffusion_jax import config_lib
from diffusion_jax import data as data_lib
from diffusion_jax import editing_cli
from diffusion_jax import images as image_lib
from diffusion_jax.evaluation import classifier
from diffusion_jax.evaluation import classifier_metrics


def digit_classifier(config, workdir):
  """The project's digit classifier trained on the training digits only.

  The results are completions of test digits, so the classifier must not have
  seen them: ``classifier_metrics.load_digit_classifier`` now learns on the
  test split (its role in the Fréchet metric), so this trains
  ``classifier.load_or_train_classifier`` on the training split and caches it
  in ``workdir/editing_classifier/eval``.
  """
  train = data_lib.load_split(config, 'train')
  return (classifier.load_or_train_classifier(f'{workdir}/editing_classifier', config, train,
                                              classifier_metrics.digits_labels('train')),
          'classifier.load_or_train_classifier(train split)')


def predict(params, images_uint8):
  x = images_uint8.astype(np.float32) / 127.5 - 1.0
  return np.asarray(classifier.classifier_logits(params, x)).argmax(-1)


def rms(a, b, where=None):
  d = (a.astype(np.float32) - b.astype(np.float32)) / 127.5
  if where is None:
    return float(np.sqrt(np.mean(d ** 2)))
  return float(np.sqrt(np.mean(d[where] ** 2)))


def write_figures(workdir, folder, columns=10):
  """README figures from earlier runs' npz files (first ``columns`` images each).

  ``inpainting.png``: per missing region, rows masked input | replace | RePaint |
  original; ``sdedit.png``: rows original, then the edits at increasing strength.
  """
  samples = f'{workdir}/samples'
  cells = []
  for missing, repaint in (('bottom_half', 'repaint_u30_j5_n50'), ('top_half', 'repaint_u30_j5_n50'),
                           ('left_half', 'repaint_u30_j5_n50'), ('center', 'repaint_u30_j5_n50'),
                           ('random', 'repaint_u30_j5_n50')):
    try:
      with np.load(f'{samples}/inpaint_{missing}_replace_n50.npz') as f:
        replace, originals, known = f['images'], f['originals'], f['known']
      with np.load(f'{samples}/inpaint_{missing}_{repaint}.npz') as f:
        repainted = f['images']
    except FileNotFoundError:
      continue
    masked = np.where(known, originals, np.uint8(editing_cli.MASKED_GREY))
    cells += [masked[:columns], replace[:columns], repainted[:columns], originals[:columns]]
  image_lib.save_grid(np.concatenate(cells), f'{folder}/inpainting.png', nrow=columns, scale=4)
  rows = []
  for tag in ('0.05', '0.1', '0.15', '0.2', '0.3', '0.5', '0.7', '1'):
    with np.load(f'{samples}/edit_s{tag}.npz') as f:
      if not rows:
        rows.append(f['originals'][:columns])
      rows.append(f['images'][:columns])
  image_lib.save_grid(np.concatenate(rows), f'{folder}/sdedit.png', nrow=columns, scale=4)
  print(f'wrote {folder}/inpainting.png and {folder}/sdedit.png')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/digits_edit')
  parser.add_argument('--num', type=int, default=200)
  parser.add_argument('--batch_size', type=int, default=200)
  parser.add_argument('--inpaint', default='')
  parser.add_argument('--edit', default='')
  parser.add_argument('--edit_sampler', default='ancestral')
  parser.add_argument('--edit_steps', type=int, default=100)
  parser.add_argument('--out', default='')
  parser.add_argument('--var_type', default='', help='override diffusion.var_type')
  parser.add_argument('--figures', default='',
                      help='write the README figures from the tagged npz files into this folder')
  args = parser.parse_args()
  if args.figures:
    write_figures(args.workdir, args.figures)
    return

  config = config_lib.digits_config()
  config.sampling.batch_size = args.batch_size
  if args.var_type:
    config.diffusion.var_type = args.var_type
  params, which = digit_classifier(config, args.workdir)
  rows = []

  def record(row):
    print(json.dumps(row), flush=True)
    rows.append(row)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(row) + '\n')

  originals_acc_done = False
  for spec in [s for s in args.inpaint.split(',') if s]:
    missing, method, resample, jump, steps, *step_kind = spec.split(':')
    step_kind = step_kind[0] if step_kind else 'ancestral'
    cfg = config.copy_and_resolve_references()
    cfg.inpaint.eta = 0.0 if step_kind == 'ddim' else -1.0
    ic = cfg.inpaint
    ic.missing, ic.method, ic.num_images = missing, method, args.num
    ic.resample, ic.jump_length, ic.num_steps = int(resample), int(jump), int(steps)
    config_lib.validate_config(cfg)
    start = time.time()
    out = editing_cli.run_inpaint(cfg, args.workdir)
    wall = time.time() - start
    with np.load(out['npz']) as f:
      images, originals, known, labels = f['images'], f['originals'], f['known'], f['labels']
    if not originals_acc_done:
      record(dict(kind='originals', classifier=which,
                  accuracy=float(np.mean(predict(params, originals) == labels)), num=len(labels)))
      originals_acc_done = True
    tag = f'inpaint_{missing}_{method}' + (f'_u{resample}_j{jump}' if method == 'repaint' else '') + (
        f'_n{steps}' if int(steps) else '') + ('_ddim' if step_kind == 'ddim' else '') + (
        f'_{args.var_type}' if args.var_type else '')
    for ext in ('npz', 'png'):
      shutil.copyfile(out[ext], out[ext].rsplit('/', 1)[0] + f'/{tag}.{ext}')
    record(dict(kind='inpaint', missing=missing, method=method, resample=int(resample),
                jump_length=int(jump), step=step_kind, var_type=cfg.diffusion.var_type, num_steps=int(steps) or config.diffusion.num_timesteps,
                num=len(labels), class_kept=float(np.mean(predict(params, images) == labels)),
                known_kept=bool(np.array_equal(images[known], originals[known])),
                rms_missing=rms(images, originals, ~known), wall_s=round(wall, 1), tag=tag))

  for strength in [float(s) for s in args.edit.split(',') if s]:
    cfg = config.copy_and_resolve_references()
    cfg.edit.strength, cfg.edit.num_images = strength, args.num
    cfg.sampling.sampler, cfg.sampling.num_steps = args.edit_sampler, args.edit_steps
    start = time.time()
    out = editing_cli.run_edit(cfg, args.workdir)
    wall = time.time() - start
    with np.load(out['npz']) as f:
      images, originals, labels = f['images'], f['originals'], f['labels']
    record(dict(kind='edit', strength=strength, sampler=args.edit_sampler,
                num=len(labels), class_kept=float(np.mean(predict(params, images) == labels)),
                rms=rms(images, originals), wall_s=round(wall, 1)))


if __name__ == '__main__':
  main()
