"""Tests for diffusion_jax.evaluation.samples (sample sets; ``--mode sample`` runs in test_evaluate.py)."""

import pytest

from diffusion_jax.evaluation import samples


def test_sample_set_names():
  assert samples.parse_sample_sets('ancestral, ddim50,pc7', 1000) == [
      ('ancestral', 'ancestral', 1000), ('ddim50', 'ddim', 50), ('pc7', 'pc', 7)]
  assert samples.parse_sample_sets('ddim50', 20) == [('ddim20', 'ddim', 20)]   # clamped to T
  for bad in ('ddim', 'ancestral5', 'euler10'):
    with pytest.raises(ValueError, match='eval.sample_sets'):
      samples.parse_sample_sets(bad, 100)
