"""Sampling the training timestep t: uniform, or importance sampling for L_vlb.

Importance sampling follows Nichol & Dhariwal 2021 §3.3 (eq. 17 of iDDPM):
p_t ∝ sqrt(E[L_t^2]) over a history of the 10 most recent values of each
term, used once every t has a full history; the loss of an example is weighted
by 1 / (T p_t) so that the estimate of sum_t L_t stays unbiased. The history is
a small array carried in the train state (it is checkpointed with it).
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LossHistory:
  """The last ``H`` loss values of every timestep and how many have been seen."""
  values: jnp.ndarray   # [T, H]
  counts: jnp.ndarray   # [T] int32


def init_history(num_timesteps: int, history: int = 10) -> LossHistory:
  return LossHistory(values=jnp.zeros((num_timesteps, history), jnp.float32),
                     counts=jnp.zeros((num_timesteps,), jnp.int32))


def probabilities(h: LossHistory, uniform_prob: float = 1e-3) -> jnp.ndarray:
  """p_t ∝ sqrt(mean of the squared history), mixed with uniform; uniform until warm."""
  num_t, size = h.values.shape
  w = jnp.sqrt(jnp.mean(h.values ** 2, axis=-1))
  p = w / jnp.maximum(jnp.sum(w), 1e-12)
  p = p * (1.0 - uniform_prob) + uniform_prob / num_t
  warm = jnp.all(h.counts >= size)
  return jnp.where(warm, p, jnp.full((num_t,), 1.0 / num_t))


def sample_timesteps(rng, batch_size: int, num_timesteps: int, history: LossHistory | None = None):
  """Draws t [B] and per-example loss weights [B] (1 for uniform sampling)."""
  if history is None:
    t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    return t, jnp.ones((batch_size,), jnp.float32)
  p = probabilities(history)
  t = jax.random.choice(rng, num_timesteps, (batch_size,), p=p).astype(jnp.int32)
  return t, 1.0 / (num_timesteps * p[t])


def update_history(h: LossHistory, t: jnp.ndarray, losses: jnp.ndarray) -> LossHistory:
  """Pushes each (t, loss) pair into t's ring buffer, in batch order."""
  size = h.values.shape[1]

  def push(i, h):
    ti = t[i]
    values = h.values.at[ti, h.counts[ti] % size].set(losses[i].astype(jnp.float32))
    return LossHistory(values=values, counts=h.counts.at[ti].add(1))

  return jax.lax.fori_loop(0, t.shape[0], push, h)
