r"""Our train step and samplers against the same U-Net in PyTorch (diffusers), side by side.

    pip install -e '.[bench]'                                   # torch, diffusers
    python benchmarks/bench_peer.py                             # digits default, CPU
    python benchmarks/bench_peer.py --config configs/cifar10.py --batch 128   # on a GPU

The peer is diffusers' ``UNet2DModel`` built from the same config in the DDPM
layout (``interop.diffusers_unet_config``: ``downsample_padding=0``,
``freq_shift=1``, ``flip_sin_to_cos=False``, ``attention_head_dim=None``,
``norm_eps=1e-6``, attention at ``attn_resolutions``); the parameter counts are
asserted equal before anything is timed. Both sides do the same work per train
step: draw t and the noise, L_simple (eq. 14), backward, global-norm gradient
clipping, Adam, and the EMA update. Samplers: T-step ancestral (Algorithm 2;
the peer uses diffusers' ``DDPMScheduler``) and DDIM (eta = 0;
``DDIMScheduler``) for one batch.

Timing: ours is compiled first (the compile time is reported); then both sides
warm up, and the timed rounds alternate ours / peer so that both see the same
machine state. Reported: ms per step and images/s (median over rounds), and the
ratio ours/peer as a speed-up (>1: we are faster). The peer runs eager and
under ``torch.compile`` (inductor, on the CPU too; the first step, which
includes its compilation, is reported; ``--torch_compile off`` skips it). On a
GPU ours runs in bfloat16 and the peer under bf16 autocast.

The CPU ratio depends on the instruction set (oneDNN's AVX-512 kernels), so
the run prints and records what it ran on (``machine.py``): the CPU model, its
SIMD level (avx2 / avx512f / avx512_vnni / avx512_bf16 / amx) and flags,
torch's build (CPU or CUDA, oneDNN, the ATen CPU kernels) and threads, JAX's
devices and CPU device count, and the load average before and after.
``--isolate`` runs each side in its own process (``--worker``, driven over a
pipe) with the same alternating rounds, so that neither side's thread pools
share a process with the other's; the table is the same. With ``--isolate``
ours' process sets glibc ``malloc`` as the command line's training program
does (``training.cpu_malloc='reuse'``, ``host.configure_malloc``) and the
peer's keeps glibc's defaults, as each runs in practice. In one process the
default is ``--cpu_malloc default``: the setting is process-wide (an
earlier form of it, two arenas for all threads, slowed the peer's own
allocations about 1.3x on 2 AVX2 cores).
A table is printed and the figures are written as JSON (``--json``).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax import flat_state
from diffusion_jax import host
from diffusion_jax import interop
from diffusion_jax import models
from diffusion_jax import settings as settings_lib
from diffusion_jax import train

from bench_train import load_config   # benchmarks/ is on sys.path when run as a script
import machine

# Peak dense bfloat16 FLOP/s for MFU, by device name (vendor data sheets).
PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12}


# --- ours ---------------------------------------------------------------------------


class Ours:
  """The project's jitted train step and samplers for a config."""

  def __init__(self, config):
    self.config = config
    self.model, self.schedule, self.optimizer, mesh, self.state = train.setup(config)
    self.layout = None
    if flat_state.enabled(config, mesh):   # as the training loop keeps it (train.py)
      self.state, self.layout = flat_state.flatten(self.state, mesh)
    self.fn = train.make_train_fn(config, self.model, self.schedule, self.optimizer, mesh,
                                  unravel=self.unravel)
    shape = (1, config.training.batch_size) + train.image_shape(config)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    # Placed once, batch-sharded, as train.next_batches places each batch (the
    # peer's batch is likewise made once on its device): a single-device array
    # would be resharded in every call, and the devices would start apart.
    self.batch = data_lib.shard_batch({'image': x}, train.batch_sharding(mesh))
    self.params = models.count_params(self.state.params)

  @property
  def unravel(self):
    """The flat state's ``Layout.unravel`` for ``train.make_train_fn``; None for tree state."""
    return self.layout and self.layout.unravel

  def info(self) -> dict:
    """The parameter count and JAX's version and devices."""
    return dict(params=self.params, **machine.jax_info(jax))

  def compile(self) -> float:
    """Seconds to lower + compile the train step."""
    t0 = time.perf_counter()
    self.fn = self.fn.lower(self.state, self.batch).compile()
    return time.perf_counter() - t0

  def flops(self) -> float:
    """FLOPs of one train step on the global batch (XLA's count of the lowered step).

    Counted on the step as lowered for one device, before XLA optimises it:
    there every convolution is still an HLO convolution (the optimised GPU
    program hands them to cuDNN as custom calls, which its cost analysis does
    not count: on the H200 it gave 0.37 of the 4.52 TFLOP of the CIFAR-10
    step), and no part of it is a per-device ``shard_map`` body (counted once
    for one device's shard).
    """
    mesh = train.make_mesh(jax.devices()[:1])
    fn = train.make_train_fn(self.config, self.model, self.schedule, self.optimizer, mesh,
                             unravel=self.unravel)
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    cost = fn.lower(jax.tree.map(abstract, self.state),
                    jax.tree.map(abstract, self.batch)).cost_analysis()
    return float((cost or {}).get('flops', float('nan')))

  def train_steps(self, n: int) -> None:
    for _ in range(n):
      self.state, metrics = self.fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def sampler(self, name: str, steps: int, batch: int):
    """A compiled ``() -> images`` for 'ancestral' or 'ddim'; returns (fn, compile seconds)."""
    config = self.config.copy_and_resolve_references()
    config.sampling.sampler = name
    config.sampling.num_steps = steps
    config.sampling.eta = 0.0
    fn = settings_lib.make_sampler(config, self.schedule, self.model, batch_size=batch)
    ema = self.state.ema_params
    if self.layout is not None:
      ema = self.layout.params_tree(ema)
    variables, rng = {'params': ema}, jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    compiled = fn.lower(variables, rng).compile()
    seconds = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(variables, rng))), seconds


# --- the peer -----------------------------------------------------------------------


class Peer:
  """diffusers ``UNet2DModel`` (DDPM layout) trained and sampled the usual PyTorch way."""

  def __init__(self, config, device: str, autocast: bool, compile_model: bool):
    import diffusers
    import torch
    self.torch, self.config, self.device = torch, config, device
    torch.manual_seed(0)
    self.model = diffusers.UNet2DModel(**interop.diffusers_unet_config(config)).to(device)
    self.params = sum(p.numel() for p in self.model.parameters())
    self.net = torch.compile(self.model) if compile_model else self.model
    self.autocast = autocast
    o, d = config.optim, config.diffusion
    self.opt = torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                eps=o.eps)
    self.ema = [p.detach().clone() for p in self.model.parameters()]
    betas = np.linspace(d.beta_start, d.beta_end, d.num_timesteps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    self.sqrt_abar = torch.tensor(np.sqrt(abar), dtype=torch.float32, device=device)
    self.sqrt_1m_abar = torch.tensor(np.sqrt(1 - abar), dtype=torch.float32, device=device)
    tr = config.training
    shape = (tr.batch_size, config.data.num_channels, config.data.image_size,
             config.data.image_size)
    gen = torch.Generator().manual_seed(0)
    self.x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)

  def info(self) -> dict:
    """The parameter count and torch's version, build and threads."""
    return dict(params=self.params, **machine.torch_info(self.torch))

  def _ctx(self):
    if self.autocast:
      return self.torch.autocast(device_type=self.device.split(':')[0], dtype=self.torch.bfloat16)
    return self.torch.autocast(device_type='cpu', enabled=False)

  def _sync(self):
    if self.device.startswith('cuda'):
      self.torch.cuda.synchronize()

  def train_steps(self, n: int) -> None:
    torch, cfg = self.torch, self.config
    params = list(self.model.parameters())
    for _ in range(n):
      t = torch.randint(0, cfg.diffusion.num_timesteps, (self.x0.shape[0],), device=self.device)
      noise = torch.randn_like(self.x0)
      x_t = (self.sqrt_abar[t].view(-1, 1, 1, 1) * self.x0
             + self.sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise)
      with self._ctx():
        out = self.net(x_t, t).sample
      loss = torch.mean((out.float() - noise) ** 2)      # L_simple (eq. 14)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
      self.opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, [p.detach() for p in params],
                             1.0 - cfg.optim.ema_decay)
    self._sync()

  def sampler(self, name: str, steps: int, batch: int):
    """(``() -> images``, None) with diffusers' DDPMScheduler / DDIMScheduler (no compile step)."""
    import diffusers
    torch, cfg = self.torch, self.config
    d = cfg.diffusion
    kw = dict(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
              beta_end=d.beta_end, beta_schedule='linear', clip_sample=d.clip_denoised)
    if name == 'ancestral':
      sched = diffusers.DDPMScheduler(variance_type=d.var_type, **kw)
    else:
      sched = diffusers.DDIMScheduler(set_alpha_to_one=True, **kw)
    sched.set_timesteps(steps if name != 'ancestral' else d.num_timesteps)
    shape = (batch, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)

    @torch.no_grad()
    def run():
      gen = torch.Generator(device=self.device).manual_seed(1)
      x = torch.randn(shape, generator=gen, device=self.device)
      for t in sched.timesteps:
        with self._ctx():
          eps = self.net(x, t.to(self.device).expand(batch)).sample.float()
        x = sched.step(eps, t, x, generator=gen).prev_sample
      self._sync()
      return x
    return run, None


# --- timing -------------------------------------------------------------------------


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0


def alternate(ours_fn, peer_fn, rounds: int) -> tuple[list, list]:
  """Runs ours, peer, ours, peer, ... and returns both lists of seconds."""
  ours, peer = [], []
  for _ in range(rounds):
    ours.append(ours_fn())
    peer.append(peer_fn())
  return ours, peer


def row(task, unit_per_call, images_per_call, ours_s, peer_s, peer_name):
  o, p = statistics.median(ours_s), statistics.median(peer_s)
  return dict(task=task, peer=peer_name, ours_ms=o / unit_per_call * 1e3,
              peer_ms=p / unit_per_call * 1e3, ours_images_per_s=images_per_call / o,
              peer_images_per_s=images_per_call / p, speedup=p / o, rounds=len(ours_s),
              # the fastest rounds: on a shared machine, the least disturbed
              ours_min_ms=min(ours_s) / unit_per_call * 1e3,
              peer_min_ms=min(peer_s) / unit_per_call * 1e3)


def model_flops_utilisation(flops, results, device_kind):
  """(MFU of our first timed train row, the device's peak bf16 FLOP/s); None where unknown."""
  peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)
  train_rows = [r for r in results if r['task'] == 'train step']
  if not (peak and train_rows):
    return None, peak
  return flops / (train_rows[0]['ours_ms'] / 1e3) / peak, peak


def recount(path: str) -> None:
  """Recounts ``flops_per_step`` and ``mfu`` of a results JSON from its config.

  For JSON written before :meth:`Ours.flops` counted the lowered program (a GPU
  run's compiled count misses the cuDNN convolutions). Lowering is the same
  on any backend, so this runs anywhere; the timings are left as measured.
  """
  with open(path) as f:
    out = json.load(f)
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                    'configs', out['config'] + '.py'))
  config.training.batch_size = out['batch']
  config.model.dtype = out['dtype']
  config.model.conv_impl = out['conv_impl']
  config.model.dropout = 0.0
  flops = Ours(config).flops()
  mfu, _ = model_flops_utilisation(flops, out['results'], out['device'])
  print(f"{path}: {out['flops_per_step'] / 1e9:.1f} -> {flops / 1e9:.1f} GFLOP per step; "
        f"MFU {out['mfu']} -> {mfu}")
  out.update(flops_per_step=flops, mfu=mfu,
             flops_recounted_on=f'{jax.default_backend()} jax {jax.__version__}')
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)


# --- each side in its own process (--isolate) -----------------------------------------


class Remote:
  """A side (ours or one peer) in its own process, ``bench_peer.py ... --worker ROLE``.

  It has the methods of :class:`Ours` and :class:`Peer` that :func:`main` calls;
  each call is one JSON line to the worker's stdin and one back from its stdout
  (:func:`serve`), so the timing in :func:`main` is the same for both modes
  (the pipe adds well under a millisecond to a round of several hundred).
  Between calls the worker waits on its stdin, so its thread pools are idle
  while the other side runs.
  """

  def __init__(self, role: str, argv: list, backend: str | None = None):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--worker', role]
    if backend:
      cmd += ['--worker_backend', backend]
    self.role = role
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._info = self._call('info')
    self.params = self._info['params']

  def _call(self, method, *args):
    self.proc.stdin.write(json.dumps([method, *args]) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.role} worker exited ({self.proc.wait()})')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f"{self.role} worker: {reply['error']}")
    return reply['result']

  def info(self) -> dict:
    return self._info

  def compile(self) -> float:
    return self._call('compile')

  def flops(self) -> float:
    return self._call('flops')

  def train_steps(self, n: int) -> None:
    self._call('train_steps', n)

  def sampler(self, name: str, steps: int, batch: int):
    key, seconds = self._call('sampler', name, steps, batch)
    return (lambda: self._call('run_sampler', key)), seconds

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def serve(side) -> None:
  """The worker's loop: runs ``[method, *args]`` lines from stdin on ``side``, replies on stdout."""
  replies = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)     # anything else printed (warnings, compile logs) goes to stderr
  samplers = []
  for line in sys.stdin:
    method, *args = json.loads(line)
    try:
      if method == 'sampler':
        fn, seconds = side.sampler(*args)
        samplers.append(fn)
        result = [len(samplers) - 1, seconds]
      elif method == 'run_sampler':
        samplers[args[0]]()
        result = None
      else:
        result = getattr(side, method)(*args)
      reply = dict(result=result)
    except Exception as e:  # pylint: disable=broad-except
      reply = dict(error=f'{type(e).__name__}: {e}')
    replies.write(json.dumps(reply) + '\n')
    replies.flush()


# --- the run ------------------------------------------------------------------------


def settings(args, backend: str | None):
  """(config, name, dtype) from the arguments; ``backend=None``: this process runs ours.

  Ours' process sets the CPU device count before JAX starts and takes the
  backend from JAX; a peer's process (and the parent of ``--isolate``) is told
  it, and never starts JAX.
  """
  config = load_config(args.config)
  name = os.path.splitext(os.path.basename(args.config or 'digits.py'))[0]
  if args.batch:
    config.training.batch_size = args.batch
  if args.cpu_devices is not None:
    config.training.cpu_devices = args.cpu_devices
  config.training.cpu_malloc = args.cpu_malloc
  if backend is None:
    host.configure_cpu_devices(config)    # as `python -m diffusion_jax.main` does
    host.configure_malloc(config)         # likewise (the CPU only; in one process, the peer too)
    host.configure_cpu_op_threads(config)  # likewise (XLA's threads only)
    backend = jax.default_backend()
  dtype = args.dtype or ('bfloat16' if backend == 'gpu' else 'float32')
  config.model.dtype = dtype
  if args.conv_impl:
    config.model.conv_impl = args.conv_impl
  config.model.dropout = 0.0    # same work on both sides (diffusers' dropout is not the point)
  return config, name, dtype


def peer_label(compiled: bool, dtype: str) -> str:
  return 'diffusers' + (' + torch.compile' if compiled else '') + (
      ' (bf16 autocast)' if dtype == 'bfloat16' else '')


def make_peer(config, backend: str, dtype: str, compiled: bool) -> Peer:
  import torch
  device = 'cuda' if backend == 'gpu' and torch.cuda.is_available() else 'cpu'
  return Peer(config, device, dtype == 'bfloat16', compiled)


def worker(args) -> None:
  """``--worker ours|peer|peer_compiled``: builds that side and serves :class:`Remote`."""
  config, _, dtype = settings(args, None if args.worker == 'ours' else args.worker_backend)
  if args.worker == 'ours':
    side = Ours(config)
  else:
    side = make_peer(config, args.worker_backend, dtype, args.worker == 'peer_compiled')
  serve(side)


def print_table(results) -> None:
  print('\n| task | peer | ours ms/step | peer ms/step | ours images/s | peer images/s | '
        'ours/peer |\n|---|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['task']} | {r['peer']} | {r['ours_ms']:.2f} | {r['peer_ms']:.2f} | "
          f"{r['ours_images_per_s']:.0f} | {r['peer_images_per_s']:.0f} | "
          f"{r['speedup']:.2f}x |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default=None, help='configs/<name>.py (default: digits)')
  p.add_argument('--batch', type=int, default=None, help='train batch (default: the config\'s)')
  p.add_argument('--steps', type=int, default=5, help='train steps per timed round')
  p.add_argument('--rounds', type=int, default=5, help='alternating timed rounds')
  p.add_argument('--sample_batch', type=int, default=None,
                 help='images per sampler run (default: 64 on CPU, 256 on GPU)')
  p.add_argument('--samplers', default='ancestral,ddim100',
                 help='comma list of ancestral, ddim<N> ("" to skip)')
  p.add_argument('--sample_rounds', type=int, default=1)
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                 help='ours: model.dtype; peer: bf16 autocast (default: bfloat16 on GPU)')
  p.add_argument('--torch_compile', default='on', choices=('on', 'off'),
                 help='also time the peer under torch.compile (inductor, CPU or GPU); '
                      'its compilation takes minutes on a small CPU')
  p.add_argument('--isolate', action='store_true',
                 help='each side in its own process, alternating as in one process')
  p.add_argument('--conv_impl', default=None, help='override model.conv_impl (auto|xla|matmul)')
  p.add_argument('--cpu_devices', type=int, default=None,
                 help='override training.cpu_devices (0: one per core; -1: one device)')
  p.add_argument('--cpu_malloc', default=None, choices=('reuse', 'default'),
                 help="training.cpu_malloc of ours' process, set as the training program sets "
                      "it (default: reuse with --isolate; default without, since the peer "
                      'would share the setting, which slows it)')
  p.add_argument('--json', default=None, help='output JSON (default: benchmarks/results/...)')
  p.add_argument('--recount', default=None, metavar='JSON',
                 help='only recount flops_per_step and MFU of an earlier results JSON')
  p.add_argument('--worker', default=None, choices=('ours', 'peer', 'peer_compiled'),
                 help=argparse.SUPPRESS)
  p.add_argument('--worker_backend', default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.cpu_malloc is None:
    args.cpu_malloc = 'reuse' if args.isolate or args.worker else 'default'
  if args.recount:
    return recount(args.recount)
  if args.worker:
    return worker(args)

  load_before = os.getloadavg()
  cpu = machine.cpu_info()
  print(machine.describe(cpu), flush=True)
  print(f'load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} '
        f'(1/5/15 min) on {cpu["cores"]} cores', flush=True)
  compile_modes = [False, True] if args.torch_compile == 'on' else [False]
  if args.isolate:
    argv = [a for a in sys.argv[1:] if a != '--isolate']
    ours = Remote('ours', argv)
    backend = ours.info()['platform']
    config, name, dtype = settings(args, backend)
    peers = {peer_label(c, dtype): Remote('peer_compiled' if c else 'peer', argv, backend)
             for c in compile_modes}
  else:
    config, name, dtype = settings(args, None)
    backend = jax.default_backend()
    ours = Ours(config)
    peers = {peer_label(c, dtype): make_peer(config, backend, dtype, c) for c in compile_modes}
  env = {**cpu, **ours.info(), **next(iter(peers.values())).info()}
  env.pop('params')
  print(machine.describe(env) + f'; conv_impl={config.model.conv_impl}; '
        f'cpu_malloc={config.training.cpu_malloc}; config {name}, '
        f'batch {config.training.batch_size}, {dtype}; '
        + ('each side in its own process' if args.isolate else 'both sides in one process'),
        flush=True)
  for label, peer in peers.items():
    if peer.params != ours.params:
      raise SystemExit(f'parameter counts differ: ours {ours.params:,}, {label} '
                       f'{peer.params:,}')
  print(f'parameters: {ours.params:,} on both sides', flush=True)

  flops = ours.flops()
  compile_s = ours.compile()
  print(f'ours: train step compiled in {compile_s:.1f} s ({flops / 1e9:.1f} GFLOP per step)',
        flush=True)
  results, peer_first_step_s, failed = [], {}, {}
  n, b = args.steps, config.training.batch_size
  for label, peer in list(peers.items()):
    ours.train_steps(2)
    try:
      # warm-up; the first step includes torch.compile's compilation
      peer_first_step_s[label] = timed(peer.train_steps, 1)
      print(f'{label}: first train step {peer_first_step_s[label]:.1f} s', flush=True)
      peer.train_steps(2)
    except Exception as e:  # pylint: disable=broad-except  (torch.compile needs a C++ compiler)
      failed[label] = f'{type(e).__name__}: {e}'
      print(f'{label} failed, left out: {failed[label]}', flush=True)
      del peers[label]
      continue
    o, q = alternate(lambda: timed(ours.train_steps, n), lambda: timed(peer.train_steps, n),
                     args.rounds)
    results.append(row('train step', n, n * b, o, q, label))
    r = results[-1]
    print(f"train step vs {label}: ours {r['ours_ms']:.1f} ms, peer {r['peer_ms']:.1f} ms "
          f"(fastest rounds {r['ours_min_ms']:.1f} and {r['peer_min_ms']:.1f} ms)", flush=True)

  sample_batch = args.sample_batch or (256 if backend == 'gpu' else 64)
  sampler_compile = {}
  for spec in filter(None, args.samplers.split(',')):
    kind = 'ancestral' if spec == 'ancestral' else 'ddim'
    steps = config.diffusion.num_timesteps if kind == 'ancestral' else int(spec[4:])
    ours_fn, sampler_compile[spec] = ours.sampler(kind, steps, sample_batch)
    ours_fn()
    for label, peer in peers.items():
      peer_fn, _ = peer.sampler(kind, steps, sample_batch)
      peer.sampler(kind, 2, sample_batch)[0]()   # warm-up
      o, q = alternate(lambda: timed(ours_fn), lambda: timed(peer_fn), args.sample_rounds)
      results.append(row(f'{spec} sampling ({steps} steps, batch {sample_batch})', steps,
                         sample_batch, o, q, label))
      print(f"{spec}: ours {statistics.median(o):.1f} s, {label} {statistics.median(q):.1f} s",
            flush=True)
  if args.isolate:
    for side in [ours, *peers.values()]:
      side.close()

  load_after = os.getloadavg()
  mfu, peak = model_flops_utilisation(flops, results, env['device'])
  print_table(results)
  print(f'\nours: train-step compile {compile_s:.1f} s ({flops / 1e9:.1f} GFLOP per step)'
        + ''.join(f'; {k} sampler compile {v:.1f} s' for k, v in sampler_compile.items())
        + (f'; MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s' if mfu else ''))
  print('peer: first train step (warm-up; with torch.compile, its compilation) '
        + ', '.join(f'{k} {v:.1f} s' for k, v in peer_first_step_s.items()))
  print(f"{env['cpu_model']}, SIMD {env['simd_level']}; "
        + ('each side in its own process' if args.isolate else 'both sides in one process')
        + f'; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after')

  out = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      config=name, batch=b, dtype=dtype, conv_impl=config.model.conv_impl,
      cpu_malloc=config.training.cpu_malloc,
      isolate=args.isolate, host=platform.node(), cpus=os.cpu_count(), **env,
      load_average_before=load_before, load_average_after=load_after,
      params=ours.params, train_compile_s=compile_s, flops_per_step=flops,
      sampler_compile_s=sampler_compile, peer_first_step_s=peer_first_step_s,
      peer_failed=failed, mfu=mfu, results=results)
  # On the CPU the file name says the SIMD level (and --isolate), so that runs on
  # different kinds of machine do not overwrite each other.
  kind = f"_{env['simd_level']}" + ('_isolate' if args.isolate else '') if backend == 'cpu' else ''
  path = args.json or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results',
      f'peer_{backend}_{name}_b{b}_{dtype}{kind}.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
