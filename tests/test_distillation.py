"""Tests for diffusion_jax.distillation (progressive distillation's math) and the trailing grid.

The teacher is the exact denoiser of Gaussian data N(mu, s^2 I), so two of its
DDIM steps have a closed form; the references below are plain NumPy in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import distillation as dl
from diffusion_jax import sampling
from diffusion_jax import timesteps
from diffusion_jax.schedule import make_schedule

MU, STD = 0.3, 0.5
SHAPE = (6, 4, 4, 1)


def exact_x0(abar, z):
  """E[x | z_t] for x ~ N(MU, STD^2): MU + a STD^2 / (a^2 STD^2 + s^2) (z - a MU) (a, s = alpha, sigma)."""
  a, var = abar ** 0.5, 1.0 - abar
  return MU + a * STD ** 2 / (a * a * STD ** 2 + var) * (z - a * MU)


def teacher(s, mean_type):
  """The exact Gaussian denoiser as a model of ``mean_type`` (eps, x0 or v)."""
  abar_all = s.alphas_cumprod

  def fn(z, t):
    abar = abar_all[t].reshape((-1,) + (1,) * (z.ndim - 1))
    x0 = exact_x0(abar, z)
    a, sg = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    eps = (z - a * x0) / sg
    return {'eps': eps, 'x0': x0, 'v': a * eps - sg * x0}[mean_type]

  return fn


def np_ddim(z, abar, abar_to):
  """One DDIM eta=0 step of the exact denoiser in float64 NumPy (no clipping)."""
  x0 = exact_x0(abar, z)
  eps = (z - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)
  return np.sqrt(abar_to) * x0 + np.sqrt(1.0 - abar_to) * eps


@pytest.mark.parametrize('T,n', [(1000, 1), (1000, 4), (1000, 64), (1000, 1000), (40, 8), (24, 3)])
def test_trailing_grid_matches_diffusers_formula(T, n):
  expected = np.sort(np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)
  np.testing.assert_array_equal(timesteps.trailing_timesteps(T, n), expected)
  np.testing.assert_array_equal(sampling.ddim_timesteps(T, n, 'trailing'), expected)
  assert 'trailing' in sampling.SKIP_TYPES


def test_trailing_grid_values_and_nesting():
  np.testing.assert_array_equal(timesteps.trailing_timesteps(1000, 4), [249, 499, 749, 999])
  for T in (1000, 8, 24, 40, 1024):
    n = 1
    while 2 * n <= T:
      fine, coarse = timesteps.trailing_timesteps(T, 2 * n), timesteps.trailing_timesteps(T, n)
      # Descending, point i of n is point 2i of 2n: ascending, the odd entries of the fine grid.
      np.testing.assert_array_equal(coarse, fine[1::2])
      assert coarse[-1] == T - 1
      n *= 2


def test_round_grid_against_numpy():
  s = make_schedule('linear', 1000)
  g = dl.round_grid(s, 4)
  desc = [999, 874, 749, 624, 499, 374, 249, 124]   # round(1000 - 125 j) - 1
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  np.testing.assert_array_equal(g.t, desc[0::2])
  np.testing.assert_array_equal(g.t_path, np.reshape(desc, (4, 2)))
  np.testing.assert_allclose(g.abar, abar[desc[0::2]], rtol=1e-5)
  np.testing.assert_allclose(g.abar_path[:, 1], abar[desc[1::2]], rtol=1e-5)
  np.testing.assert_allclose(g.abar_end, list(abar[desc[2::2]]) + [1.0], rtol=1e-5)


def test_round_grid_of_four_teacher_steps_against_numpy():
  s = make_schedule('linear', 1000)
  g = dl.round_grid(s, 2, teacher_steps=4)
  desc = [999, 874, 749, 624, 499, 374, 249, 124]
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  assert g.teacher_steps == 4
  np.testing.assert_array_equal(g.t, [999, 499])
  np.testing.assert_array_equal(g.t_path, [desc[:4], desc[4:]])
  np.testing.assert_allclose(g.abar_path, [abar[desc[:5]], list(abar[desc[4:]]) + [1.0]],
                             rtol=1e-5)
  np.testing.assert_allclose(g.abar_end, [abar[499], 1.0], rtol=1e-5)


def test_round_step_counts():
  assert dl.round_step_counts(64, 1) == [32, 16, 8, 4, 2, 1]
  assert dl.round_step_counts(8, 2) == [4, 2]
  assert dl.round_step_counts(64, 1, 4) == [16, 4, 1]
  assert dl.round_step_counts(64, 4, 16) == [4]


@pytest.mark.parametrize('mean_type,k', [('eps', 2), ('x0', 2), ('v', 2), ('eps', 4)])
def test_target_reproduces_the_teacher_steps(mean_type, k):
  """One DDIM step with x~ as the x_0 prediction lands where the teacher's K steps do (NumPy)."""
  s = make_schedule('linear', 1000)
  n = 4
  g = dl.round_grid(s, n, k)
  z = jax.random.normal(jax.random.PRNGKey(0), (n,) + SHAPE[1:])
  i = jnp.arange(n)   # every student step, the last one (to abar = 1) included
  z_end = dl.teacher_steps(s, teacher(s, mean_type), z, g, i, mean_type=mean_type,
                           clip_denoised=False)
  target = np.asarray(dl.distillation_target(z, z_end, g.abar[i], g.abar_end[i]), np.float64)
  abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  desc = list(timesteps.trailing_timesteps(1000, k * n)[::-1])
  for m in range(n):
    path = [abar_all[t] for t in desc[k * m:k * m + k + 1]] + [1.0]   # K + 1 points (+ 1)
    a, a_end = path[0], path[k]
    ref = np.asarray(z[m], np.float64)
    for j in range(k):
      ref = np_ddim(ref, path[j], path[j + 1])
    np.testing.assert_allclose(np.asarray(z_end[m]), ref, rtol=2e-4, atol=2e-4)
    # The student's single DDIM step t -> t_end with x_0 = x~ (eq. 12, eta = 0).
    zm = np.asarray(z[m], np.float64)
    eps_student = (zm - np.sqrt(a) * target[m]) / np.sqrt(1 - a)
    one_step = np.sqrt(a_end) * target[m] + np.sqrt(1 - a_end) * eps_student
    np.testing.assert_allclose(one_step, ref, rtol=2e-4, atol=2e-4)
  # At the last step x~ is the teacher's end point itself.
  np.testing.assert_allclose(target[-1], np.asarray(z_end[-1]), rtol=1e-6, atol=1e-6)


def test_target_formula_closed_form():
  z, z_end = jnp.full((1, 2), 2.0), jnp.full((1, 2), 0.5)
  abar, abar_end = jnp.array([0.36]), jnp.array([0.64])   # alpha .6 sigma .8 -> .8, .6
  ratio = 0.6 / 0.8
  expected = (0.5 - ratio * 2.0) / (0.8 - ratio * 0.6)
  np.testing.assert_allclose(dl.distillation_target(z, z_end, abar, abar_end), expected, rtol=1e-6)
  np.testing.assert_allclose(dl.truncated_snr_weight(jnp.array([0.2, 0.5, 0.8])),
                             [1.0, 1.0, 4.0], rtol=1e-6)


def _ideal_student(s, grid, teacher_fn, teacher_mean, student_mean):
  """A student whose x_0 prediction is exactly x~ (its output expressed as ``student_mean``)."""
  def fn(z, t):
    i = jnp.argmax(grid.t[None, :] == t[:, None], axis=1)
    z_end = dl.teacher_steps(s, teacher_fn, z, grid, i, mean_type=teacher_mean,
                                 clip_denoised=False)
    x0 = dl.distillation_target(z, z_end, grid.abar[i], grid.abar_end[i])
    abar = grid.abar[i].reshape((-1,) + (1,) * (z.ndim - 1))
    if student_mean == 'x0':
      return x0
    return (jnp.sqrt(abar) * z - x0) / jnp.sqrt(1.0 - abar)   # v: x0 = alpha z - sigma v
  return fn


@pytest.mark.parametrize('student_mean', ['x0', 'v'])
def test_ideal_student_samples_like_teacher_in_half_the_steps(student_mean):
  s = make_schedule('linear', 40)
  n = 4
  g = dl.round_grid(s, n)
  t_fn = teacher(s, 'eps')
  student = _ideal_student(s, g, t_fn, 'eps', student_mean)
  rng = jax.random.PRNGKey(3)
  x_teacher = sampling.ddim_sample_loop(s, t_fn, rng, SHAPE, num_steps=2 * n, skip_type='trailing',
                                        clip_denoised=False)
  x_student = sampling.ddim_sample_loop(s, student, rng, SHAPE, num_steps=n, skip_type='trailing',
                                        mean_type=student_mean, clip_denoised=False)
  np.testing.assert_allclose(x_student, x_teacher, rtol=1e-4, atol=1e-4)
  # And the loss of that student is zero; a perturbed one pays max(SNR, 1) x its x_0 error.
  x = MU + STD * jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  noise = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  i = jnp.array([0, 1, 2, 3, 3, 2])
  kw = dict(teacher_mean_type='eps', student_mean_type=student_mean, clip_denoised=False)
  out = dl.student_loss(s, student, t_fn, x, noise, i, g, **kw)
  np.testing.assert_allclose(out['loss'], 0.0, atol=1e-8)
  if student_mean == 'x0':
    off = lambda z, t: student(z, t) + 0.1   # x_0 error 0.1 everywhere
    out = dl.student_loss(s, off, t_fn, x, noise, i, g, **kw)
    abar = np.asarray(g.abar)[np.asarray(i)]
    np.testing.assert_allclose(out['mse'], 0.01, rtol=1e-3)
    np.testing.assert_allclose(out['loss'], 0.01 * np.maximum(abar / (1 - abar), 1), rtol=1e-3)


def test_landing_loss_is_the_squared_distance_where_the_student_step_lands():
  """'landing': w ||x~ - x^||^2 equals ||z_t''(student) - z_t''(teacher)||^2, DDIM step by step."""
  s = make_schedule('linear', 40)
  g = dl.round_grid(s, 4)
  t_fn = teacher(s, 'eps')
  student = lambda z, t: 0.3 * z + 0.01 * t.astype(z.dtype).reshape((-1, 1, 1, 1))   # any x_0 net
  x = MU + STD * jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  noise = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  i = jnp.array([0, 1, 2, 3, 3, 1])
  out = dl.student_loss(s, student, t_fn, x, noise, i, g, teacher_mean_type='eps',
                        student_mean_type='x0', clip_denoised=False, weighting='landing')
  # Independent: the student's own DDIM step from z_t, in float64 NumPy.
  abar, abar_end = (np.asarray(a, np.float64)[np.asarray(i)][:, None, None, None]
                    for a in (g.abar, g.abar_end))
  z = np.sqrt(abar) * np.asarray(x, np.float64) + np.sqrt(1 - abar) * np.asarray(noise, np.float64)
  x_hat = np.asarray(student(jnp.asarray(z, jnp.float32), g.t[i]), np.float64)
  eps_hat = (z - np.sqrt(abar) * x_hat) / np.sqrt(1 - abar)
  lands = np.sqrt(abar_end) * x_hat + np.sqrt(1 - abar_end) * eps_hat   # DDIM eq. 12, eta = 0
  z_end = dl.teacher_steps(s, t_fn, jnp.asarray(z, jnp.float32), g, i, mean_type='eps',
                           clip_denoised=False)
  want = np.mean(np.square(lands - np.asarray(z_end, np.float64)), axis=(1, 2, 3))
  np.testing.assert_allclose(out['loss'], want, rtol=2e-3)
  # 1 at the last step (x~ is z_t'' itself), below 1 and growing with abar before it.
  w = np.asarray(dl.landing_weight(g.abar, g.abar_end))
  assert w[-1] == pytest.approx(1.0) and np.all(np.diff(w) > 0) and w[0] < 0.1, w
  with pytest.raises(ValueError, match='landing, truncated_snr'):
    dl.step_weight('snr', g.abar, g.abar_end)
