"""LSUN Bedroom 256x256, the 114M model (Ho et al. 2020, appendix B): 2.4M steps.

The paper also trained a ~256M-parameter bedroom model "by increasing filter
count" (1.15M steps); its width is not given, so it is not reproduced here.
Flips: off, as the paper says (App. B); note that the reference run_lsun.py
docstring launches bedroom with the default --randflip 1 (and cat with 0).
"""

from diffusion_jax import config_lib


def get_config():
  return config_lib.paper_256_config(
      'lsun/bedroom',
      random_flip=False,              # App. B: flips for all datasets "except LSUN Bedroom"
      eval_split='validation',        # TFDS LSUN: train / validation
      num_train_steps=2_400_000)      # App. B: "LSUN Bedroom for 2.4M steps"
