"""CIFAR-10 32x32, the DDPM paper's main model (Ho et al. 2020, appendix B).

Reference: hojonathanho/diffusion scripts/run_cifar.py (model 'unet2d16b2',
35.7M parameters). Every value below is the paper's unless marked otherwise.
"""

from diffusion_jax import config_lib


def get_config():
  """Returns the paper's CIFAR-10 configuration."""
  config = config_lib.base_config()

  data = config.data
  data.name = 'cifar10'               # App. B: "loaded as provided by TensorFlow Datasets"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True             # App. B: flips "improve sample quality slightly"
  data.train_split = 'train'
  data.eval_split = 'test'            # Table 2: NLL on the test set

  model = config.model
  model.name = 'unet'
  model.ch = 128                      # reference run_cifar.py: ch=128
  model.ch_mult = (1, 2, 2, 2)        # App. B: four resolutions, 32x32 to 4x4
  model.num_res_blocks = 2            # App. B: "two convolutional residual blocks per resolution level"
  model.attn_resolutions = (16,)      # App. B: "self-attention blocks at the 16x16 resolution"
  model.dropout = 0.1                 # App. B: swept over {0.1, 0.2, 0.3, 0.4}
  model.resamp_with_conv = True       # reference unet.py default
  model.num_groups = 32               # App. B: group normalization (32 groups, reference)
  model.dtype = 'float32'             # not in the paper (TPU v3 float32); bfloat16 is an option
  # -> 35,746,307 parameters (App. B: "35.7 million").

  diffusion = config.diffusion
  diffusion.schedule = 'linear'       # App. B / Sec. 4: linear schedule
  diffusion.num_timesteps = 1000      # Sec. 4: T = 1000
  diffusion.beta_start = 1e-4         # Sec. 4: beta_1 = 1e-4
  diffusion.beta_end = 0.02           # Sec. 4: beta_T = 0.02
  diffusion.mean_type = 'eps'         # Sec. 3.2 / Table 2: epsilon prediction
  diffusion.var_type = 'fixed_large'  # Sec. 3.2: sigma_t^2 = beta_t (reference 'fixedlarge')
  diffusion.loss_type = 'simple'      # Sec. 3.4: L_simple (Algorithm 1)

  optim = config.optim
  optim.optimizer = 'adam'            # App. B: Adam "with standard hyperparameters"
  optim.lr = 2e-4                     # App. B: 2e-4 "without any sweeping"
  optim.b1 = 0.9                      # Adam defaults (App. B)
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.warmup_steps = 5000           # reference run_cifar.py: warmup=5000
  optim.grad_clip = 1.0               # reference run_cifar.py: grad_clip=1.
  optim.ema_decay = 0.9999            # App. B: EMA decay 0.9999

  training = config.training
  training.batch_size = 128           # App. B: batch size 128 for CIFAR10
  training.num_train_steps = 800_000  # App. B: "800k steps" (10.6 hours on a TPU v3-8)

  config.sampling.batch_size = 256    # App. B: "sampling a batch of 256 images takes 17 seconds"
  config.eval.num_fid_samples = 50_000  # App. B: Inception/FID on 50000 samples
  config.eval.num_bpd_examples = -1   # Table 2: NLL on the full test set
  return config
