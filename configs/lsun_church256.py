"""LSUN Church (outdoor) 256x256 (Ho et al. 2020, appendix B): 1.2M steps.

Dropout: the paper sets it to 0 for every dataset but CIFAR-10, and the
reference run_lsun.py trains church with its default dropout=0.0.
"""

from diffusion_jax import config_lib


def get_config():
  return config_lib.paper_256_config(
      'lsun/church_outdoor',          # App. B: LSUN "prepared using code from StyleGAN"; TFDS here
      random_flip=True,               # App. B: flips for all datasets except LSUN Bedroom
      eval_split='validation',        # TFDS LSUN: train / validation
      num_train_steps=1_200_000)      # App. B: "LSUN Church for 1.2M steps"
