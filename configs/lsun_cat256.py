"""LSUN Cat 256x256 (Ho et al. 2020, appendix B): 1.8M steps.

Flips: the paper (App. B) says flips were used for every dataset except LSUN
Bedroom, so they are on here; note that the reference run_lsun.py docstring
launches cat with --randflip 0. Set data.random_flip=False to follow the code.
"""

from diffusion_jax import config_lib


def get_config():
  return config_lib.paper_256_config(
      'lsun/cat',
      random_flip=True,               # App. B (see the docstring)
      eval_split='validation',        # TFDS LSUN: train / validation
      num_train_steps=1_800_000)      # App. B: "LSUN Cat for 1.8M steps"
