"""Pixel-wise softmax cross-entropy with an ignore label, DeepLab's per-class label weights and
its hard pixel mining (`top_k_percent_pixels`), as deeplab/utils/train_utils.py's
`add_softmax_cross_entropy_loss_for_each_scale` computes them.

The functions return sums and counts, not means, so that the training step can normalise over
every device's pixels at once (any split of a batch across devices gives the same loss).
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from jax import lax


def pixel_losses(logits: jax.Array, labels: jax.Array, ignore_label: int = 255,
                 label_weights: Optional[Sequence[float]] = None
                 ) -> Tuple[jax.Array, jax.Array]:
  """Per-pixel cross-entropy times the weight of the pixel's label (DeepLab's
  `get_label_weight_mask`: 0 where the label is `ignore_label`).

  Args:
    logits: [batch, height, width, classes] (upsampled to the label size).
    labels: [batch, height, width] integer class ids.
    label_weights: one weight per class, or None for 1 everywhere.

  Returns:
    (losses [batch, height, width] float32 (or the logits' wider type), valid
    [batch, height, width] bool).
  """
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  if label_weights is not None:
    losses = losses * jnp.asarray(label_weights, jnp.float32)[safe]
  return jnp.where(valid, losses, 0.0), valid


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, ignore_label: int = 255,
                      label_weights: Optional[Sequence[float]] = None
                      ) -> Tuple[jax.Array, jax.Array]:
  """Summed (weighted) cross-entropy over the pixels whose label is not `ignore_label`.

  Returns:
    (sum of the per-pixel losses, number of counted pixels), both scalars. DeepLab divides
    the weighted sum by the number of labelled pixels, not by the sum of their weights.
  """
  losses, valid = pixel_losses(logits, labels, ignore_label, label_weights)
  return jnp.sum(losses), jnp.sum(valid).astype(jnp.float32)


def mining_fraction(step: jax.Array, top_k_percent_pixels: float,
                    hard_example_mining_step: int) -> jax.Array:
  """The share of pixels kept at `step` (the step before the update, TF's global_step):
  `top_k_percent_pixels` at once, or falling linearly from 1 to it over the first
  `hard_example_mining_step` steps."""
  if not hard_example_mining_step:
    return jnp.float32(top_k_percent_pixels)
  ratio = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / hard_example_mining_step)
  return ratio * top_k_percent_pixels + (1.0 - ratio)


def hardest_pixels_sum(losses: jax.Array, fraction: jax.Array,
                       axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array]:
  """DeepLab's hard pixel mining over the whole global batch: the sum of the k largest
  per-pixel losses, k = int(fraction * pixels) of all pixels (ignored ones included, as
  DeepLab counts them), and the number of those k that are not zero (ignored pixels and
  zero weights add nothing and count for nothing).

  Under pmap (`axis_name`), the k are taken over every device's pixels (one threshold for
  all), so the loss does not depend on how the batch is split. Pixels tied at the threshold
  share the places left (each with weight places / ties): the loss is exactly the top-k
  sum, and the gradient the tied pixels' mean, whichever of them a sort would have picked.

  Returns:
    (this device's part of the sum, this device's part of the count); the global sums of
    both over `axis_name` are the top-k sum and count.
  """
  flat = losses.reshape(-1)
  every = lax.stop_gradient(flat)
  if axis_name is not None:
    every = lax.all_gather(every, axis_name).reshape(-1)
  total = every.shape[0]
  k = jnp.clip((fraction * jnp.float32(total)).astype(jnp.int32), 0, total)
  ordered = jnp.sort(every)
  threshold = ordered[jnp.clip(total - k, 0, total - 1)]
  above = flat > threshold
  tied = flat == threshold

  def global_sum(x):
    x = jnp.sum(x.astype(jnp.float32))
    return lax.psum(x, axis_name) if axis_name is not None else x

  n_above, n_tied = global_sum(lax.stop_gradient(above)), global_sum(lax.stop_gradient(tied))
  share = jnp.where(n_tied > 0, (k - n_above) / jnp.maximum(n_tied, 1.0), 0.0)
  share = jnp.where(k > 0, share, 0.0)
  weights = (jnp.where(k > 0, above.astype(flat.dtype), 0.0) + share * tied).astype(flat.dtype)
  loss_sum = jnp.sum(flat * weights)
  # Losses are never negative: a positive threshold means all k places hold non-zero losses;
  # a zero threshold keeps every positive loss (and zeros, which neither add nor count).
  count = jnp.sum(jnp.where(threshold > 0, weights, (flat > 0) * weights))
  # A NaN or infinite loss anywhere would fall out of the comparisons unseen: it makes the
  # sum NaN instead, so the step's non-finite guard (train.skip_nonfinite) sees it.
  loss_sum = jnp.where(jnp.all(jnp.isfinite(every)), loss_sum, jnp.nan)
  return loss_sum, count
