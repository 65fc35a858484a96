"""diffusion_jax: Denoising Diffusion Probabilistic Models in JAX/Flax.

``diffusion_jax.load(path)`` gives a :class:`Pipeline` of a trained workdir or a
diffusers folder (:mod:`diffusion_jax.pipeline`).
"""

__version__ = '0.1.0'
__all__ = ['load', 'Pipeline']


def __getattr__(name):
  """``load`` and ``Pipeline`` are imported on first use (``import diffusion_jax`` stays light)."""
  if name in ('load', 'Pipeline'):
    from diffusion_jax import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
