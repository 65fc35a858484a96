"""The package layout: public import paths (DESIGN.md), the floors between modules, module sizes."""

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffusion_jax'

# DESIGN.md's public modules and, for the moved ones, names that must stay importable there.
PUBLIC = {
    'diffusion_jax.schedule': ('make_schedule', 'Schedule'),
    'diffusion_jax.diffusion': ('q_sample', 'q_posterior_mean_variance', 'predict_x0',
                                'p_mean_variance', 'vb_terms_bpd', 'prior_bpd',
                                'training_losses', 'calc_bpd_loop', 'score_from_model_output'),
    'diffusion_jax.sampling': ('p_sample_loop', 'p_sample_loop_progressive', 'ddim_sample_loop',
                               'dpm_solver_sample_loop', 'pc_sample_loop', 'ddim_timesteps',
                               'uniform_timesteps', 'respace_schedule', 'snapshot_steps',
                               'dpm_solver_orders', 'dpm_solver_update', 'dpm_solver_chain',
                               'SKIP_TYPES', 'SAMPLERS', 'make_sampler', 'sample_from_config'),
    'diffusion_jax.models': ('create_model',),
    'diffusion_jax.train': ('train_and_evaluate', 'make_train_fn', 'setup', 'train_step'),
    'diffusion_jax.config_lib': ('base_config',),
    'diffusion_jax.interop': ('load_diffusers_unet', 'save_diffusers_unet'),
    'diffusion_jax.aot': (),
    'diffusion_jax.host': (),
    'diffusion_jax.sde': ('probability_flow_sample', 'ode_log_likelihood'),
    'diffusion_jax.editing': (),
    'diffusion_jax.data': ('create_train_iterator', 'create_eval_iterator', 'get_source',
                           'validate_data_config', 'load_split', 'load_uint8', 'load_labels',
                           'shard_batch', 'DatasetNotFoundError'),
    'diffusion_jax.main': ('main',),
    'diffusion_jax.convert': (),
}

# Entry points that may reach into diffusion_jax.evaluation (the --mode drivers).
ENTRY_POINTS = {'main.py', 'editing_cli.py', 'convert.py'}
MAX_LINES = 500
# The paper's math and the samplers: the floor below training, data and evaluation.
MATH = ('schedule.py', 'diffusion.py', 'timestep_sampler.py', 'timesteps.py', 'dpm_solver.py',
        'sampling.py', 'sde.py', 'guidance.py', 'editing.py', 'distillation.py')
ABOVE_MATH = ('diffusion_jax.train', 'diffusion_jax.checkpoint', 'diffusion_jax.data',
              'diffusion_jax.workdir', 'diffusion_jax.storage', 'diffusion_jax.metric_writers',
              'diffusion_jax.preemption', 'diffusion_jax.evaluation', 'diffusion_jax.main')


@pytest.mark.parametrize('module', sorted(PUBLIC))
def test_public_import_paths(module):
  mod = importlib.import_module(module)
  missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
  assert not missing, f'{module} lost {missing}'


def _modules():
  return sorted(p for p in PACKAGE.rglob('*.py') if '__pycache__' not in p.parts)


def _imported(path: pathlib.Path) -> set:
  """Every module named by an import statement in ``path`` (top level or inside functions)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def test_the_library_does_not_import_the_evaluation_package():
  """The math, models, data and training never depend on --mode eval's code."""
  offenders = {}
  for path in _modules():
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] == 'evaluation' or str(rel) in ENTRY_POINTS:
      continue
    bad = sorted(n for n in _imported(path) if n.startswith('diffusion_jax.evaluation'))
    if bad:
      offenders[str(rel)] = bad
  assert not offenders, offenders


def test_the_math_does_not_import_training_data_or_evaluation():
  offenders = {}
  for name in MATH:
    bad = sorted(n for n in _imported(PACKAGE / name)
                 if any(n == m or n.startswith(m + '.') for m in ABOVE_MATH))
    if bad:
      offenders[name] = bad
  assert not offenders, offenders


def test_no_module_is_over_500_lines():
  sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
  assert len(sizes) > 40, sizes   # the walk found the package
  assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}
