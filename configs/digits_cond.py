"""Class-conditional 8x8 digits with classifier-free guidance (Ho & Salimans 2022).

The digits default (``config_lib.digits_config``: same U-Net, optimiser and
1,500 steps) with a label embedding for the 10 digits and class dropout 0.1
(the paper's p_uncond = 0.1 is among its best, Table 1), so that one network
is both the conditional and the unconditional model. Then

    python -m diffusion_jax.main --config configs/digits_cond.py --workdir W --mode sample \
        --config.sampling.class_label=7 --config.sampling.guidance_scale=1.0

draws 7s.
"""

from diffusion_jax import config_lib


def get_config():
  config = config_lib.digits_config()
  config.model.num_classes = 10       # the digits 0..9 (+ the "no label" token)
  config.model.class_dropout = 0.1    # Ho & Salimans 2022: p_uncond = 0.1
  config.sampling.class_label = -1    # uniform random labels, one class per grid row
  config.sampling.guidance_scale = 1.0
  config.eval.parts = 'bpd,rd,figures,fid,classifier,guidance'   # + the curve over eval.guidance_scales
  return config
