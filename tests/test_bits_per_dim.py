"""Tests for diffusion_jax.evaluation.bits_per_dim (DDPM eq. 5, Table 2); the whole part runs in test_evaluate.py."""

import jax
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax.evaluation import bits_per_dim
from diffusion_jax.schedule import make_schedule


def test_batches_and_padding_do_not_change_the_bound():
  """Batches of 2 (the last one padded) give the per-example values of one batch of 5."""
  config = config_lib.digits_config()
  s = make_schedule('linear', 10, beta_start=1e-3, beta_end=0.2)
  config.diffusion.num_timesteps = 10
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (5, 4, 4, 1), minval=-1,
                                         maxval=1))
  images = np.round((images + 1) * 127.5) / 127.5 - 1
  model = lambda params, x, t: params * x
  # The same key for every batch: the per-example terms then depend only on the image.
  one = bits_per_dim.bpd_eval(config, s, model, 0.3, images, jax.random.PRNGKey(1),
                              batch_size=5, progress=False)
  two = bits_per_dim.bpd_eval(config, s, model, 0.3, images[:2], jax.random.PRNGKey(1),
                              batch_size=2, progress=False)
  assert one['total_bpd'].shape == (5,) and one['vb'].shape == (10,)
  np.testing.assert_allclose(two['total_bpd'], one['total_bpd'][:2], rtol=1e-5)
  split = bits_per_dim.bpd_eval(config, s, model, 0.3, images, jax.random.PRNGKey(1),
                                batch_size=2, progress=False)
  assert split['total_bpd'].shape == (5,)
  np.testing.assert_allclose(split['prior_bpd'], one['prior_bpd'], rtol=1e-6)   # no noise in L_T
  summary = bits_per_dim.bpd_summary(one)
  np.testing.assert_allclose(summary['total_bpd'],
                             summary['L_T_prior_bpd'] + summary['sum_L_t_bpd']
                             + summary['L_0_decoder_bpd'], rtol=1e-5)
  assert summary['num_examples'] == 5 and summary['num_timesteps'] == 10
  with pytest.raises(ValueError, match='at least one image'):
    bits_per_dim.bpd_eval(config, s, model, 0.3, images[:0], jax.random.PRNGKey(1))


def test_eval_images_on_the_8_bit_grid():
  config = config_lib.digits_config()
  x = bits_per_dim.eval_images(config, 7)
  assert x.shape == (7, 8, 8, 1) and x.dtype == np.float32
  np.testing.assert_allclose((x + 1) * 127.5, np.round((x + 1) * 127.5), atol=1e-4)
  assert x.min() >= -1 and x.max() <= 1
  assert bits_per_dim.eval_images(config).shape[0] == 297   # -1 / None: the whole test split
