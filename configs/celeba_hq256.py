"""CelebA-HQ 256x256 (Ho et al. 2020, appendix B): 0.5M steps.

The paper reports no CelebA-HQ FID; eval.num_fid_samples follows LSUN's protocol.
"""

from diffusion_jax import config_lib


def get_config():
  return config_lib.paper_256_config(
      'celeb_a_hq',                   # App. B: TFDS celeb_a_hq/256 ("as provided by TensorFlow Datasets")
      random_flip=True,               # App. B: flips for all datasets except LSUN Bedroom
      eval_split='train',             # TFDS celeb_a_hq has only a train split
      num_train_steps=500_000)        # App. B: "CelebA-HQ for 0.5M steps"
