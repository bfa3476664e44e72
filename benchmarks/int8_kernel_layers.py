"""Each of the network's 1x1 products in the int8 kernel's loops, XLA's int8 and XLA's float32.

    python benchmarks/int8_kernel_layers.py [--width 1.0] [--size 513] [--iters 15] \
        [--loops avx2,vnni]

The products of DeepLabv3 + MobileNetV2 (output stride 16, batch 1) as the engine runs them,
random values (speed does not depend on them), each variant one compiled call:
- kernel LOOP, for each loop this CPU runs (avx2, avxvnni, vnni, amx: `int8_kernel.loops()`;
  with SEG_INT8_LOOP_EMULATION=1 also the stand-ins of avxvnni and amx, the emulated tiles
  far slower than real ones): `seg.inference.int8_kernel.product` on uint8/int8 inputs
  (signed ones as x + 128 in uint8 for the VNNI loops, as the engine stores them),
  expansions writing the depthwise layer's uint8 input, the others float32 (the 'kernel'
  formulation);
- xla int8: float32 input quantised, int8 x int8 -> int32 `dot_general`, scale, bias and
  activation (the 'int8' formulation, fused by XLA);
- xla float32: `dot_general` + bias + activation.
Variants alternate per layer; prints the median ms and GMAdd/s per layer and the totals.
Then each depthwise layer between an expansion and its projection, uint8 in and the
projection's uint8 input out: in the kernel (`int8_kernel.depthwise`; its AVX2 loop, and its
AVX-512 loop where the CPU runs the VNNI or AMX loop) and as XLA's taps, ReLU6 and
quantisation (what the engine runs with SEG_INT8_DEPTHWISE=xla). Last the stem with block 0's
depthwise layer, float32 image in and block 0's projection's uint8 input out:
`int8_kernel.stem` (the same loops) and XLA's (SEG_INT8_STEM=xla).
"""

from kernel_timing import chosen_loops, median_ms, parse_args


def main():
  args = parse_args(__doc__.split('\n')[0], ', e.g. avx2,avxvnni with SEG_INT8_LOOP_EMULATION=1')

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from seg.inference import int8_kernel
  from seg.model import block_specs

  if not int8_kernel.available():
    raise SystemExit(f'the int8 kernel is unavailable: {int8_kernel.unavailable_reason()}')
  size = size0 = -(-args.size // 2)
  specs = block_specs(args.width, 16)
  channels = specs[0][0]  # block 0 has no expansion: its input is the stem's output
  layers = []  # (name, pixels, in, out, signed input, activation)
  depthwise = []  # (name, input size, channels, stride, dilation)
  for i, (expanded, out, stride, dilation) in enumerate(specs):
    if i > 0:
      layers.append((f'block{i}/expand', size * size, channels, expanded, True, 'relu6'))
      depthwise.append((f'block{i}/depthwise', size, expanded, stride, dilation))
    size = -(-size // stride)
    layers.append((f'block{i}/project', size * size, expanded, out, False, None))
    channels = out
  layers += [('head/aspp0', size * size, channels, 256, True, 'relu'),
             ('head/proj_branches', size * size, 256, 256, False, None),
             ('head/logits', size * size, 256, 21, False, None)]

  rng = np.random.default_rng(0)
  dims = (((1,), (0,)), ((), ()))
  act = {None: lambda y: y, 'relu6': lambda y: jnp.clip(y, 0, 6), 'relu': jax.nn.relu}

  timed = lambda fn, *operands: median_ms(fn, *operands, iters=args.iters)
  loops = chosen_loops(int8_kernel.loops(), args.loops)
  columns = [f'kernel {loop}' for loop in loops] + ['xla int8', 'xla float32']
  print(f'{args.size}x{args.size}, width {args.width}, batch 1, jax {jax.__version__}, '
        f'the engine\'s loop: {int8_kernel.isa()}; ms (GMAdd/s): ' + ' | '.join(columns))
  totals = dict.fromkeys(columns, 0.0)
  madds = 0
  for name, m, k, n, signed, activation in layers:
    xf = jnp.asarray(rng.uniform(-1 if signed else 0, 1, (m, k)), jnp.float32)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = jnp.full((n,), 1e-3, jnp.float32)
    bias = jnp.zeros((n,), jnp.float32)
    xq = jnp.asarray(np.asarray(xf * 127).round(), jnp.int8 if signed else jnp.uint8)
    mode = {None: 'linear', 'relu': 'relu', 'relu6': 'relu6_uint8'}[activation]
    if name == 'block0/project':  # it writes block 1's int8 input (quantize_folded)
      mode = 'linear_int8'

    f = act[activation]
    # Signed inputs as the engine stores them for each loop: x + 128 as uint8 for the VNNI
    # loops'.
    offset = jnp.asarray((np.asarray(xq, np.int16) + 128).astype(np.uint8))
    ms = {f'kernel {loop}': timed(
        lambda x, w, loop=loop: int8_kernel.product(
            x, w, scale, bias, mode, 127 / 6, loop,
            offset_input=signed and loop in int8_kernel.OFFSET_LOOPS),
        offset if signed and loop in int8_kernel.OFFSET_LOOPS else xq,
        jnp.asarray(int8_kernel.pack_weights(wq, 64 if loop == 'amx' else 4)))
          for loop in loops}
    ms.update({
        'xla int8': timed(lambda x, w: f(lax.dot_general(
            jnp.clip(jnp.round(x * 127), -127, 127).astype(jnp.int8), w, dims,
            preferred_element_type=jnp.int32).astype(jnp.float32) * scale + bias),
            xf, jnp.asarray(wq)),
        'xla float32': timed(lambda x, w: f(lax.dot_general(x, w, dims) + bias),
                             xf, jnp.asarray(wq, jnp.float32)),
    })
    madds += m * k * n
    for key, value in ms.items():
      totals[key] += value
    print(f'{name:20s} {m:6d} x {k:4d} x {n:4d}  ' + ' | '.join(
        f'{v:6.2f} ({m * k * n / v / 1e6:5.0f})' for v in ms.values()), flush=True)
  print(f'{"all":20s} {madds / 1e9:.2f} GMAdd            ' + ' | '.join(
      f'{v:6.1f} ({madds / v / 1e6:5.0f})' for v in totals.values()))


  from seg.inference.forward import _depthwise
  # The depthwise and stem kernels' loops: AVX2, and AVX-512 beside the VNNI and AMX loops.
  widths = {'kernel avx2': 'avx2'}
  wide = [loop for loop in loops if loop in ('vnni', 'amx')]
  if wide:
    widths['kernel avx512'] = wide[-1]
  print(f'\ndepthwise layers, uint8 in and out, ms: {" | ".join(widths)} | xla')
  totals = dict.fromkeys([*widths, 'xla'], 0.0)
  for name, size, c, stride, dilation in depthwise:
    x = jnp.asarray(rng.integers(0, 128, (1, size, size, c)), jnp.uint8)
    w = jnp.asarray(rng.normal(0, 0.02, (3, 3, c)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 1, c), jnp.float32)
    ms = {key: timed(lambda x, loop=loop: int8_kernel.depthwise(
        x, w, b, stride, dilation, 20.0, loop), x) for key, loop in widths.items()}
    ms['xla'] = timed(lambda x: jnp.clip(jnp.round(jnp.clip(
        _depthwise(x, w, b, stride, dilation), 0, 6) * 20.0), 0, 127).astype(jnp.uint8), x)
    for key, value in ms.items():
      totals[key] += value
    print(f'{name:20s} {size:4d}x{size:<4d} x {c:4d} s{stride} d{dilation}  ' +
          ' | '.join(f'{v:6.2f}' for v in ms.values()), flush=True)
  print(f'{"all":20s} {"":27s}' + ' | '.join(f'{v:6.2f}' for v in totals.values()))

  from seg.inference.forward import _stem
  c = specs[0][0]
  image = jnp.asarray(rng.uniform(-1, 1, (1, args.size, args.size, 3)), jnp.float32)
  ws = jnp.asarray(rng.normal(0, 0.3, (3, 3, 3, c)), jnp.float32)
  wd = jnp.asarray(rng.normal(0, 0.3, (3, 3, c)), jnp.float32)
  b = jnp.asarray(rng.normal(0, 1, c), jnp.float32)
  relu6 = lambda y: jnp.clip(y, 0, 6)
  ms = {key: timed(lambda x, loop=loop: int8_kernel.stem(x, ws, b, wd, b, 20.0, loop=loop),
                  image) for key, loop in widths.items()}
  ms['xla'] = timed(lambda x: jnp.clip(jnp.round(relu6(_depthwise(
      relu6(_stem(x, ws, b)), wd, b, 1, 1)) * 20.0), 0, 127).astype(jnp.uint8), image)
  print(f'\nthe stem and block0/depthwise, {args.size}x{args.size} float32 -> {size0}x{size0} x '
        f'{c} uint8, ms: {" | ".join(ms)}\n{"":48s}' + ' | '.join(f'{v:6.2f}' for v in ms.values()))


if __name__ == '__main__':
  main()
