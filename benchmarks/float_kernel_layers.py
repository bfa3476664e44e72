"""Each of the network's 1x1 products in the float kernel's loops (bfloat16 and float32), XLA's
bfloat16 and XLA's float32.

    python benchmarks/float_kernel_layers.py [--width 1.0] [--size 513] [--iters 15] \
        [--loops avx512bf16,amx]

The products of DeepLabv3 + MobileNetV2 (output stride 16, batch 1) as the engine runs them,
random values (speed does not depend on them), each variant one compiled call, alternating
per layer:
- kernel LOOP, for each loop this CPU runs (avx512bf16, amx: `float_kernel.loops()`; with
  SEG_INT8_LOOP_EMULATION=1 also AMX's stand-in, far slower than real tiles):
  `seg.inference.float_kernel.product`, float32 in and out, the activation in its output loop
  and a residual block's sum too (the 'kernel' bfloat16 formulation);
- kernel float32 LOOP, for each float32 loop this CPU runs (avx2, avx512:
  `float_kernel.f32_loops()`): the same with float32 weights (the 'kernel' float32
  formulation);
- xla bfloat16: bfloat16 input (as XLA's bfloat16 formulation stores the activations from
  SEG_BF16_FROM_STRIDE on), bfloat16 weights, float32 accumulation, bias, activation and
  residual fused by XLA;
- xla float32: the same in float32 (the float32 engine, and either bfloat16 formulation
  below its stride).
Prints the median ms and GMAdd/s per layer with its input stride, and the totals over the
layers from each stride on.
"""

from kernel_timing import chosen_loops, median_ms, parse_args


def main():
  args = parse_args(__doc__.split('\n')[0])

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from seg.inference import float_kernel
  from seg.model import block_specs

  if not float_kernel.available(jnp.float32):
    raise SystemExit(f'the float kernel is unavailable: '
                     f'{float_kernel.unavailable_reason(jnp.float32)}')
  size = -(-args.size // 2)
  stride_in = 2
  specs = block_specs(args.width, 16)
  channels = specs[0][0]
  layers = []  # (name, input stride, pixels, in, out, activation, residual)
  for i, (expanded, out, stride, _) in enumerate(specs):
    if i > 0:
      layers.append((f'block{i}/expand', stride_in, size * size, channels, expanded, 'relu6',
                     False))
    block_stride = stride_in
    size, stride_in = -(-size // stride), stride_in * stride
    layers.append((f'block{i}/project', block_stride, size * size, expanded, out, 'linear',
                   stride == 1 and channels == out))
    channels = out
  layers += [('head/aspp0', stride_in, size * size, channels, 256, 'relu', False),
             ('head/proj_branches', stride_in, size * size, 256, 256, 'linear', False),
             ('head/logits', stride_in, size * size, 256, 21, 'linear', False)]

  rng = np.random.default_rng(0)
  dims = (((1,), (0,)), ((), ()))
  act = {'linear': lambda y: y, 'relu6': lambda y: jnp.clip(y, 0, 6), 'relu': jax.nn.relu}

  timed = lambda fn, *operands: median_ms(fn, *operands, iters=args.iters)
  loops = chosen_loops(float_kernel.loops(), args.loops)
  f32_loops = float_kernel.f32_loops()
  columns = ([f'kernel {loop}' for loop in loops] +
             [f'kernel float32 {loop}' for loop in f32_loops] + ['xla bfloat16', 'xla float32'])
  engines = float_kernel.isa() if float_kernel.available() else 'none'
  print(f'{args.size}x{args.size}, width {args.width}, batch 1, jax {jax.__version__}, '
        f'the bfloat16 engine\'s loop: {engines}; ms (GMAdd/s): ' + ' | '.join(columns))
  by_stride = {}  # stride: (madds, {column: ms})
  for name, stride, m, k, n, activation, residual in layers:
    x = jnp.asarray(rng.uniform(0, 1, (m, k)), jnp.float32)
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    b = jnp.asarray(rng.normal(0, 1, n), jnp.float32)
    r = jnp.asarray(rng.normal(0, 1, (m, n)), jnp.float32) if residual else None
    f = act[activation]
    plus = (lambda y, r: y + r) if residual else (lambda y, r: y)
    ms = {f'kernel {loop}': timed(
        lambda x, wp, r, loop=loop: float_kernel.product(x, wp, b, activation, r, loop),
        x, jnp.asarray(float_kernel.pack_weights(w)), r) for loop in loops}
    for loop in f32_loops:
      ms[f'kernel float32 {loop}'] = timed(
          lambda x, wp, r, loop=loop: float_kernel.product(x, wp, b, activation, r, loop),
          x, jnp.asarray(float_kernel.pack_weights(w, jnp.float32)), r)
    ms['xla bfloat16'] = timed(lambda x, w, r: plus(f(lax.dot_general(
        x, w, dims, preferred_element_type=jnp.float32) + b), r),
        x.astype(jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), r)
    ms['xla float32'] = timed(lambda x, w, r: plus(f(lax.dot_general(x, w, dims) + b), r),
                              x, jnp.asarray(w), r)
    madds, totals = by_stride.setdefault(stride, [0, dict.fromkeys(columns, 0.0)])
    by_stride[stride][0] += m * k * n
    for key, value in ms.items():
      totals[key] += value
    print(f'{name:20s} s{stride:<3d}{m:6d} x {k:4d} x {n:4d}  ' + ' | '.join(
        f'{v:6.2f} ({m * k * n / v / 1e6:5.0f})' for v in ms.values()), flush=True)
  for first in sorted(by_stride):
    madds = sum(by_stride[s][0] for s in by_stride if s >= first)
    totals = {c: sum(by_stride[s][1][c] for s in by_stride if s >= first) for c in columns}
    print(f'{f"from stride {first}":20s} {madds / 1e9:.2f} GMAdd              ' + ' | '.join(
        f'{v:6.2f} ({madds / v / 1e6:5.0f})' for v in totals.values()))


if __name__ == '__main__':
  main()
