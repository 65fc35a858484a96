"""Class-conditional CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

The paper's CIFAR-10 model and training (``configs/cifar10.py``, Ho et al.
2020) with a label embedding for the 10 classes added to the timestep
embedding (improved-diffusion's ``class_cond``) and class dropout 0.1
(Ho & Salimans 2022, p_uncond = 0.1). Labels come from tfds ``cifar10``.
"""

import importlib.util
import pathlib


def _cifar10_config():
  spec = importlib.util.spec_from_file_location(
      'configs_cifar10', pathlib.Path(__file__).resolve().parent / 'cifar10.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _cifar10_config()
  config.model.num_classes = 10       # airplane ... truck (+ the "no label" token)
  config.model.class_dropout = 0.1    # Ho & Salimans 2022: p_uncond = 0.1
  config.sampling.class_label = -1
  config.sampling.guidance_scale = 0.3   # Ho & Salimans 2022, Table 1: best FID near w = 0.3
  config.eval.parts = 'bpd,rd,figures,fid,classifier,guidance'   # + the curve over eval.guidance_scales
  return config
