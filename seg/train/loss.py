"""Pixel-wise softmax cross-entropy with an ignore label."""

from typing import Tuple

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sum(logits: jax.Array, labels: jax.Array,
                      ignore_label: int = 255) -> Tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over the pixels whose label is not `ignore_label`.

  Args:
    logits: [batch, height, width, classes] (upsampled to the label size).
    labels: [batch, height, width] integer class ids.

  Returns:
    (sum of the per-pixel losses, number of counted pixels), both scalars, so
    that callers can normalise over all devices' pixels at once.
  """
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid).astype(jnp.float32)
