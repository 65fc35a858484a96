"""scikit-learn 8x8 digits: the offline default, trains on a laptop CPU in minutes."""

from diffusion_jax import config_lib


def get_config():
  return config_lib.digits_config()
