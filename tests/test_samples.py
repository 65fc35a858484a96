"""Tests for diffusion_jax.evaluation.samples (``--mode sample`` runs in test_evaluate.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config_lib, guidance, settings
from diffusion_jax.evaluation import samples
from diffusion_jax.schedule import make_schedule


def test_conditioning_tag():
  assert samples.conditioning_tag(guidance.Conditioning()) == ''
  assert samples.conditioning_tag(guidance.Conditioning(10, -1, 0.5)) == '_w0.5'
  assert samples.conditioning_tag(guidance.Conditioning(10, 3, 2.0)) == '_w2_y3'


def test_chunks_are_cached_and_truncated_and_labels_are_passed():
  config = config_lib.digits_config()
  config.diffusion.num_timesteps, config.sampling.num_steps = 10, 2
  config.model.num_classes = 3
  s = make_schedule('linear', 10)
  seen = []

  def apply_fn(params, x, t, y):
    jax.debug.callback(lambda y: seen.append(np.asarray(y).copy()), y)
    return params['w'] * x + 0.0 * y[:, None, None, None]

  spec, cond = settings.sampler_spec(config), settings.conditioning(config)
  cache = {}
  kw = dict(image_shape=(8, 8, 1), batch_size=4, progress=False, cache=cache)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  images, got = samples.generate_labeled_samples(spec, cond, s, apply_fn, {'w': jnp.float32(0.1)},
                                                 jax.random.PRNGKey(0), 6, labels=labels, **kw)
  assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(got, labels)
  assert len(cache) == 1
  again, _ = samples.generate_labeled_samples(spec, cond, s, apply_fn, {'w': jnp.float32(0.1)},
                                              jax.random.PRNGKey(0), 6, labels=labels, **kw)
  np.testing.assert_array_equal(images, again)
  assert len(cache) == 1   # the same compiled sampler
  # chunk 2 is padded with its last label; the model saw the asked-for labels
  assert [list(y[:4]) for y in seen[:1]] == [[0, 1, 2, 0]]
