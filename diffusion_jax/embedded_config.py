"""The embedded digits config as a config file: the default of ``main.py``'s ``--config``.

``ml_collections`` loads it like any ``configs/<name>.py``, so that
``--config.section.key=value`` overrides work with or without a ``--config``
file. It lives in the package (``configs/`` is not installed).
"""

from diffusion_jax import config_lib


def get_config():
  return config_lib.digits_config()
