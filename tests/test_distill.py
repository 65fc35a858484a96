"""Tests for ``--mode distill`` (diffusion_jax.distill): rounds, resume, skip, errors, the student workdir."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax import data as data_lib
from diffusion_jax import distill
from diffusion_jax import models
from diffusion_jax import sampling
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import teacher_paths
from diffusion_jax import train
from diffusion_jax import train_state
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.evaluation import nfe_curve

TINY = {
    'model.ch': 8, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1, 'model.num_groups': 4,
    'model.attn_resolutions': (4,), 'diffusion.num_timesteps': 16, 'training.batch_size': 16,
    'optim.warmup_steps': 2, 'sampling.sampler': 'ddim', 'sampling.num_steps': 4,
    'training.num_sample_images': 4, 'training.num_train_steps': 2,
    'training.checkpoint_every_steps': 2, 'training.log_every_steps': 2,
    'training.sample_every_steps': 100,
    'distill.start_steps': 4, 'distill.final_steps': 1, 'distill.steps_per_round': 4,
    # The paper's chain, named rather than inherited, so the tests keep their meaning
    # whatever the library's defaults are (PATHS below: the stored-paths variant).
    'distill.inputs': 'data', 'distill.teacher': 'previous',
    'distill.loss_weighting': 'truncated_snr', 'distill.student_eta': 0.0,
    'distill.path_solver_order': 1,   # stored paths, where a test asks for them: DDIM's
}


def tiny_config(**overrides):
  return config_lib.apply_overrides(config_lib.digits_config(), {**TINY, **overrides},
                                    trained=False)


def _cli(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  args = [f'--default_config.{k}={v}'.replace(' ', '') for k, v in TINY.items()]
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.main', f'--workdir={workdir}',
                         *args, *flags], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A tiny workdir trained for 2 steps: the teacher."""
  workdir = tmp_path_factory.mktemp('teacher') / 'run'
  config = tiny_config()
  workdir_lib.prepare(str(workdir), config.to_json_best_effort(indent=2, sort_keys=True))
  train.train_and_evaluate(config, str(workdir))   # as --mode train leaves it, config.json too
  return workdir


def _copy(teacher, tmp_path):
  out = tmp_path / 'run'
  shutil.copytree(teacher, out)
  return out


def test_rounds_write_complete_student_workdirs_and_rerun_skips(teacher, tmp_path, capsys):
  workdir = _copy(teacher, tmp_path)
  config = tiny_config()
  students = distill.distill(config, str(workdir))
  assert sorted(students) == [1, 2]
  for n in (2, 1):
    out = workdir / 'distilled' / f'steps_{n}'
    assert sorted(os.listdir(out / 'checkpoints')) == ['2', '4']
    saved = json.loads((out / 'config.json').read_text())
    assert saved['diffusion']['mean_type'] == 'v'
    assert saved['sampling']['sampler'] == 'ddim' and saved['sampling']['num_steps'] == n
    assert saved['sampling']['skip_type'] == 'trailing' and saved['sampling']['eta'] == 0.0
    assert os.path.getsize(out / 'samples' / 'samples_00000004.png') > 0
  timing = json.loads((workdir / 'distilled' / 'rounds.json').read_text())
  assert sorted(timing) == ['1', '2'] and all(v['steps'] == 4 for v in timing.values())
  # The 2-step student is the 1-step round's teacher: its params differ from the original's.
  mtime = os.path.getmtime(workdir / 'distilled' / 'steps_1' / 'checkpoints' / '4')
  capsys.readouterr()
  again = distill.distill(config, str(workdir))
  out = capsys.readouterr().out
  assert out.count('is complete (step 4); skipping.') == 2
  assert os.path.getmtime(workdir / 'distilled' / 'steps_1' / 'checkpoints' / '4') == mtime
  chex.assert_trees_all_close(again[1], students[1], rtol=0, atol=0)
  # The nfe_curve part finds both students and samples each with its own config in N calls.
  (workdir / 'distilled' / 'steps_8' / 'checkpoints').mkdir(parents=True)  # no checkpoint yet
  found = nfe_curve.distilled_students(str(workdir))
  assert [(n, step) for n, _, step in found] == [(1, 4), (2, 4)]
  for n, path, _ in found:
    images, calls = nfe_curve._draw_student(path, jax.random.PRNGKey(0), 4, (8, 8, 1), 4, n)  # pylint: disable=protected-access
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8 and calls == n


def _fixed_loss(config, teacher_config, params, teacher_params):
  model = models.create_model(config)
  schedule = schedule_lib.schedule_from_config(config)
  grid = distill.dl.round_grid(schedule, config.sampling.num_steps, config.distill.teacher_steps)
  batch = next(data_lib.create_train_iterator(config))
  losses = [distill.round_loss(params, teacher_params, batch, jax.random.PRNGKey(k),
                               teacher_config=teacher_config, config=config, model=model,
                               schedule=schedule, grid=grid)[0] for k in range(4)]
  return float(np.mean(losses))


@pytest.mark.parametrize('teacher_steps,final',
                         [(2, 2), pytest.param(4, 1, marks=pytest.mark.slow)])
def test_one_round_lowers_its_loss(teacher, tmp_path, teacher_steps, final):
  """One round (4 -> 2 steps, or 4 -> 1 with four teacher steps per student step)."""
  workdir = _copy(teacher, tmp_path)
  config = tiny_config(**{'distill.final_steps': final, 'distill.steps_per_round': 30,
                          'distill.teacher_steps': teacher_steps,
                          'distill.lr': 1e-3, 'training.checkpoint_every_steps': 30,
                          'training.log_every_steps': 10})
  mesh = train.make_mesh()
  _, teacher_params = train_state.restore_params(config, models.create_model(config), workdir,
                                                 mesh)
  students = distill.distill(config, str(workdir))
  assert list(students) == [final]
  cfg = distill.student_config(config, final)
  before = _fixed_loss(cfg, config, teacher_params, teacher_params)
  after = _fixed_loss(cfg, config, students[final], teacher_params)
  assert after < 0.9 * before, (before, after)   # measured: 0.189 -> 0.160 (K = 2)


PATHS = {'distill.inputs': 'teacher_paths', 'distill.teacher': 'original',
         'distill.num_paths': 64, 'distill.path_chunk': 32, 'distill.loss_weighting': 'landing'}


def test_a_round_on_teacher_paths_lowers_its_loss_on_them(teacher, tmp_path, capsys):
  """``distill.inputs='teacher_paths'``: the 4 -> 2 round regresses on the stored paths."""
  workdir = _copy(teacher, tmp_path)
  config = tiny_config(**PATHS, **{'distill.final_steps': 2, 'distill.steps_per_round': 30,
                                   'distill.lr': 1e-3, 'training.checkpoint_every_steps': 30,
                                   'training.log_every_steps': 10})
  mesh = train.make_mesh()
  model = models.create_model(config)
  _, original = train_state.restore_params(config, model, workdir, mesh)
  students = distill.distill(config, str(workdir))
  assert 'targets from 64 stored paths' in capsys.readouterr().out
  paths = teacher_paths.make_paths(config, model, schedule_lib.schedule_from_config(config),
                                   original, workdir, stored_steps=2, checkpoint_step=2,
                                   mesh=mesh)   # the round's pool, read back
  cfg = distill.student_config(config, 2)
  schedule = schedule_lib.schedule_from_config(cfg)
  grid = distill.dl.round_grid(schedule, 2, distill.round_teacher_steps(cfg.distill, 2))
  batch = {'image': jnp.zeros((16, 8, 8, 1))}
  kw = dict(teacher_config=config, config=cfg, model=model, schedule=schedule, grid=grid,
            mesh=mesh)
  loss = lambda p, k: distill.path_round_loss(p, paths, batch, jax.random.PRNGKey(k), **kw)
  # The loss is the landing error of the drawn steps, by hand from the stored states.
  i, b = teacher_paths.draw(paths, jax.random.PRNGKey(0), 16, 2)
  z, z_end = paths.states[i, b], paths.states[i + 1, b]   # 2 stored steps, 2 student steps
  landing = distill.dl.ddim_eta0(schedule, train.model_fn_for(model, original), z, grid.t[i],
                                 grid.abar[i], grid.abar_end[i], mean_type='v',
                                 clip_denoised=False)   # where the student's step lands
  np.testing.assert_allclose(loss(original, 0)[0],
                             np.mean(np.square(landing - z_end), axis=(1, 2, 3)).mean(),
                             rtol=1e-4)
  before = np.mean([loss(original, k)[0] for k in range(4)])
  after = np.mean([loss(students[2], k)[0] for k in range(4)])
  assert after < 0.9 * before, (before, after)


@pytest.mark.slow   # 1.5 minutes on 2 cores: run by `pytest -m slow`
def test_original_teacher_targets_its_whole_path_in_every_round(teacher, tmp_path, monkeypatch,
                                                               capsys):
  """``distill.teacher='original'``: every round regresses on the original model's 4-step path.

  Round 1 (4 -> 2) is the paper's; round 2 (2 -> 1) starts from the 2-step student
  but its teacher is the original model, four DDIM steps per student step, so its
  target from z is the original model's whole 4-step DDIM sample from z.
  """
  config = tiny_config(**{'distill.teacher': 'original'})
  mesh = train.make_mesh()
  model = models.create_model(config)
  _, original = train_state.restore_params(config, model, teacher, mesh)
  seen, run_round = [], distill.run_round

  def spy(teacher_config, cfg, teacher_params, out_dir, **kw):
    seen.append((teacher_config.diffusion.mean_type, teacher_params, kw['init_params'],
                 distill.round_teacher_steps(cfg.distill, cfg.sampling.num_steps)))
    return run_round(teacher_config, cfg, teacher_params, out_dir, **kw)

  monkeypatch.setattr(distill, 'run_round', spy)
  students = distill.distill(config, str(_copy(teacher, tmp_path / 'a')))
  assert "targets from the original model's 4 DDIM steps" in capsys.readouterr().out
  assert [(m, k) for m, _, _, k in seen] == [('eps', 2), ('eps', 4)]
  for _, teacher_params, _, _ in seen:
    chex.assert_trees_all_close(teacher_params, original, rtol=0, atol=0)
  chex.assert_trees_all_close(seen[1][2], students[2], rtol=0, atol=0)   # from the 2-step student
  # Round 1 is the paper's round.
  paper = distill.distill(tiny_config(**{'distill.final_steps': 2}),
                          str(_copy(teacher, tmp_path / 'b')))
  chex.assert_trees_all_close(students[2], paper[2], rtol=1e-6, atol=1e-7)
  # Round 2's target from z at T-1 is the original model's 4-step DDIM sample from z.
  cfg = distill.student_config(config, 1)
  schedule = schedule_lib.schedule_from_config(config)
  grid = distill.dl.round_grid(schedule, 1, distill.round_teacher_steps(cfg.distill, 1))
  fn = distill.teacher_model_fn(config, model, original, None)
  z = jax.random.normal(jax.random.PRNGKey(5), (4, 8, 8, 1))
  abar = grid.abar[0]
  x = z / jnp.sqrt(abar)   # so that the round's z_t = sqrt(abar) x + sqrt(1 - abar) * 0 is z
  terms = distill.dl.student_loss(schedule, fn, fn, x, jnp.zeros_like(z), jnp.zeros(4, jnp.int32),
                                  grid, teacher_mean_type='eps', student_mean_type='v',
                                  clip_denoised=True)
  sample = sampling.ddim_sample_loop(schedule, fn, jax.random.PRNGKey(0), z.shape, num_steps=4,
                                     skip_type='trailing', x_T=z)
  np.testing.assert_allclose(terms['target'], sample, rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # a minute on 2 cores each: run by `pytest -m slow`
@pytest.mark.parametrize('inputs', ['data', 'solver_paths'])
def test_resume_after_a_stop_or_a_kill_equals_an_uninterrupted_run(teacher, tmp_path, inputs):
  """The paper's chain, and the library's default: stored DPM-Solver++ (3M) paths."""
  paths = {**PATHS, 'distill.path_solver_order': 3, 'distill.num_paths': 32,
           'distill.path_chunk': 16}
  config = tiny_config(**(paths if inputs == 'solver_paths' else {}))
  straight = distill.distill(config, str(_copy(teacher, tmp_path / 'a')))
  workdir = _copy(teacher, tmp_path / 'b')
  # Stopped (SIGTERM / Ctrl-C) at step 3 of the first round: a checkpoint at 3.
  partial = distill.distill(config, str(workdir), stop_at=3)
  assert partial == {}
  steps_2 = workdir / 'distilled' / 'steps_2' / 'checkpoints'
  assert sorted(os.listdir(steps_2)) == ['2', '3']
  # kill -9 right after the save at 3 of the 2nd... here: lose checkpoint 3, resume from 2.
  shutil.rmtree(steps_2 / '3')
  resumed = distill.distill(config, str(workdir))
  for n in (2, 1):
    chex.assert_trees_all_close(resumed[n], straight[n], rtol=1e-6, atol=1e-7)


def test_bad_settings_are_one_line_errors(teacher, tmp_path):
  cases = [
      (tmp_path / 'empty', [], 'no checkpoint'),
      (teacher, ['--default_config.distill.start_steps=6'], 'distill.start_steps must be a power'),
      (teacher, ['--default_config.distill.final_steps=3'], 'distill.final_steps must be a power'),
      (teacher, ['--default_config.distill.final_steps=8'], 'must be smaller than'),
      (teacher, ['--default_config.distill.student_mean_type=eps'], 'distill.student_mean_type'),
      (teacher, ['--default_config.distill.teacher=best'], 'distill.teacher'),
      (teacher, ['--default_config.distill.loss_weighting=snr'], 'distill.loss_weighting'),
      (teacher, ['--default_config.distill.inputs=noise'], 'distill.inputs'),
      (teacher, ['--default_config.distill.inputs=teacher_paths'],
       "distill.inputs='teacher_paths' needs distill.teacher='original'"),
      (teacher, ['--default_config.distill.inputs=teacher_paths',
                 '--default_config.distill.teacher=original',
                 '--default_config.distill.num_paths=100'], 'distill.num_paths=100 must be'),
      (teacher, ['--default_config.distill.inputs=teacher_paths',
                 '--default_config.distill.teacher=original',
                 '--default_config.distill.path_solver_order=4'],
       'distill.path_solver_order=4 is not supported; allowed values: 1, 2, 3.'),
  ]
  for workdir, flags, message in cases:
    proc = _cli(workdir, '--mode=distill', *flags)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
  assert not (teacher / 'distilled').exists() and not (tmp_path / 'empty').exists()


def test_student_eta_is_the_student_configs_sampling_eta():
  config = tiny_config(**{'distill.student_eta': 0.3})
  config_lib.validate_distill(config)
  assert distill.student_config(config, 2).sampling.eta == 0.3
  assert distill.student_config(tiny_config(), 2).sampling.eta == 0.0
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r'distill.student_eta must be in \[0, 1\], got'):
      config_lib.validate_distill(tiny_config(**{'distill.student_eta': bad}))


def test_student_workdir_samples_with_mode_sample_and_the_pipeline(teacher, tmp_path):
  """A student's workdir is a workdir: --mode sample and diffusion_jax.load need no override."""
  import diffusion_jax  # pylint: disable=g-import-not-at-top
  workdir = _copy(teacher, tmp_path)
  distill.distill(tiny_config(**{'distill.final_steps': 2}), str(workdir))
  student = workdir / 'distilled' / 'steps_2'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'diffusion_jax.main', f'--workdir={student}',
                         '--mode=sample', '--config.sampling.num_samples=8'],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with np.load(student / 'samples' / 'samples_ddim_2.npz') as f:   # its config: ddim, 2 steps
    images = f['images']
  assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
  pipe = diffusion_jax.load(str(student))
  sc = pipe.config.sampling
  assert (pipe.config.diffusion.mean_type, sc.sampler, sc.num_steps, sc.skip_type) == (
      'v', 'ddim', 2, 'trailing')
  np.testing.assert_array_equal(pipe.sample(8, seed=0), images)


@pytest.mark.slow   # trains its own conditional teacher: minutes on 2 loaded cores
def test_conditional_teacher_distils_with_labels_at_fixed_guidance(tmp_path):
  config = tiny_config(**{'model.num_classes': 10, 'model.class_dropout': 0.1,
                          'sampling.guidance_scale': 2.0, 'distill.final_steps': 2,
                          'distill.steps_per_round': 2})
  workdir = tmp_path / 'cond'
  train.train_and_evaluate(config, str(workdir))
  student = distill.distill(config, str(workdir))[2]
  saved = json.loads((workdir / 'distilled' / 'steps_2' / 'config.json').read_text())
  assert saved['model']['num_classes'] == 10 and saved['sampling']['guidance_scale'] == 0.0
  # The teacher's model_fn is the guided one: (1 + w) eps(x, y) - w eps(x, none).
  model = models.create_model(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
  t, y = jnp.array([15, 7, 0]), jnp.array([1, 4, 9])
  eps = lambda yy: model.apply({'params': student}, x, t, y=yy, train=False)
  guided = distill.teacher_model_fn(config, model, student, y)(x, t)
  np.testing.assert_allclose(guided, 3.0 * eps(y) - 2.0 * eps(jnp.full((3,), 10)),
                             rtol=1e-5, atol=1e-5)
  # The student learns with its labels: its loss depends on them.
  cfg = distill.student_config(config, 2)
  schedule = schedule_lib.schedule_from_config(cfg)
  batch = next(data_lib.create_train_iterator(cfg))
  kw = dict(teacher_config=config, config=cfg, model=model, schedule=schedule,
            grid=distill.dl.round_grid(schedule, 2))
  a = distill.round_loss(student, student, batch, jax.random.PRNGKey(1), **kw)[0]
  b = distill.round_loss(student, student, {**batch, 'label': (batch['label'] + 1) % 10},
                         jax.random.PRNGKey(1), **kw)[0]
  assert float(a) != float(b)
