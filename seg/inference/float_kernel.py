"""The project's floating-point kernels: 1x1 products with float32 activations in and out, in
float32 (AVX-512 fused multiply-adds) or bfloat16 (AVX-512 BF16 or AMX-BF16 tiles;
`float_product.h`), and the float32 layers between them: the float32 and bfloat16 engines'
'kernel' formulations on x86 CPUs.

    if float_kernel.available(jnp.float32):        # the int8 kernels' library, built once
      wp = float_kernel.pack_weights(w, jnp.float32)   # [in, out] -> packed (or jnp.bfloat16)
      y = float_kernel.product(x, wp, b, mode='relu6')  # inside jit, on a CPU
      y = float_kernel.depthwise(y, wd, bd, stride, dilation)        # float32, ReLU6
      y = float_kernel.expand_depthwise(x, wp, b, wd, bd, stride, dilation)  # both, one pass
      y0 = float_kernel.stem(images, ws, bs, wd0, bd0)  # stem + block 0's depthwise layer

The packed weights' dtype says the product's precision. bfloat16: XLA's bfloat16 engine
rounds whole tensors to bfloat16 in passes over memory before its products, which made
bfloat16 slower than float32 on the memory-bound high-resolution layers of a CPU
(docs/performance.md, "bfloat16"); this kernel rounds a block of rows in the core's cache on
its way into the product, so any product can run in bfloat16 at no extra pass. The numbers
are XLA's bfloat16 formulation's (inputs and weights rounded to bfloat16 to nearest even,
exact products, float32 sums) up to the order of the sums. float32: the same products
without rounding, each output a fused multiply-add per input in input order. Either way
bias, activation and residual sum run in the product's output loop, and a large expansion
runs in one pass with its depthwise layer. The depthwise layers and the stem are the int8
engine's AVX-512 loops (`int8_depthwise.h`, `int8_stem.h`) with float32 in and out: XLA's
float32 taps, summed in one fixed order (`float_kernel.cc`).

It is compiled into the library of `seg.inference.int8_kernel` (`build`). float32 runs
wherever that builds (x86-64 with AVX2 and FMA), in AVX-512 loops where the CPU has AVX-512
F, BW, VL and DQ (Intel Xeons since Skylake, AMD Zen 4 and later; `f32_isa()`); bfloat16
where it has AVX-512 BF16 (`avx512_bf16`: Intel Xeons since Cooper Lake, AMD
Zen 4 and later) or AMX-BF16 tiles (`amx_bf16`, Intel Xeons since Sapphire Rapids);
elsewhere `available()` is False and the engine keeps XLA's products.
`int8_kernel.emulate_loops` stands in for the AMX tiles on CPUs with AVX-512 (tests).
Exports (`jax.export`) never contain it.
"""

import ctypes
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from seg.inference import cpu_features, int8_kernel, loop_check

TARGET = 'SegFloatProduct'  # int8_kernel._TARGETS' key
PANEL = 16       # output channels per weight panel (float_product.h: kPanel)
K_MULTIPLE = 32  # inputs per AMX tile product; bfloat16 weights are packed to a multiple of it
MODES = {'linear': 0, 'relu6': 1, 'relu': 2}
# The bfloat16 products' loops (float_product.h: Isa), slowest first.
LOOPS = {'avx512bf16': 0, 'amx': 1}
BF16_FLAGS = int8_kernel.AVX512_FLAGS | {'avx512_bf16'}
# The float32 layers' loops (float_product.h: kAvx512F32, kAvx2F32), slowest first: products,
# depthwise layers and stem pass in AVX2 and FMA (the library's baseline) or in AVX-512.
F32_LOOPS = {'avx2': 3, 'avx512': 2}
_state = {}


def _is_f32(dtype) -> bool:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f'the kernel computes float32 or bfloat16, not {jnp.dtype(dtype).name}')
  return jnp.dtype(dtype) == jnp.float32


def unavailable_reason(dtype=jnp.bfloat16) -> Optional[str]:
  """Why `available(dtype)` is False (None when it is True)."""
  if not int8_kernel.available():
    return int8_kernel.unavailable_reason()
  if _is_f32(dtype):  # the AVX2 loops: the library's baseline
    return None if f32_loops() else _none_agreed(loop_verdicts(jnp.float32), 'float32')
  if not loops():
    return (_none_agreed(loop_verdicts(), 'bfloat16') if loop_verdicts() else
            'the CPU has neither AVX-512 BF16 nor AMX-BF16')
  return None


def _none_agreed(verdicts: dict, what: str) -> str:
  return (f'no {what} loop computed its first-use check product right (' +
          '; '.join(f'{loop}: {reason}' for loop, reason in verdicts.items()) + ')')


def loop_verdicts(dtype=jnp.bfloat16) -> dict:
  """The `dtype` loops' first-use checks so far (`loop_check`; asking `loops()` or
  `f32_loops()` runs them): loop -> None (right) or what was wrong; the bfloat16 stand-ins
  apart from the real loops."""
  if _is_f32(dtype):
    return _state.setdefault('f32_verdicts', {})
  return _state.setdefault(('verdicts', int8_kernel.loops_emulated()), {})


def _check_loop(loop: str, dtype) -> Optional[str]:
  """`loop_check`'s product in `loop` of the `dtype` kernel (bfloat16: from float32 and
  from bfloat16 inputs, and bfloat16 inputs read in place: 64 of them, no padding), against
  NumPy's: None where it is right, else what differs."""
  problems = [(loop_check.integer_problem(-4, 4), (np.float32,) if _is_f32(dtype) else
               (np.float32, jnp.bfloat16))]
  if not _is_f32(dtype):
    problems.append((loop_check.integer_problem(-4, 4, inputs=K_MULTIPLE * 2),
                     (jnp.bfloat16,)))
  for (x, w, b, expected), x_dtypes in problems:
    run = lambda w_packed, b, *xs: [product(x, w_packed, b, loop=loop) for x in xs]
    for got in loop_check.run_apart(run, pack_weights(w.astype(np.float32), dtype),
                                    b.astype(np.float32), *(x.astype(t) for t in x_dtypes)):
      wrong = loop_check.mismatch(expected.astype(np.float32), got)
      if wrong:
        return wrong
  return None


def check_f32_loop(loop: str) -> Optional[str]:
  return _check_loop(loop, jnp.float32)


def check_bf16_loop(loop: str) -> Optional[str]:
  return _check_loop(loop, jnp.bfloat16)


def available(dtype=jnp.bfloat16, log=None) -> bool:
  """Whether the kernel's `dtype` (float32 or bfloat16) products run here: the library builds
  (`int8_kernel.available`: x86-64 with AVX2 and FMA) and, for bfloat16, the CPU has one of
  its loops."""
  return int8_kernel.available(log) and unavailable_reason(dtype) is None


def f32_loops() -> tuple:
  """The float32 loops this CPU runs, slowest first: 'avx2' wherever the kernel builds,
  'avx512' with AVX-512 F, BW, VL and DQ."""
  if not int8_kernel.available():
    return ()
  if 'f32_loops' not in _state:
    avx512 = int8_kernel.AVX512_FLAGS <= cpu_features.cpu_flags()
    # Offered while they compute their first-use checks (`loop_check`), then those right.
    _state['f32_loops'] = ('avx2', 'avx512') if avx512 else ('avx2',)
    _state['f32_loops'] = loop_check.agreeing(
        _state['f32_loops'], f'{__name__}:check_f32_loop', loop_verdicts(jnp.float32),
        'float32', int8_kernel.apart())
  return _state['f32_loops']


def f32_isa() -> str:
  """Which float32 loop runs here: the fastest of `f32_loops()`. SEG_F32_KERNEL_ISA=avx2|avx512
  forces one (an error where the CPU lacks it)."""
  return _chosen('SEG_F32_KERNEL_ISA', F32_LOOPS, f32_loops(), 'this CPU', jnp.float32,
                 loop_verdicts(jnp.float32))


def _chosen(variable: str, names, have: tuple, offers: str, dtype, verdicts: dict) -> str:
  """The loop `variable` names (one of `names`; an error where it is not in `have`, saying
  why where it failed its first-use check, `verdicts`), or the fastest of `have` (the last)
  when it is unset or 'auto'."""
  wanted = os.environ.get(variable, 'auto') or 'auto'
  if wanted != 'auto' and wanted not in names:
    raise ValueError(f"{variable} must be auto, {', '.join(names)}, got {wanted!r}")
  if not have:
    raise RuntimeError(f'the {jnp.dtype(dtype).name} kernel is unavailable: '
                       f'{unavailable_reason(dtype)}')
  if wanted != 'auto' and wanted not in have:
    raise RuntimeError(f'{variable}={wanted}, but {offers} offers only {", ".join(have)}'
                       f'{loop_check.refused(verdicts, wanted)}')
  return have[-1] if wanted == 'auto' else wanted


def built(loop: str) -> bool:
  """Whether the library has bfloat16 loop `loop` (compilers before GCC 10 / clang 9 have no
  AVX-512 BF16 intrinsics, before GCC 11 / clang 12 no AMX ones) and this CPU runs its
  instructions."""
  return (int8_kernel.available() and
          int8_kernel._state['lib'].SegFloatHasLoop(ctypes.c_int(LOOPS[loop])) == 1)


def loops(flags=None) -> tuple:
  """The bfloat16 loops this CPU can run, slowest first: 'avx512bf16', 'amx' (amx_bf16, where
  Linux grants this process the tile registers). With `int8_kernel.emulate_loops` on, 'amx'
  is offered where its stand-in runs (AVX-512 F, BW, VL, DQ), and only there."""
  if flags is None:
    key = ('loops', int8_kernel.loops_emulated())
    if key not in _state:
      # Offered while they compute their first-use checks (`loop_check`), then those right.
      _state[key] = loops(cpu_features.cpu_flags())
      _state[key] = loop_check.agreeing(_state[key], f'{__name__}:check_bf16_loop',
                                        loop_verdicts(), 'bfloat16',
                                        int8_kernel.apart())
    return _state[key]
  flags = frozenset(flags)
  if not int8_kernel.available():
    return ()
  found = []
  if BF16_FLAGS <= flags and built('avx512bf16'):
    found.append('avx512bf16')
  if int8_kernel.loops_emulated():
    amx = int8_kernel.EMULATED['amx'] <= flags
  else:
    amx = 'amx_bf16' in flags and int8_kernel._state['lib'].SegAmxPermitted() == 1
  if amx and built('amx'):
    found.append('amx')
  return tuple(found)


def isa() -> str:
  """Which bfloat16 loop runs here: the fastest of `loops()`. SEG_BF16_KERNEL_ISA=avx512bf16|amx
  forces one (an error where the CPU lacks it)."""
  return _chosen('SEG_BF16_KERNEL_ISA', LOOPS, loops(), 'this CPU or Linux', jnp.bfloat16,
                 loop_verdicts())


def pack_weights(w: np.ndarray, dtype=jnp.bfloat16) -> np.ndarray:
  """[in, out] float -> the kernel's layout for `dtype`'s products, 1-D, in panels of 16
  output channels (panel p: channels 16p..16p+15, zeros beyond `out`; float_product.h).

  bfloat16: uint16 (bfloat16 bits, rounded to nearest even as `astype(jnp.bfloat16)`), in' x
  ceil(out / 16) x 16 with in' = in rounded up to 32 with zero weights; inside a panel, for
  each pair of inputs, 16 channels x 2 inputs. float32: float32, ceil(out / 16) x in x 16.
  """
  w = np.asarray(w)
  if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) and w.dtype != jnp.bfloat16:
    raise ValueError(f'expected [in, out] float weights, got {w.dtype} {w.shape}')
  k, n = w.shape
  panels = -(-n // PANEL)
  if _is_f32(dtype):
    padded = np.zeros((k, panels * PANEL), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2)).reshape(-1)
  kp = -(-k // K_MULTIPLE) * K_MULTIPLE
  padded = np.zeros((kp, panels * PANEL), jnp.bfloat16)
  padded[:k, :n] = w.astype(jnp.bfloat16)
  # [k'/2, 2, panels, 16] -> [panels, k'/2, 16, 2]
  return np.ascontiguousarray(
      padded.reshape(kp // 2, 2, panels, PANEL).transpose(2, 0, 3, 1)).reshape(-1).view(
          np.uint16)


def packed_size(k: int, n: int, dtype) -> int:
  """Elements of `pack_weights`' output for [k, n] weights and `dtype`."""
  kp = k if _is_f32(dtype) else -(-k // K_MULTIPLE) * K_MULTIPLE
  return kp * -(-n // PANEL) * PANEL


def _loop_of(w_packed: jax.Array, loop: Optional[str]) -> Tuple[str, int]:
  """(loop name, the kernel's `isa` attribute) for packed weights (their dtype says the
  precision) and `loop` (bfloat16: one of `loops()`, default `isa()`; float32: one of
  `f32_loops()`, default `f32_isa()`)."""
  if w_packed.dtype == jnp.float32:
    if not available(jnp.float32):
      raise RuntimeError(f'the float32 kernel is unavailable: '
                         f'{unavailable_reason(jnp.float32)}')
    loop = loop or f32_isa()
    if loop not in f32_loops():
      raise ValueError(f"float32 loop {loop!r} is not one of this CPU's: {f32_loops()}")
    return loop, F32_LOOPS[loop]
  if w_packed.dtype != jnp.uint16:
    raise ValueError(f'packed weights are float32 or uint16 (bfloat16 bits), got '
                     f'{w_packed.dtype}')
  if not available():
    raise RuntimeError(f'the bfloat16 kernel is unavailable: {unavailable_reason()}')
  loop = loop or isa()
  if loop not in loops():
    raise ValueError(f"loop {loop!r} is not one of this CPU's: {loops()}")
  return loop, LOOPS[loop]


def _check_packed(w_packed: jax.Array, k: int, n: int) -> None:
  expected = packed_size(k, n, jnp.float32 if w_packed.dtype == jnp.float32 else jnp.bfloat16)
  if w_packed.shape != (expected,):
    raise ValueError(f'packed {w_packed.dtype} weights for {k} inputs and {n} outputs are '
                     f'({expected},), got {w_packed.shape}')


def product(x: jax.Array, w_packed: jax.Array, bias: jax.Array, mode: str = 'linear',
            residual: Optional[jax.Array] = None, loop: Optional[str] = None) -> jax.Array:
  """act(x @ w + bias) (+ residual) over x's last axis, float32, in the kernel (CPU), in the
  packed weights' precision: float32, or bfloat16 (x rounded to bfloat16 inside).

  x: [..., in] float32, or bfloat16 with bfloat16 weights (the same numbers as x in float32
  holding those values: the kernel's rounding leaves them as they are); w_packed:
  `pack_weights`; bias: float32 [out]; mode: 'linear', 'relu6' or 'relu'; residual:
  float32 [..., out], 'linear' only, added after the bias. loop: one of `loops()` for
  bfloat16 weights (default `isa()`), of `f32_loops()` for float32 ones (default
  `f32_isa()`).
  """
  loop, isa_value = _loop_of(w_packed, loop)
  if mode not in MODES:
    raise ValueError(f'mode must be one of {sorted(MODES)}, got {mode!r}')
  if residual is not None and mode != 'linear':
    raise ValueError(f"a residual is mode 'linear's, not {mode!r}")
  k, n = x.shape[-1], bias.shape[0]
  _check_packed(w_packed, k, n)
  shape = x.shape[:-1] + (n,)
  if residual is not None and residual.shape != shape:
    raise ValueError(f'the residual must be {shape}, got {residual.shape}')
  residual = (jnp.zeros((0,), jnp.float32) if residual is None else
              residual.astype(jnp.float32))
  if x.dtype == jnp.bfloat16 and w_packed.dtype == jnp.float32:
    raise ValueError('a bfloat16 x goes with bfloat16 weights (pack_weights)')
  call = jax.ffi.ffi_call(int8_kernel._target(TARGET, loop),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  x = x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)
  return call(x, w_packed, bias.astype(jnp.float32), residual,
              mode=np.int32(MODES[mode]), isa=np.int32(isa_value))


# (stride, dilation) pairs the depthwise loop is compiled for (the int8 engine's).
DEPTHWISE_STRIDES = int8_kernel.DEPTHWISE_STRIDES


def depthwise_supported(channels: int, loop: Optional[str] = None) -> bool:
  """Whether the depthwise loop of float32 `loop` (default `f32_isa()`) takes `channels`: the
  AVX-512 loop any number, the AVX2 loop multiples of 8."""
  return (loop or f32_isa()) == 'avx512' or channels % int8_kernel.DEPTHWISE_CHANNELS == 0


def _out_dtype(out_dtype, wide: bool):
  """The output dtype of a float32 depthwise or stem pass: float32, or bfloat16 (rounded to
  nearest even as the bfloat16 products round their inputs) from the AVX-512 loops."""
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f'out_dtype is float32 or bfloat16, got {out_dtype}')
  if out_dtype == jnp.bfloat16 and not wide:
    raise ValueError('a bfloat16 output needs the AVX-512 loops')
  return out_dtype


def depthwise(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, dilation: int,
              loop: Optional[str] = None, out_dtype=jnp.float32) -> jax.Array:
  """relu6(3x3 depthwise 'SAME' conv(x, w) + b), float32 in and out, in the kernel's loop for
  float32 `loop` (default `f32_isa()`): XLA's float32 taps
  (`seg.inference.forward._depthwise`), summed in one fixed order with one rounding per tap
  (fused multiply-adds), so results may differ from XLA's by a rounding now and then; both
  loops give the same numbers.

  x: [n, h, w, c] float32 (c: `depthwise_supported`); w: [3, 3, c]; b: [c]; (stride,
  dilation) in `DEPTHWISE_STRIDES`. Returns [n, ceil(h / stride), ceil(w / stride), c] in
  `out_dtype`: float32, or bfloat16 (the AVX-512 loop: each output rounded to nearest even,
  the input of a bfloat16 `product` that computes what it would from the float32 output).
  """
  from seg.model.layers import same_padding
  if not available(jnp.float32):
    raise RuntimeError(f'the float32 kernel is unavailable: {unavailable_reason(jnp.float32)}')
  loop = loop or f32_isa()
  if loop not in f32_loops():
    raise ValueError(f"float32 loop {loop!r} is not one of this CPU's: {f32_loops()}")
  n, h, wd, c = x.shape
  if w.shape != (3, 3, c) or b.shape != (c,) or (stride, dilation) not in DEPTHWISE_STRIDES:
    raise ValueError(f'3x3 weights [3, 3, {c}], a bias [{c}] and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES} only, got {w.shape}, {b.shape}, '
                     f'({stride}, {dilation})')
  if not depthwise_supported(c, loop):
    raise ValueError(f'the {loop} depthwise loop takes channels in multiples of '
                     f'{int8_kernel.DEPTHWISE_CHANNELS}, got {c}')
  out = jax.ShapeDtypeStruct((n, -(-h // stride), -(-wd // stride), c),
                             _out_dtype(out_dtype, loop == 'avx512'))
  return jax.ffi.ffi_call(int8_kernel._TARGETS['SegF32Depthwise'], out)(
      x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32),
      stride=np.int32(stride), dilation=np.int32(dilation),
      pad_top=np.int32(same_padding(h, 3, stride, dilation)[0]),
      pad_left=np.int32(same_padding(wd, 3, stride, dilation)[0]), wide=loop == 'avx512')


def expand_depthwise(x: jax.Array, w_packed: jax.Array, bias: jax.Array, wd: jax.Array,
                     bd: jax.Array, stride: int, dilation: int,
                     loop: Optional[str] = None, out_dtype=jnp.float32,
                     project: Optional[Tuple[jax.Array, jax.Array]] = None,
                     residual: Optional[jax.Array] = None) -> jax.Array:
  """`depthwise(product(x, w_packed, bias, 'relu6'), wd, bd, stride, dilation, out_dtype=...)`
  in one pass over bands of rows (float_kernel.cc): the same numbers, without the
  expansion's output going to memory. x: [n, h, w, in] float32; the rest as `product`'s and
  `depthwise`'s (a bfloat16 output: the loops other than float32's avx2).

  project: (packed weights, bias) of the projection after the depthwise layer, which then
  runs in the same pass (`depthwise_project`'s numbers), with `residual` (float32, its
  output's shape) added: returns its float32 output [n, oh, ow, out] instead."""
  from seg.model.layers import same_padding
  loop, isa_value = _loop_of(w_packed, loop)
  n, h, wdt, k = x.shape
  e = bias.shape[0]
  _check_packed(w_packed, k, e)
  if wd.shape != (3, 3, e) or bd.shape != (e,) or (stride, dilation) not in DEPTHWISE_STRIDES:
    raise ValueError(f'3x3 weights [3, 3, {e}], a bias [{e}] and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES} only, got {wd.shape}, {bd.shape}, '
                     f'({stride}, {dilation})')
  if loop == 'avx2' and not depthwise_supported(e, loop):  # (the other loops: AVX-512's)
    raise ValueError(f'the avx2 depthwise loop takes channels in multiples of '
                     f'{int8_kernel.DEPTHWISE_CHANNELS}, got {e}')
  oh, ow = -(-h // stride), -(-wdt // stride)
  if project is None:
    if residual is not None:
      raise ValueError('a residual goes with a projection')
    pw, pb = jnp.zeros((0,), w_packed.dtype), jnp.zeros((0,), jnp.float32)
    out = jax.ShapeDtypeStruct((n, oh, ow, e), _out_dtype(out_dtype, loop != 'avx2'))
  else:
    pw, pb = project
    if pw.dtype != w_packed.dtype:
      raise ValueError('the projection\'s weights are packed as the expansion\'s')
    _check_packed(pw, e, pb.shape[0])
    out = jax.ShapeDtypeStruct((n, oh, ow, pb.shape[0]), jnp.float32)
  if residual is not None and residual.shape != out.shape:
    raise ValueError(f'the residual must be {out.shape}, got {residual.shape}')
  residual = (jnp.zeros((0,), jnp.float32) if residual is None else
              residual.astype(jnp.float32))
  return jax.ffi.ffi_call(int8_kernel._target('SegFloatExpandDepthwise', loop), out)(
      x.astype(jnp.float32), w_packed, bias.astype(jnp.float32), wd.astype(jnp.float32),
      bd.astype(jnp.float32), pw, jnp.asarray(pb, jnp.float32), residual,
      isa=np.int32(isa_value), stride=np.int32(stride),
      dilation=np.int32(dilation), pad_top=np.int32(same_padding(h, 3, stride, dilation)[0]),
      pad_left=np.int32(same_padding(wdt, 3, stride, dilation)[0]))


def depthwise_project(x: jax.Array, wd: jax.Array, bd: jax.Array, stride: int, dilation: int,
                      w_packed: jax.Array, bias: jax.Array,
                      residual: Optional[jax.Array] = None,
                      loop: Optional[str] = None) -> jax.Array:
  """`product(depthwise(x, wd, bd, stride, dilation), w_packed, bias, residual=residual)` in
  one pass over chunks of rows (float_kernel.cc), the same numbers (the bfloat16 loops: as
  with `depthwise`'s bfloat16 output), the depthwise output never in memory. x: [n, h, w,
  c] float32; `loop` as `product`'s, which also chooses the depthwise loop (AVX-512 but for
  float32's avx2, which takes c in multiples of 8); residual: float32, the output's shape.
  Returns float32 [n, ceil(h / stride), ceil(w / stride), out]."""
  from seg.model.layers import same_padding
  loop, isa_value = _loop_of(w_packed, loop)
  n, h, wdt, c = x.shape
  if wd.shape != (3, 3, c) or bd.shape != (c,) or (stride, dilation) not in DEPTHWISE_STRIDES:
    raise ValueError(f'3x3 weights [3, 3, {c}], a bias [{c}] and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES} only, got {wd.shape}, {bd.shape}, '
                     f'({stride}, {dilation})')
  if loop == 'avx2' and not depthwise_supported(c, loop):
    raise ValueError(f'the avx2 depthwise loop takes channels in multiples of '
                     f'{int8_kernel.DEPTHWISE_CHANNELS}, got {c}')
  _check_packed(w_packed, c, bias.shape[0])
  shape = (n, -(-h // stride), -(-wdt // stride), bias.shape[0])
  if residual is not None and residual.shape != shape:
    raise ValueError(f'the residual must be {shape}, got {residual.shape}')
  residual = (jnp.zeros((0,), jnp.float32) if residual is None else
              residual.astype(jnp.float32))
  return jax.ffi.ffi_call(int8_kernel._target('SegFloatDepthwiseProject', loop),
                          jax.ShapeDtypeStruct(shape, jnp.float32))(
      x.astype(jnp.float32), wd.astype(jnp.float32), bd.astype(jnp.float32), w_packed,
      bias.astype(jnp.float32), residual, isa=np.int32(isa_value), stride=np.int32(stride),
      dilation=np.int32(dilation), pad_top=np.int32(same_padding(h, 3, stride, dilation)[0]),
      pad_left=np.int32(same_padding(wdt, 3, stride, dilation)[0]))


def stem_supported(images_shape, stem_w_shape) -> bool:
  """Whether `stem` takes images of `images_shape` [n, h, w, 3] and a stem [3, 3, 3, c]: the
  int8 kernel's stem pass (`int8_kernel.stem_supported`: c a multiple of 8)."""
  return int8_kernel.stem_supported(images_shape, stem_w_shape)


def stem(images: jax.Array, ws: jax.Array, bs: jax.Array, wd: jax.Array,
         bd: jax.Array, loop: Optional[str] = None, out_dtype=jnp.float32,
         sizes: Optional[jax.Array] = None) -> jax.Array:
  """relu6(depthwise(relu6(stem conv(images, ws) + bs), wd) + bd) in one pass (CPU): the stem
  (3x3, stride 2, 'SAME') and block 0's depthwise layer, float32 in and out, XLA's float32
  taps of `forward._stem` and `forward._depthwise` summed in one fixed order, in the loops of
  float32 `loop` (default `f32_isa()`; the AVX-512 ones where c is a multiple of 16): the
  same numbers either way.

  images: [n, h, w, 3] float32, or uint8 pixels with their valid `sizes`
  (`int8_kernel.stem_images`: preprocessed as they are read); ws: [3, 3, 3, c]; bs, bd: [c];
  wd: [3, 3, c]; c a multiple of 8 (`stem_supported`). Returns [n, ceil(h / 2), ceil(w / 2),
  c] in `out_dtype`: float32, or bfloat16 (rounded as `depthwise`'s; the AVX-512 loops, c a
  multiple of 16).
  """
  from seg.model.layers import same_padding
  if not available(jnp.float32):
    raise RuntimeError(f'the float32 kernel is unavailable: {unavailable_reason(jnp.float32)}')
  images, sizes = int8_kernel.stem_images(images, sizes, ws.shape)
  loop = loop or f32_isa()
  if loop not in f32_loops():
    raise ValueError(f"float32 loop {loop!r} is not one of this CPU's: {f32_loops()}")
  n, h, w, _ = images.shape
  c = ws.shape[3]
  out = jax.ShapeDtypeStruct((n, -(-h // 2), -(-w // 2), c),
                             _out_dtype(out_dtype, loop == 'avx512' and c % 16 == 0))
  # The int8 engine's stem pass writing float32 or bfloat16 (its scale unused).
  return jax.ffi.ffi_call(int8_kernel.STEM_TARGET, out)(
      images, sizes, ws.astype(jnp.float32), bs.astype(jnp.float32),
      wd.astype(jnp.float32), bd.astype(jnp.float32), jnp.ones((), jnp.float32),
      pad_top=np.int32(same_padding(h, 3, 2, 1)[0]),
      pad_left=np.int32(same_padding(w, 3, 2, 1)[0]), wide=loop == 'avx512')


def stem_project(images: jax.Array, ws: jax.Array, bs: jax.Array, wd: jax.Array, bd: jax.Array,
                 w_packed: jax.Array, bias: jax.Array, loop: Optional[str] = None,
                 sizes: Optional[jax.Array] = None) -> jax.Array:
  """`product(stem(images, ws, bs, wd, bd), w_packed, bias)` in one pass (CPU): the stem pass
  and block 0's projection (no activation) over chunks of rows, the stem pass's output never
  in memory; the same numbers as the two calls (the bfloat16 loops: as with `stem`'s
  bfloat16 output). `loop` as `product`'s, which also chooses the stem pass's loops (AVX-512
  but for float32's avx2); images, ws, bs, wd, bd, sizes as `stem`'s (the bfloat16 loops: c
  a multiple of 16). Returns float32 [n, ceil(h / 2), ceil(w / 2), out]."""
  from seg.model.layers import same_padding
  loop, isa_value = _loop_of(w_packed, loop)
  images, sizes = int8_kernel.stem_images(images, sizes, ws.shape)
  n, h, w, _ = images.shape
  c = ws.shape[3]
  if w_packed.dtype == jnp.uint16 and c % 16:
    raise ValueError(f'the bfloat16 loops take the stem\'s channels in multiples of 16, got {c}')
  _check_packed(w_packed, c, bias.shape[0])
  out = jax.ShapeDtypeStruct((n, -(-h // 2), -(-w // 2), bias.shape[0]), jnp.float32)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return jax.ffi.ffi_call(int8_kernel._target('SegFloatStemProject', loop), out)(
      images, sizes, f32(ws), f32(bs), f32(wd), f32(bd), jnp.ones((), jnp.float32), w_packed,
      f32(bias), pad_top=np.int32(same_padding(h, 3, 2, 1)[0]),
      pad_left=np.int32(same_padding(w, 3, 2, 1)[0]), isa=np.int32(isa_value))


def mean(x: jax.Array) -> jax.Array:
  """x [n, h, w, c] float32 -> [n, c]: the mean over rows and columns in the kernel (CPU),
  the float32 sum in row-major order over pixels divided by their count (XLA's `jnp.mean`
  sums in another order: the same value but for roundings). A custom call, not an XLA
  reduction: a network of kernels and no XLA arithmetic runs inline on the calling thread
  (XLA's CPU client does so for programs of under 1000 flops by its count), without the
  asynchronous dispatch's ~0.3 ms per call (docs/performance.md)."""
  if not available(jnp.float32):
    raise RuntimeError(f'the float32 kernel is unavailable: {unavailable_reason(jnp.float32)}')
  if x.ndim != 4 or x.shape[1] * x.shape[2] == 0:
    raise ValueError(f'x is [n, h, w, c] with pixels, got {x.shape}')
  out = jax.ShapeDtypeStruct((x.shape[0], x.shape[3]), jnp.float32)
  return jax.ffi.ffi_call(int8_kernel._TARGETS['SegFloatMean'], out)(x.astype(jnp.float32))


def upsampled_argmax(logits: jax.Array, height: int, width: int) -> jax.Array:
  """The class map: argmax over classes of `logits` [n, fh, fw, classes] (float32, at most 256
  classes) resized to [height, width] with aligned corners, as
  `argmax(seg.model.layers.resize_bilinear(logits, (height, width)))` -> uint8 [n, height,
  width], in the kernel (CPU), row by row: the upsampled logits never go to memory.

  Each output is NumPy's float32 arithmetic on the rows-then-columns formula of
  `seg.predict.upsampling.upsampled_logits` bit for bit (float_kernel.cc), argmax'ed with
  ties to the lower class; XLA's resize sums the same two terms in its own order, so a
  pixel whose two best classes tie to a rounding may differ from XLA's class map.
  """
  from seg.model.layers import align_corners_taps
  if not available(jnp.float32):
    raise RuntimeError(f'the float32 kernel is unavailable: {unavailable_reason(jnp.float32)}')
  if logits.ndim != 4 or not 1 <= logits.shape[3] <= 256:
    raise ValueError(f'logits are [n, fh, fw, classes] with 1 to 256 classes, got '
                     f'{logits.shape}')
  rows = align_corners_taps(height, logits.shape[1])
  cols = align_corners_taps(width, logits.shape[2])
  out = jax.ShapeDtypeStruct((logits.shape[0], height, width), jnp.uint8)
  return jax.ffi.ffi_call(int8_kernel._TARGETS['SegUpsampledArgmax'], out)(
      logits.astype(jnp.float32), rows[0].astype(np.int32), rows[1], cols[0].astype(np.int32),
      cols[1])


def class_map_blocks(features: np.ndarray, row_taps, col_taps, block: int) -> np.ndarray:
  """One image's class map in the kernel, on the calling thread (the GIL released): logits
  `features` [fh, fw, classes] (at most 256) taken to the taps' size (`row_taps`, `col_taps`:
  (lo, frac) per output row and column, `seg.model.layers.align_corners_taps`'s form) and
  their argmax, by blocks: the classes at every `block`-th row and column (and both sides of
  every cell line) first, then pixel by pixel only the blocks whose corners disagree, as
  `seg.predict.upsampling.class_map` does in NumPy. -> uint8 [rows, columns].

  Every pixel it computes is `upsampled_argmax`'s (NumPy's float32 arithmetic, bit for bit);
  a block takes its corners' class, which the bilinear rule makes exact but for a pixel
  whose two best classes tie to a rounding.
  """
  if not available(jnp.float32):
    raise RuntimeError(f'the float32 kernel is unavailable: {unavailable_reason(jnp.float32)}')
  features = np.ascontiguousarray(features, np.float32)
  if features.ndim != 3 or not 1 <= features.shape[2] <= 256 or block < 1:
    raise ValueError(f'features are [fh, fw, classes] with 1 to 256 classes and block >= 1, '
                     f'got {features.shape} and {block}')
  fh, fw, classes = features.shape
  taps = []
  for (lo, frac), cells in ((row_taps, fh), (col_taps, fw)):
    lo = np.ascontiguousarray(lo, np.int32)
    frac = np.ascontiguousarray(frac, np.float32)
    if lo.shape != frac.shape or lo.ndim != 1 or len(lo) == 0 or lo.min() < 0 or \
        lo.max() >= cells or np.any(np.diff(lo) < 0):
      raise ValueError('taps are (lo, frac) of one length, lo ascending on the feature grid')
    taps.append((lo, frac))
  (row_lo, row_t), (col_lo, col_t) = taps
  out = np.empty((len(row_lo), len(col_lo)), np.uint8)
  pointer = lambda a: a.ctypes.data_as(ctypes.c_void_p)
  size = ctypes.c_int64
  int8_kernel._state['lib'].SegClassMapBlocks(
      pointer(features), size(fh), size(fw), size(classes), size(out.shape[0]),
      size(out.shape[1]), pointer(row_lo), pointer(row_t), pointer(col_lo), pointer(col_t),
      size(block), pointer(out))
  return out


def pack_folded(folded, dtype=jnp.bfloat16):
  """Folded float32 params (`seg.inference.fold.fold_variables`, NumPy) with every 1x1
  product's weights also packed for `dtype`'s products in the kernel ('wp' beside 'w'; the
  concat projection's as head['proj_branches_wp'] and head['proj_pool_wp'], the image
  pooling's too): what `seg.inference.forward` runs in the
  kernel with that dtype. The float32 'w' stay: for bfloat16's products below its stride,
  and for exports (`unpacked`)."""
  def packed(layer):
    return dict(layer, wp=pack_weights(layer['w'], dtype))
  blocks = [{name: packed(layer) if name in ('expand', 'project') else layer
             for name, layer in block.items()} for block in folded['blocks']]
  head = dict(folded['head'], aspp0=packed(folded['head']['aspp0']),
              logits=packed(folded['head']['logits']), pool=packed(folded['head']['pool']),
              proj_branches_wp=pack_weights(folded['head']['proj_branches'], dtype),
              proj_pool_wp=pack_weights(folded['head']['proj_pool'], dtype))
  return dict(folded, blocks=blocks, head=head)


def unpacked(folded):
  """`pack_folded`'s params without the packed weights: what XLA's formulation runs."""
  def strip(layer):
    return {k: v for k, v in layer.items() if k != 'wp'} if isinstance(layer, dict) else layer
  blocks = [{name: strip(layer) for name, layer in block.items()} for block in folded['blocks']]
  head = {name: strip(layer) for name, layer in folded['head'].items()
          if name not in ('proj_branches_wp', 'proj_pool_wp')}
  return dict(folded, blocks=blocks, head=head)
