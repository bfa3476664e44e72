"""How fast this machine runs the network's 1x1 products: XLA float32/bfloat16/int8 vs OpenBLAS.

    python benchmarks/matmul_ceiling.py [--config experiments/base.py] [--size 513] [--iters 30]

Every 1x1 convolution of the model (MobileNetV2 expand/project, the head) at
`--size` is a [pixels, in] x [in, out] matrix product. This times each distinct
shape on its own, float32 through XLA (`jax.lax.dot`, what `seg/engine.py`
emits), bfloat16 through XLA (float32 accumulation), int8 x int8 -> int32 through XLA
(what the int8 engine emits, `seg/inference/quantize.py`), and float32 through
NumPy's BLAS (OpenBLAS in the NumPy wheels), interleaved so that load on the
machine hits all three alike, and prints per shape and in total how long the
network's products take at each rate.

It answers one question: how close to the machine's float32 ceiling can a
network made of XLA's products get? (ONNX Runtime's MLAS kernels and OpenBLAS
are both hand-written for this CPU; XLA's CPU dot is generated code.)
"""

import argparse
import collections
import statistics
import time


def product_shapes(model_config, size: int):
  """{(pixels, in, out): count} of the 1x1 products of the network at size x size."""
  from seg.model import HEAD_CHANNELS, block_specs, stem_channels
  shapes = collections.Counter()
  side = -(-size // 2)  # after the stride-2 stem
  channels = stem_channels(model_config.width, model_config.divisible_by)
  for i, (expanded, out, stride, _) in enumerate(block_specs(
      model_config.width, model_config.output_stride, model_config.divisible_by)):
    if i > 0:
      shapes[(side * side, channels, expanded)] += 1
    side = -(-side // stride)
    shapes[(side * side, expanded, out)] += 1
    channels = out
  shapes[(side * side, channels, HEAD_CHANNELS)] += 1  # aspp0 (the reduced head)
  # The concat projection (the image-pooling branch's share is a per-image bias in the
  # engine); the full ASPP's three 3x3 atrous branches are convolutions, not counted here.
  branches = 4 if model_config.head == 'aspp' else 1
  shapes[(side * side, HEAD_CHANNELS * branches, HEAD_CHANNELS)] += 1
  shapes[(side * side, HEAD_CHANNELS, model_config.num_classes)] += 1  # logits
  return shapes


def _median_ms(fn, iters: int) -> float:
  for _ in range(3):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1000)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/base.py')
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=30)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from seg.config import load_experiment
  config = load_experiment(args.config)
  shapes = product_shapes(config.model, args.size)
  rng = np.random.default_rng(0)
  kinds = ('xla float32', 'xla bfloat16', 'xla int8', 'numpy float32')
  total = dict.fromkeys(kinds, 0.0)
  madds = 0
  dot = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
  dot8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
  print(f'1x1 products of the {config.model.width} MobileNetV2 + head at {args.size}x{args.size}, '
        f'OS{config.model.output_stride} ({jax.devices()[0].device_kind}, numpy {np.__version__}):')
  print(f'{"pixels x in x out":>22} {"n":>2} ' + ' '.join(f'{k + " GMAdd/s":>22}' for k in kinds))
  for (m, k, n), count in sorted(shapes.items(), key=lambda item: -item[0][0]):
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    a32, b32 = jnp.asarray(a), jnp.asarray(b)
    a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
    a8, b8 = (jnp.asarray(np.clip(np.round(v * 30), -127, 127).astype(np.int8)) for v in (a, b))
    ms = {'xla float32': _median_ms(lambda: dot(a32, b32).block_until_ready(), args.iters),
          'xla bfloat16': _median_ms(lambda: dot(a16, b16).block_until_ready(), args.iters),
          'xla int8': _median_ms(lambda: dot8(a8, b8).block_until_ready(), args.iters),
          'numpy float32': _median_ms(lambda: a @ b, args.iters)}
    madds += m * k * n * count
    for kind in kinds:
      total[kind] += ms[kind] * count
    print(f'{m:>8} x {k:>4} x {n:>4} {count:>2} ' +
          ' '.join(f'{m * k * n / ms[kind] / 1e6:>22.1f}' for kind in kinds))
  print(f'all {madds / 1e9:.2f} GMAdd of products: ' + ', '.join(
      f'{kind} {total[kind]:.1f} ms ({madds / total[kind] / 1e6:.1f} GMAdd/s)' for kind in kinds))


if __name__ == '__main__':
  main()
