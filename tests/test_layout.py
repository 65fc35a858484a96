"""The package layout: public import paths (docs/design.md), the floors between modules, module sizes."""

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffusion_jax'

# The public modules and, for the moved ones, names that must stay importable there.
PUBLIC = {
    'diffusion_jax.schedule': ('make_schedule', 'Schedule'),
    'diffusion_jax.diffusion': ('q_sample', 'q_posterior_mean_variance', 'predict_x0',
                                'p_mean_variance', 'vb_terms_bpd', 'prior_bpd',
                                'training_losses', 'calc_bpd_loop', 'score_from_model_output'),
    'diffusion_jax.sampling': ('p_sample_loop', 'p_sample_loop_progressive', 'ddim_sample_loop',
                               'dpm_solver_sample_loop', 'pc_sample_loop', 'ddim_timesteps',
                               'uniform_timesteps', 'respace_schedule', 'snapshot_steps',
                               'dpm_solver_orders', 'dpm_solver_update', 'dpm_solver_chain',
                               'SKIP_TYPES', 'SAMPLERS'),
    'diffusion_jax.samplers': ('SAMPLERS', 'SamplerSpec', 'run'),
    'diffusion_jax.settings': ('sampler_spec', 'conditioning', 'eval_settings', 'check'),
    'diffusion_jax.runner': ('make_mesh', 'make_sampler', 'jit_batched', 'apply_fn_for'),
    'diffusion_jax.pipeline': ('load', 'Pipeline'),
    'diffusion_jax': ('load', 'Pipeline'),
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
ENTRY_POINTS = {'main.py', 'editing_cli.py', 'convert.py', 'pipeline.py'}
MAX_LINES = 500
# The paper's math and the samplers: the floor below training, data and evaluation.
MATH = ('schedule.py', 'diffusion.py', 'timestep_sampler.py', 'timesteps.py', 'dpm_solver.py',
        'sampling.py', 'samplers.py', 'sde.py', 'guidance.py', 'editing.py', 'distillation.py')
# The math and sampler layers take settings, never the whole config; the exceptions are
# the thin constructors the design names (docs/design.md).
CONFIG_CONSTRUCTORS = {('schedule.py', 'schedule_from_config')}
ABOVE_MATH = ('diffusion_jax.train', 'diffusion_jax.checkpoint', 'diffusion_jax.data',
              'diffusion_jax.workdir', 'diffusion_jax.storage', 'diffusion_jax.metric_writers',
              'diffusion_jax.preemption', 'diffusion_jax.evaluation', 'diffusion_jax.main',
              'diffusion_jax.settings', 'diffusion_jax.runner', 'diffusion_jax.pipeline')


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


def test_the_math_and_samplers_take_no_config():
  """No function of the math and sampler layers has a ``config`` parameter (but the named constructors)."""
  offenders = []
  for name in MATH:
    for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
      if isinstance(node, (ast.FunctionDef, ast.Lambda)):
        args = node.args
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        label = getattr(node, 'name', '<lambda>')
        if 'config' in params and (name, label) not in CONFIG_CONSTRUCTORS:
          offenders.append(f'{name}:{label}')
  assert not offenders, offenders


def test_no_config_section_get_with_a_default():
  """``config.section.get('key', default)`` restates base_config's defaults: every config has every key."""
  sections = ('data', 'model', 'diffusion', 'optim', 'training', 'sampling', 'eval', 'inpaint',
              'edit', 'distill')
  offenders = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'get' and len(node.args) == 2
          and isinstance(node.args[0], ast.Constant)):
        owner = node.func.value
        text = ast.unparse(owner)
        if text.split('.')[-1] in sections + ('config', 'cfg') or text in (
            'd', 'o', 'sp', 'sc', 'ip', 'm', 'ev', 'tr'):
          offenders.append(f'{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}')
  assert not offenders, offenders


def test_evaluation_and_the_pipeline_never_import_the_training_loop():
  """Restoring a checkpoint for sampling or evaluation needs only ``train_state``."""
  offenders = {}
  for path in _modules():
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] == 'evaluation' or str(rel) in ('pipeline.py', 'editing_cli.py', 'runner.py',
                                                    'settings.py', 'samplers.py'):
      bad = sorted(n for n in _imported(path)
                   if n in ('diffusion_jax.train', 'diffusion_jax.train.train'))
      if bad:
        offenders[str(rel)] = bad
  assert not offenders, offenders
