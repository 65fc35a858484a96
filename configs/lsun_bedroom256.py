"""LSUN Bedroom 256x256 (the 114M "small" model) (Ho et al. 2020, appendix B).

Reference: hojonathanho/diffusion scripts/run_lsun.py (model
'unet2d16b2c112244', "114M for block_size=1"). Every value below is the
paper's unless marked otherwise.
The paper also trained a ~256M-parameter bedroom model "by increasing filter
count" (1.15M steps); its width is not given, so it is not reproduced here.
Flips: off, as the paper says (App. B); note that the reference run_lsun.py
docstring launches bedroom with the default --randflip 1 (and cat with 0).
"""

from diffusion_jax import config_lib


def get_config():
  """Returns the paper's LSUN Bedroom 256x256 configuration."""
  config = config_lib.base_config()

  data = config.data
  data.name = 'lsun/bedroom'          # App. B: LSUN "prepared using code from StyleGAN"; TFDS here
  data.image_size = 256               # App. B: 256x256 models
  data.num_channels = 3
  data.random_flip = False            # App. B: flips for all datasets "except LSUN Bedroom"
  data.train_split = 'train'
  data.eval_split = 'validation'      # TFDS LSUN: train / validation

  model = config.model
  model.name = 'unet'
  model.ch = 128                      # reference scripts/run_lsun.py: ch=128
  model.ch_mult = (1, 1, 2, 2, 4, 4)  # App. B: six resolutions, 256x256 to 8x8
  model.num_res_blocks = 2            # App. B: "two convolutional residual blocks per resolution level"
  model.attn_resolutions = (16,)      # App. B: "self-attention blocks at the 16x16 resolution"
  model.dropout = 0.0                 # App. B: "dropout rate on the other datasets to zero"
  model.resamp_with_conv = True       # reference unet.py default
  model.num_groups = 32               # App. B: group normalization (32 groups, reference)
  model.dtype = 'float32'             # not in the paper (TPU v3 float32); bfloat16 is an option
  # -> 113,673,219 parameters (App. B: "114 million").

  diffusion = config.diffusion
  diffusion.schedule = 'linear'       # App. B / Sec. 4: linear schedule
  diffusion.num_timesteps = 1000      # Sec. 4: T = 1000
  diffusion.beta_start = 1e-4         # Sec. 4: beta_1 = 1e-4
  diffusion.beta_end = 0.02           # Sec. 4: beta_T = 0.02
  diffusion.mean_type = 'eps'         # Sec. 3.2: epsilon prediction
  diffusion.var_type = 'fixed_large'  # Sec. 3.2: sigma_t^2 = beta_t
  diffusion.loss_type = 'simple'      # Sec. 3.4: L_simple (reference loss_type='noisepred')

  optim = config.optim
  optim.optimizer = 'adam'            # App. B: Adam "with standard hyperparameters"
  optim.lr = 2e-5                     # App. B: lowered to 2e-5 for 256x256 images
  optim.b1 = 0.9                      # Adam defaults (App. B)
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.warmup_steps = 5000           # reference scripts/run_lsun.py: warmup=5000
  optim.grad_clip = 1.0               # reference scripts/run_lsun.py: grad_clip=1.
  optim.ema_decay = 0.9999            # App. B: EMA decay 0.9999

  training = config.training
  training.batch_size = 64            # App. B: batch size 64 for larger images
  training.num_train_steps = 2_400_000  # App. B: "LSUN Bedroom for 2.4M steps"

  config.sampling.batch_size = 128    # App. B: "sampling a batch of 128 images takes 300 seconds"
  config.eval.batch_size = 128        # not in the paper: fits 256x256 activations in memory
  config.eval.num_fid_samples = 50_000  # App. B: FID on 50000 samples (StyleGAN2 code)
  return config
