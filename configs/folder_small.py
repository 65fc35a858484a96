"""A folder of your own images at 16x16 RGB: a small DDPM that trains on a CPU (not in the paper).

Point it at any folder of PNG/JPEG files (``--config.data.data_dir``; one
sub-folder per class gives labels, but this config is unconditional). Images
are center-cropped and resized to 16x16. The model is the digits config's
U-Net (``ch=32``, ``ch_mult=(1, 2, 2)``: resolutions 16, 8, 4, one residual
block per level, attention at 4x4, no dropout) with 3 channels in and out,
and the digits recipe (Adam 1e-3 after 200 warm-up steps, EMA 0.995 with
warm-up) at batch 64 for 2,000 steps. The periodic grids use DDIM with 50
steps. The paper's diffusion is kept: T = 1000, linear betas 1e-4..0.02,
epsilon prediction, L_simple. 1,113,955 parameters. Measured on 2 CPU cores
shared with other jobs (load average about 6): 0.63 s per step (102
images/s), plus about a minute of start-up and compilation (a 100-step run
took 124 s), so the 2,000 steps take about 20 minutes there.

For the paper's 32x32 model use ``configs/cifar10.py`` (35.7M parameters,
800k steps): that needs a GPU or TPU.
"""

from diffusion_jax import config_lib


def get_config():
  """Returns the small image-folder configuration."""
  config = config_lib.digits_config()   # the digits U-Net, recipe and diffusion

  data = config.data
  data.name = 'image_folder'          # every PNG/JPEG under data.data_dir
  data.image_size = 16                # CPU-sized (cifar10.py: 32)
  data.num_channels = 3
  data.random_flip = True             # as the paper's natural-image data sets
  data.train_split = 'train'          # a flat folder: every split is the whole folder
  data.eval_split = 'test'

  model = config.model
  model.ch_mult = (1, 2, 2)           # 16 -> 8 -> 4
  model.attn_resolutions = (4,)       # the last level, as the digits model

  training = config.training
  training.batch_size = 64            # CPU-sized (cifar10.py: 128)
  training.num_train_steps = 2_000   # CPU-sized (cifar10.py: 800k)
  training.log_every_steps = 50
  training.checkpoint_every_steps = 500
  training.sample_every_steps = 1_000
  training.num_sample_images = 64     # an 8x8 grid

  sampling = config.sampling
  sampling.sampler = 'ddim'           # fast grids on a CPU; --mode eval also runs ancestral
  sampling.num_steps = 50
  sampling.num_samples = 64
  config.eval.num_bpd_examples = 1000
  config.eval.batch_size = 256
  return config
