"""Shared pytest set-up: float32 JAX on the CPU, quiet logs."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
