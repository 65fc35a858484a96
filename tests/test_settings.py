"""Tests for diffusion_jax.settings: the config read once, every bad value one sentence."""

import pytest

from diffusion_jax import config_lib, settings


def test_parse_parts():
  assert settings.parse_parts('fid, bpd') == ('bpd', 'fid')   # in the order they run
  assert settings.parse_parts('') == ()
  with pytest.raises(ValueError, match=r"eval\.parts: unknown part\(s\) \['nll'\]; allowed: bpd, rd"):
    settings.parse_parts('bpd,nll')


def test_sample_set_names():
  assert settings.parse_sample_sets('ancestral, ddim50,pc7', 1000) == (
      ('ancestral', 'ancestral', 1000), ('ddim50', 'ddim', 50), ('pc7', 'pc', 7))
  assert settings.parse_sample_sets('ddim50', 20) == (('ddim20', 'ddim', 20),)   # clamped to T
  for bad in ('ddim', 'ancestral5', 'euler10'):
    with pytest.raises(ValueError, match='eval.sample_sets'):
      settings.parse_sample_sets(bad, 100)


def test_positive_numbers_name_the_field():
  assert settings.positive_numbers('eval.nfe_calls', '5, 10,20') == (5, 10, 20)
  assert settings.positive_numbers('eval.nfe_ode_rtols', '1e-3', float) == (1e-3,)
  for bad in ('', '5,x', '0,5', '-1'):
    with pytest.raises(ValueError, match=r'eval\.nfe_calls=.*positive numbers'):
      settings.positive_numbers('eval.nfe_calls', bad)


def test_guidance_scales():
  assert settings.guidance_scales('eval.guidance_scales', '0, 0.5,2') == (0.0, 0.5, 2.0)
  for bad in ('', 'x', '-1', '1,nan'):
    with pytest.raises(ValueError, match='eval.guidance_scales'):
      settings.guidance_scales('eval.guidance_scales', bad)


def test_eval_settings_of_the_digits_config():
  ev = settings.eval_settings(config_lib.digits_config())
  assert ev.parts == ('bpd', 'rd', 'figures', 'fid', 'classifier')
  assert ev.sample_sets == (('ancestral', 'ancestral', 1000), ('ddim50', 'ddim', 50))
  assert ev.nfe_calls == (5, 10, 20, 50, 100) and ev.nfe_ode_rtols == (1e-3, 1e-5)


@pytest.mark.parametrize('mode,key,value,match', [
    ('eval', 'parts', 'bogus', r'eval\.parts'),
    ('eval', 'sample_sets', 'ddim', r'eval\.sample_sets'),
    ('eval', 'nfe_calls', '0', r'eval\.nfe_calls'),
    ('eval', 'guidance_scales', 'x', r'eval\.guidance_scales'),
])
def test_check_ends_every_bad_eval_value(mode, key, value, match):
  config = config_lib.digits_config()
  config.eval[key] = value
  settings.check(config, 'sample')   # sampling does not read the eval section
  with pytest.raises(ValueError, match=match):
    settings.check(config, mode)


def test_inpaint_settings_cap_the_walk():
  config = config_lib.digits_config()
  config.diffusion.num_timesteps = 20
  config.inpaint.num_steps, config.inpaint.jump_length, config.inpaint.eta = 0, 50, -1.0
  ip = settings.inpaint_settings(config)
  assert (ip.num_steps, ip.jump_length, ip.eta) == (20, 20, None)   # 0: all T; jump <= steps
  config.inpaint.num_steps, config.inpaint.eta = 5000, 0.0
  ip = settings.inpaint_settings(config)
  assert (ip.num_steps, ip.eta) == (20, 0.0)


def test_conditioning_and_image_shape():
  config = config_lib.digits_config()
  assert settings.image_shape(config) == (8, 8, 1)
  cond = settings.conditioning(config)
  assert not cond.conditional and cond.labels(None, 4) is None and cond.edit_labels(4) is None
  config.model.num_classes, config.sampling.class_label = 10, 3
  cond = settings.conditioning(config)
  assert cond.conditional and list(cond.edit_labels(2)) == [3, 3]
  config.sampling.class_label = -1
  assert list(settings.conditioning(config).edit_labels(2)) == [10, 10]   # the null label
