"""The configuration schema shared by every file in ``configs/``.

Each ``configs/<name>.py`` calls :func:`base_config` and overrides what its
experiment changes, so every config has the same sections (``data``, ``model``,
``diffusion``, ``optim``, ``training``, ``sampling``, ``eval``) and the same keys.
The digits config is embedded here too (:func:`digits_config`) so that
``python -m diffusion_jax.main`` works from any directory with no ``--config``.
"""

import ml_collections

# The workdir's saved config: completion and overrides (their own module, named here).
from diffusion_jax.config_overrides import FROZEN_KEYS, apply_overrides, complete  # pylint: disable=unused-import


LR_DECAYS = ('none', 'cosine')
# diffusion.loss_weighting: 'none' is diffusion.training_losses' weighting=None.
LOSS_WEIGHTINGS = ('none', 'min_snr')


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the DDPM paper's CIFAR-10 settings (Ho et al. 2020, App. B)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- data -----------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = 'cifar10'          # digits | mnist | cifar10 | celeb_a_hq | lsun/<category> | image_folder
  data.image_size = 32
  data.num_channels = 3
  data.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir or image folder
  data.random_flip = True        # random horizontal flips (paper: CIFAR-10, CelebA-HQ, LSUN)
  data.train_split = 'train'
  data.eval_split = 'test'
  data.num_workers = 0           # grain worker processes (0: in the main process)

  # --- model (the DDPM U-Net) -------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.num_groups = 32          # GroupNorm groups
  model.dtype = 'float32'        # compute dtype: float32 | bfloat16 (params stay float32)
  model.remat = False            # jax.checkpoint around each residual block (less memory, ~1/3 more FLOPs)
  model.conv_impl = 'auto'       # auto (matmul form for tiny layers on CPU) | xla | matmul
  model.attention_impl = 'auto'  # auto (cuDNN flash attention on GPU where supported) | xla | cudnn
  model.num_classes = 0          # > 0: class-conditional (label embedding + a "no label" token)
  model.class_dropout = 0.0      # training: probability of replacing a label by "no label" (CFG)

  # --- diffusion ------------------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'linear'
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.mean_type = 'eps'    # eps | x0 | v
  diffusion.var_type = 'fixed_large'   # fixed_small | fixed_large | learned_range
  diffusion.loss_type = 'simple'       # simple | vlb | hybrid
  diffusion.hybrid_lambda = 0.001
  # Weight of each example's mean-squared error: none (L_simple, eq. 14) |
  # min_snr (Hang et al. 2023: x_0-space weight min(SNR, gamma)).
  diffusion.loss_weighting = 'none'
  diffusion.min_snr_gamma = 5.0
  diffusion.t_sampler = 'uniform'      # uniform | importance (for vlb)
  diffusion.clip_denoised = True

  # --- optimiser ------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'adam'
  optim.lr = 2e-4
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup_steps = 5000
  optim.lr_decay = 'none'        # after the warm-up: none (paper) | cosine (to 0 at the last step)
  optim.grad_clip = 1.0
  optim.ema_decay = 0.9999
  optim.ema_warmup = False       # decay min(ema_decay, (1+n)/(10+n)); the paper uses none

  # --- training loop --------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128      # global batch over all hosts and devices
  training.num_train_steps = 800_000
  training.steps_per_call = 1    # train steps fused into one jitted call (lax.scan)
  training.log_every_steps = 100
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  training.sample_every_steps = 50_000
  training.num_sample_images = 64    # images in the periodic PNG grid
  training.distributed = False   # call jax.distributed.initialize() (multi-host)
  training.claim_timeout_s = 600.0   # s: another host's claim on the workdir not renewed this long is taken over (claim.py)
  training.cpu_devices = 0       # CPU only: JAX devices the cores are split into (0: one per core dividing the batch; -1: leave JAX's default)
  training.cpu_malloc = 'reuse'  # CPU CLI: glibc keeps the step's buffers (reuse) | default
  training.cpu_op_threads = 'device'  # CPU CLI, a device per core: ops on its own thread | pool
  training.flat_state = 'auto'   # optimiser, EMA on flat vectors in the loop: auto (CPU) | on | off

  # --- sampling -------------------------------------------------------------
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = 'ancestral'  # ancestral | ddim | pc | dpm_solver | ode
  sampling.num_steps = 1000       # ddim / pc / dpm_solver: number of steps (model calls); ancestral: ignored (ancestral_steps)
  sampling.ancestral_steps = 0     # ancestral: 0 = all T steps; n < T = respaced to n steps (iDDPM §4)
  sampling.solver_order = 2       # dpm_solver: DPM-Solver++ multistep order, 1..3 (1 = DDIM, eta 0)
  sampling.ode_rtol = 1e-5        # ode: probability-flow ODE tolerances (diffrax, adaptive step)
  sampling.ode_atol = 1e-5
  sampling.eta = 0.0              # ddim stochasticity
  sampling.skip_type = 'uniform'  # ddim / dpm_solver grid: uniform | quadratic | trailing (ends at T-1)
  sampling.num_samples = 64
  sampling.batch_size = 256       # per sampling call (global)
  sampling.pc_snr = 0.16          # Langevin corrector signal-to-noise ratio
  sampling.pc_corrector_steps = 1
  sampling.use_ema = True
  sampling.class_label = -1       # conditional models: -1 uniform random labels, k: all k
  sampling.guidance_scale = 0.0   # classifier-free guidance w: (1+w) eps(x,y) - w eps(x,none)

  # --- evaluation -----------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 256
  ev.num_bpd_examples = 1000      # test images for the bits/dim bound (-1: all)
  ev.num_ode_bpd_examples = 64    # part ode_bpd: test images under the probability-flow ODE (-1: all)
  ev.ode_bpd_exact_trace = False  # part ode_bpd: exact Jacobian trace (D JVPs per call) instead of Hutchinson
  ev.num_fid_samples = 1000
  ev.inception_path = ml_collections.FieldReference(None, field_type=str)  # local .npz/.msgpack weights
  ev.fid_stats_path = ml_collections.FieldReference(None, field_type=str)  # reference mu/sigma .npz
  ev.classifier_steps = 2000      # digits classifier for the offline Frechet distance
  ev.classifier_batch_size = 128  # its training batch
  ev.parts = 'bpd,rd,figures,fid,classifier'   # --mode eval parts (diffusion_jax/evaluation/evaluate.py)
  ev.sample_sets = 'ancestral,ddim50'  # samplers for FID / classifier metrics: ancestral, ddim<N>, pc<N>
  ev.num_fid_reference = -1       # train images for the reference FID statistics (-1: all)
  ev.guidance_scales = '0,0.5,1,2,3'  # part 'guidance': w of the fidelity/diversity curve
  ev.nfe_calls = '5,10,20,50,100'  # part 'nfe_curve': model-call budgets of ddim / dpm_solver2,3 / ancestral
  ev.nfe_ode_rtols = '1e-3,1e-5'   # part 'nfe_curve': probability-flow ODE tolerances

  # --- controllable generation (--mode inpaint / --mode edit) ---------------
  config.inpaint = inpaint = ml_collections.ConfigDict()
  inpaint.missing = 'bottom_half'  # bottom_half | top_half | left_half | right_half | center | random | mask
  inpaint.random_fraction = 0.5   # missing=random: fraction of pixels missing
  inpaint.mask_path = ''          # a mask image (white = known), used when missing=mask
  inpaint.num_images = 100
  inpaint.split = 'test'
  inpaint.method = 'repaint'      # repaint (Lugmayr et al. 2022) | replace (score_sde's baseline)
  inpaint.resample = 30           # repaint: resamplings per jump (docs/editing.md: 30 keeps 75.5% of digit classes)
  inpaint.jump_length = 5         # repaint: steps per jump back
  inpaint.num_steps = 50          # the walk on min(this, T) evenly spaced timesteps (0: all T)
  inpaint.eta = -1.0              # -1: the ancestral step (RePaint); >= 0: DDIM steps with this eta
  inpaint.input = ''              # your own images: a folder of images or an .npz with 'images' (else the split)
  config.edit = edit = ml_collections.ConfigDict()
  edit.strength = 0.15            # SDEdit: t0 = strength * T, in (0, 1]
  edit.num_images = 100
  edit.split = 'test'
  edit.input = ''                 # your own images: a folder of images or an .npz with 'images' (else the split)

  # --- progressive distillation (--mode distill; Salimans & Ho 2022) ---------
  config.distill = distill = ml_collections.ConfigDict()
  distill.start_steps = 32        # the teacher's steps (trailing grid); a power of two
  distill.final_steps = 1         # the last student's steps; a power of two <= start_steps
  distill.teacher_steps = 2       # teacher DDIM steps per student step (2: halving, the paper)
  distill.teacher = 'original'    # original (the workdir's model) | previous (the paper)
  distill.steps_per_round = 600   # optimiser steps per halving
  distill.student_mean_type = 'v'  # x0 | v (eps cannot give x_0 at the first step)
  distill.lr = 5e-4               # Adam (half the digits teacher's rate); annealed within each round
  distill.lr_decay = 'cosine'     # none | cosine (to 0 at the end of each round)
  distill.warmup_steps = 0
  distill.ema_decay = 0.995       # EMA of the student (with optim.ema_warmup's ramp)
  distill.loss_weighting = 'landing'  # landing (z_t'' error) | truncated_snr (the paper)
  distill.inputs = 'teacher_paths'  # teacher_paths (stored paths) | data (noised images, the paper)
  distill.num_paths = 16384       # teacher_paths: the original model's paths, made once per workdir
  distill.path_chunk = 512        # teacher_paths: paths made (and saved) per jitted call
  distill.path_solver_order = 3   # teacher_paths: 3, 2 DPM-Solver++ 3M, 2M | 1 DDIM (eta 0)
  distill.student_eta = 0.3       # the students' sampling.eta (trained at 0; 0.3 samples better)
  return config


def paper_256_config(data_name: str, *, random_flip: bool, eval_split: str,
                     num_train_steps: int) -> ml_collections.ConfigDict:
  """The DDPM paper's 256x256 setting (CelebA-HQ, LSUN; Ho et al. 2020, App. B).

  Reference: hojonathanho/diffusion scripts/run_lsun.py and run_celebahq.py
  (model 'unet2d16b2c112244', "114M for block_size=1"). Only the data set,
  flips, evaluation split and training length differ between the four configs.
  """
  config = base_config()
  data = config.data
  data.name = data_name
  data.image_size = 256               # App. B: 256x256 models
  data.num_channels = 3
  data.random_flip = random_flip      # App. B: flips for all datasets except LSUN Bedroom
  data.train_split = 'train'
  data.eval_split = eval_split

  model = config.model
  model.name = 'unet'
  model.ch = 128                      # reference run_lsun.py / run_celebahq.py: ch=128
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
  optim.warmup_steps = 5000           # reference run_lsun.py / run_celebahq.py: warmup=5000
  optim.grad_clip = 1.0               # reference run_lsun.py / run_celebahq.py: grad_clip=1.
  optim.ema_decay = 0.9999            # App. B: EMA decay 0.9999

  training = config.training
  training.batch_size = 64            # App. B: batch size 64 for larger images

  config.sampling.batch_size = 128    # App. B: "sampling a batch of 128 images takes 300 seconds"
  config.eval.batch_size = 128        # not in the paper: fits 256x256 activations in memory
  config.eval.num_fid_samples = 50_000  # App. B: FID on 50000 samples (LSUN, StyleGAN2 code)
  config.training.num_train_steps = num_train_steps
  return config


def digits_config() -> ml_collections.ConfigDict:
  """The embedded default: scikit-learn's 8x8 digits, trains on a CPU in minutes."""
  config = base_config()
  config.data.name = 'digits'
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = False   # digits are not mirror-symmetric
  config.data.train_split = 'train'
  config.data.eval_split = 'test'

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995
  config.optim.ema_warmup = True

  config.training.batch_size = 128
  config.training.num_train_steps = 1500
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 750
  config.training.num_sample_images = 100

  config.sampling.sampler = 'ddim'   # fast grids during training; eval also runs ancestral
  config.sampling.num_steps = 100
  config.sampling.num_samples = 100
  config.eval.num_bpd_examples = -1
  config.eval.batch_size = 500
  return config


def unknown_key_message(config, dotted: str):
  """None if ``dotted`` (e.g. ``'training.batch_size'``) is a field of ``config``, else why not.

  The message names the key and lists the keys allowed where it went wrong.
  """
  node, parts = config, dotted.split('.')
  for i, part in enumerate(parts):
    where = '.'.join(parts[:i])
    if not isinstance(node, ml_collections.ConfigDict):
      return f'config key {dotted!r}: {where!r} is a value, not a section.'
    if part not in node:
      return (f'unknown config key {dotted!r}; {where or "the config"} has: '
              f'{", ".join(sorted(node.keys()))}.')
    node = node[part]
  return None


def _allowed(field, value, allowed):
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is not supported; allowed values: '
                     f'{", ".join(map(str, allowed))}.')


def _positive(field, value, *, allow_zero=False):
  ok = value >= 0 if allow_zero else value > 0
  if isinstance(value, bool) or not ok:
    raise ValueError(f'{field} must be {"non-negative" if allow_zero else "positive"}, got {value!r}.')


def validate_config(config) -> None:
  """Checks the non-data sections of a config; raises ValueError naming the field.

  (The data section is checked by ``data.validate_data_config``, the model by
  ``models.create_model``.)
  """
  # Imported here: config files import this module and should stay light.
  from diffusion_jax import diffusion, flat_state, host, schedule, timesteps
  d = config.diffusion
  _allowed('diffusion.schedule', d.schedule, schedule.SCHEDULES)
  _positive('diffusion.num_timesteps', d.num_timesteps)
  _allowed('diffusion.mean_type', d.mean_type, diffusion.MEAN_TYPES)
  _allowed('diffusion.var_type', d.var_type, diffusion.VAR_TYPES)
  _allowed('diffusion.loss_type', d.loss_type, diffusion.LOSS_TYPES)
  _allowed('diffusion.t_sampler', d.t_sampler, ('uniform', 'importance'))
  _allowed('diffusion.loss_weighting', d.loss_weighting, LOSS_WEIGHTINGS)
  _positive('diffusion.min_snr_gamma', d.min_snr_gamma)
  if d.t_sampler == 'importance' and d.loss_type != 'vlb':
    raise ValueError("diffusion.t_sampler='importance' is for diffusion.loss_type='vlb' only "
                     f'(got loss_type={d.loss_type!r}).')
  o = config.optim
  _allowed('optim.optimizer', o.optimizer, ('adam', 'adamw'))
  _positive('optim.lr', o.lr)
  _positive('optim.warmup_steps', o.warmup_steps, allow_zero=True)
  _allowed('optim.lr_decay', o.lr_decay, LR_DECAYS)
  _positive('optim.grad_clip', o.grad_clip, allow_zero=True)
  if not 0.0 <= o.ema_decay < 1.0:
    raise ValueError(f'optim.ema_decay must be in [0, 1), got {o.ema_decay!r}.')
  tr = config.training
  for key in ('batch_size', 'num_train_steps', 'steps_per_call', 'log_every_steps',
              'checkpoint_every_steps', 'keep_checkpoints', 'sample_every_steps'):
    _positive(f'training.{key}', tr[key])
  _positive('training.claim_timeout_s', tr.claim_timeout_s)
  _allowed('training.cpu_malloc', tr.cpu_malloc, host.CPU_MALLOCS)
  _allowed('training.cpu_op_threads', tr.cpu_op_threads, host.CPU_OP_THREADS)
  _allowed('training.flat_state', tr.flat_state, flat_state.FLAT_STATES)
  for key in ('log_every_steps', 'checkpoint_every_steps', 'sample_every_steps'):
    if tr[key] % tr.steps_per_call:
      raise ValueError(f'training.{key}={tr[key]} must be a multiple of '
                       f'training.steps_per_call={tr.steps_per_call}.')
  validate_conditioning(config)
  sp = config.sampling
  _allowed('sampling.sampler', sp.sampler, ('ancestral', 'ddim', 'pc', 'dpm_solver', 'ode'))
  _allowed('sampling.solver_order', sp.solver_order, (1, 2, 3))
  if not 0 <= sp.ancestral_steps <= d.num_timesteps:
    raise ValueError(f'sampling.ancestral_steps must be in [0, diffusion.num_timesteps='
                     f'{d.num_timesteps}] (0: all steps), got {sp.ancestral_steps}.')
  _positive('sampling.ode_rtol', sp.ode_rtol)
  _positive('sampling.ode_atol', sp.ode_atol)
  _allowed('sampling.skip_type', sp.skip_type, timesteps.SKIP_TYPES)
  _positive('sampling.num_samples', sp.num_samples)
  if sp.sampler != 'ancestral' and not 1 <= sp.num_steps <= d.num_timesteps:
    raise ValueError(f'sampling.num_steps must be in [1, diffusion.num_timesteps={d.num_timesteps}], '
                     f'got {sp.num_steps}.')
  validate_editing(config)


DISTILL_MEAN_TYPES = ('x0', 'v')
DISTILL_TEACHERS = ('previous', 'original')
DISTILL_WEIGHTINGS = ('truncated_snr', 'landing')   # diffusion_jax.distillation.LOSS_WEIGHTINGS
DISTILL_INPUTS = ('data', 'teacher_paths')


def validate_distill(config) -> None:
  """Checks the ``distill`` section (``--mode distill``); raises ValueError naming the field."""
  ds = config.distill
  for key in ('start_steps', 'final_steps'):
    n = ds[key]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
      raise ValueError(f'distill.{key} must be a power of two (1, 2, 4, ...), got {n!r}.')
  k = ds.teacher_steps
  if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k & (k - 1):
    raise ValueError(f'distill.teacher_steps must be a power of two >= 2 (2, 4, 8, ...), got {k!r}.')
  if ds.final_steps >= ds.start_steps:
    raise ValueError(f'distill.final_steps={ds.final_steps} must be smaller than '
                     f'distill.start_steps={ds.start_steps} (each round divides the steps '
                     f'by distill.teacher_steps={k}).')
  ratio_log2 = (ds.start_steps // ds.final_steps).bit_length() - 1   # log2(start / final)
  if ratio_log2 % (k.bit_length() - 1):
    raise ValueError(f'distill.start_steps={ds.start_steps} / distill.final_steps='
                     f'{ds.final_steps} must be a power of distill.teacher_steps={k} '
                     f'(each round divides the steps by {k}).')
  if ds.start_steps > config.diffusion.num_timesteps:
    raise ValueError(f'distill.start_steps={ds.start_steps} must be <= '
                     f'diffusion.num_timesteps={config.diffusion.num_timesteps}.')
  _allowed('distill.student_mean_type', ds.student_mean_type, DISTILL_MEAN_TYPES)
  _allowed('distill.teacher', ds.teacher, DISTILL_TEACHERS)
  _allowed('distill.loss_weighting', ds.loss_weighting, DISTILL_WEIGHTINGS)
  _allowed('distill.inputs', ds.inputs, DISTILL_INPUTS)
  if ds.inputs == 'teacher_paths':
    if ds.teacher != 'original':
      raise ValueError(f"distill.inputs='teacher_paths' needs distill.teacher='original' (the "
                       f"stored paths are the original model's), got {ds.teacher!r}.")
    for key in ('num_paths', 'path_chunk'):
      _positive(f'distill.{key}', ds[key])
    _allowed('distill.path_solver_order', ds.path_solver_order, (1, 2, 3))
    if ds.num_paths % ds.path_chunk:
      raise ValueError(f'distill.num_paths={ds.num_paths} must be a multiple of '
                       f'distill.path_chunk={ds.path_chunk}.')
  _allowed('distill.lr_decay', ds.lr_decay, LR_DECAYS)
  for key in ('steps_per_round', 'lr'):
    _positive(f'distill.{key}', ds[key])
  _positive('distill.warmup_steps', ds.warmup_steps, allow_zero=True)
  if not 0.0 <= ds.ema_decay < 1.0:
    raise ValueError(f'distill.ema_decay must be in [0, 1), got {ds.ema_decay!r}.')
  if isinstance(ds.student_eta, bool) or not 0.0 <= ds.student_eta <= 1.0:
    raise ValueError(f'distill.student_eta must be in [0, 1], got {ds.student_eta!r}.')


# The values of inpaint.missing / inpaint.method (diffusion_jax.editing).
INPAINT_MISSING = ('bottom_half', 'top_half', 'left_half', 'right_half', 'center', 'random', 'mask')
INPAINT_METHODS = ('repaint', 'replace')


def validate_editing(config) -> None:
  """Checks the ``inpaint`` and ``edit`` sections (where a config has them)."""
  if 'inpaint' in config:
    ip = config.inpaint
    _allowed('inpaint.missing', ip.missing, INPAINT_MISSING)
    _allowed('inpaint.method', ip.method, INPAINT_METHODS)
    f = ip.random_fraction
    if isinstance(f, bool) or not 0.0 < f < 1.0:
      raise ValueError(f'inpaint.random_fraction must be in (0, 1), got {f!r}.')
    if ip.missing == 'mask' and not ip.mask_path:
      raise ValueError("inpaint.missing='mask' needs inpaint.mask_path (a mask image, white = "
                       'known).')
    for key in ('num_images', 'resample', 'jump_length'):
      _positive(f'inpaint.{key}', ip[key])
    _positive('inpaint.num_steps', ip.num_steps, allow_zero=True)
    eta = ip.eta
    if isinstance(eta, bool) or not (eta == -1 or eta >= 0):
      raise ValueError(f'inpaint.eta must be -1 (the ancestral step) or >= 0 (DDIM), got {eta!r}.')
  if 'edit' in config:
    s = config.edit.strength
    if isinstance(s, bool) or not 0.0 < s <= 1.0:
      raise ValueError(f'edit.strength must be in (0, 1] (t0 = strength x T), got {s!r}.')
    _positive('edit.num_images', config.edit.num_images)


def validate_conditioning(config) -> None:
  """Checks ``model.num_classes``, ``model.class_dropout``, ``sampling.class_label`` / ``guidance_scale``."""
  m, sp = config.model, config.sampling
  k = m.num_classes
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f'model.num_classes must be an integer >= 0 (0: unconditional), got {k!r}.')
  p = m.class_dropout
  if isinstance(p, bool) or not 0.0 <= p < 1.0:
    raise ValueError(f'model.class_dropout must be in [0, 1), got {p!r}.')
  label = sp.class_label
  if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < max(k, 1):
    allowed = f'-1 (uniform) or 0..{k - 1}' if k else '-1 (the model is unconditional)'
    raise ValueError(f'sampling.class_label={label!r} is not supported; allowed values: {allowed}.')
  w = sp.guidance_scale
  if isinstance(w, bool) or not w >= 0:
    raise ValueError(f'sampling.guidance_scale must be >= 0, got {w!r}.')
  if w > 0 and not k:
    raise ValueError(f'sampling.guidance_scale={w} needs a class-conditional model '
                     '(model.num_classes > 0); use 0.')

