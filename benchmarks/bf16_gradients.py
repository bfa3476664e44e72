"""How far bfloat16 training gradients are from float32 ones, tensor by tensor.

    python benchmarks/bf16_gradients.py --workdir runs/quickstart [--batch-size 16] [--seed 0]

Takes a trained workdir and one augmented training batch, computes the loss
gradient of every parameter as `train.compute_dtype=bfloat16` does (parameters
and activations cast to bfloat16 inside the differentiated function; BatchNorm
statistics and loss float32) and in float32, and prints the cosine between
the two per tensor (median, lowest, how many under 0.99) and over all
parameters at once, and the tensors furthest apart. Same batch, same dropout
key: only the arithmetic differs.

(In training mode a BatchNorm subtracts the batch mean, so a constant added to
its input has no effect: the true gradient of, e.g., a residual block's
projection bias is zero, and both dtypes give rounding noise there. Those
tensors show cosines near 0 and say nothing about precision.)
"""

import argparse


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--show', type=int, default=8, help='tensors furthest apart to list')
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from seg import checkpoint
  from seg.data import pipeline
  from seg.model import create_model
  from seg.parallel import AXIS_NAME
  from seg.preprocessing import preprocess
  from seg.train.loss import cross_entropy_sum

  config = checkpoint.load_config(args.workdir)
  model = create_model(config.model)
  variables, step = checkpoint.load_model_variables(args.workdir, model)
  batch = next(pipeline.train_batches(config.data, args.batch_size, seed=args.seed))
  images = preprocess(jnp.asarray(batch['image']))
  labels = jnp.asarray(batch['label'], jnp.int32)

  def gradients(dtype):
    def loss(params, images, labels):
      params = jax.tree.map(lambda p: p.astype(dtype), params)
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              images.astype(dtype), train=True,
                              rngs={'dropout': jax.random.key(args.seed)},
                              mutable=['batch_stats'])
      total, count = cross_entropy_sum(logits.astype(jnp.float32), labels,
                                       config.data.ignore_label)
      return total / count
    # One device under pmap: the synchronised BatchNorm needs its axis.
    step_fn = jax.pmap(jax.value_and_grad(loss), axis_name=AXIS_NAME, devices=jax.devices()[:1])
    value, grads = step_fn(jax.tree.map(lambda p: p[None], variables['params']),
                           images[None], labels[None])
    return float(value[0]), jax.tree.map(lambda g: np.asarray(g[0], np.float64), grads)

  loss32, g32 = gradients(jnp.float32)
  loss16, g16 = gradients(jnp.bfloat16)
  names = ['/'.join(str(getattr(k, 'key', k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(g32)]
  a, b = jax.tree.leaves(g32), jax.tree.leaves(g16)
  cosine = lambda x, y: float(x.ravel() @ y.ravel() /
                              max(np.linalg.norm(x) * np.linalg.norm(y), 1e-300))
  cosines = np.array([cosine(x, y) for x, y in zip(a, b)])
  overall = cosine(np.concatenate([x.ravel() for x in a]), np.concatenate([y.ravel() for y in b]))
  print(f'{args.workdir} (step {step}), {args.batch_size} examples: loss float32 {loss32:.5f}, '
        f'bfloat16 {loss16:.5f}')
  print(f'gradient cosine bfloat16 vs float32 over {len(cosines)} tensors: median '
        f'{np.median(cosines):.4f}, lowest {cosines.min():.4f}, under 0.99: '
        f'{int((cosines < 0.99).sum())}; all parameters at once: {overall:.4f}')
  for i in np.argsort(cosines)[:args.show]:
    ratio = np.linalg.norm(b[i]) / max(np.linalg.norm(a[i]), 1e-300)
    print(f'  {cosines[i]:8.4f}  norm ratio {ratio:10.3g}  {names[i]}')


if __name__ == '__main__':
  main()
