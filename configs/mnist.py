"""MNIST 28x28: a small DDPM that trains on a CPU (not in the paper).

The paper did not train on MNIST. This config keeps the paper's diffusion
(T=1000, linear betas 1e-4..0.02, epsilon prediction, L_simple) and shrinks
the CIFAR-10 U-Net to 1.1M parameters (~155 GFLOP per training step at batch
128; measured ~7 s/step on a busy 2-core CPU, so 10k steps take hours on a
multi-core CPU). Images are used at their native 28x28: ``ch_mult=(1, 2, 2)``
gives resolutions 28, 14, 7 (28 is divisible by 2**2), so no padding is
needed; attention sits at 14x14, the second level, as the paper's sits at
16x16 in a 32x32 model.
"""

from diffusion_jax import config_lib


def get_config():
  """Returns the MNIST configuration."""
  config = config_lib.base_config()

  data = config.data
  data.name = 'mnist'                 # TFDS mnist
  data.image_size = 28                # native size; no padding (see docstring)
  data.num_channels = 1
  data.random_flip = False            # digits are not mirror-symmetric
  data.train_split = 'train'
  data.eval_split = 'test'

  model = config.model
  model.name = 'unet'
  model.ch = 32                       # CPU-sized (paper: 128)
  model.ch_mult = (1, 2, 2)           # 28 -> 14 -> 7
  model.num_res_blocks = 1            # CPU-sized (paper: 2)
  model.attn_resolutions = (14,)      # second level, like the paper's 16 of 32
  model.dropout = 0.1                 # as the paper's CIFAR-10 (small dataset, overfits)
  model.resamp_with_conv = True
  model.num_groups = 32               # GroupNorm(32) as in the paper; needs ch % 32 == 0
  model.dtype = 'float32'

  diffusion = config.diffusion
  diffusion.schedule = 'linear'       # paper Sec. 4
  diffusion.num_timesteps = 1000      # paper Sec. 4: T = 1000
  diffusion.beta_start = 1e-4         # paper Sec. 4
  diffusion.beta_end = 0.02           # paper Sec. 4
  diffusion.mean_type = 'eps'
  diffusion.var_type = 'fixed_large'
  diffusion.loss_type = 'simple'

  optim = config.optim
  optim.lr = 5e-4                     # not from the paper: a small model tolerates more
  optim.warmup_steps = 1000           # not from the paper
  optim.grad_clip = 1.0               # as the paper's reference code
  optim.ema_decay = 0.9995            # not from the paper: shorter run than 0.9999 suits

  training = config.training
  training.batch_size = 128           # as the paper's CIFAR-10
  training.num_train_steps = 10_000   # not from the paper: CPU budget
  training.log_every_steps = 100
  training.checkpoint_every_steps = 1_000
  training.sample_every_steps = 5_000
  training.num_sample_images = 100    # a 10x10 grid

  config.sampling.num_samples = 100
  config.eval.num_bpd_examples = 1000
  config.eval.num_fid_samples = 1000
  return config
