"""The bfloat16 engine's own kernels: 1x1 products in AVX-512 BF16 or AMX-BF16 tiles, float32
activations in and out (`bf16_product.h`), and the float32 layers between them.

    if bf16_kernel.available():                    # the int8 kernels' library, built once
      wp = bf16_kernel.pack_weights(w)             # [in, out] float32 -> packed bfloat16
      y = bf16_kernel.product(x, wp, b, mode='relu6')   # inside jit, on a CPU
      y = bf16_kernel.depthwise(y, wd, bd, stride, dilation)         # float32, ReLU6
      y = bf16_kernel.expand_depthwise(x, wp, b, wd, bd, stride, dilation)   # both, one pass
      y0 = bf16_kernel.stem(images, ws, bs, wd0, bd0)   # stem + block 0's depthwise layer

XLA's bfloat16 engine rounds whole tensors to bfloat16 in passes over memory before its
products, which made bfloat16 slower than float32 on the memory-bound high-resolution layers
of a CPU (docs/performance.md, "bfloat16"); this kernel rounds a block of rows in the core's
cache on its way into the product and adds bias, activation and residual in its output
loop, so any product can run in bfloat16 at no extra pass. The numbers are XLA's bfloat16
formulation's (inputs and weights rounded to bfloat16 to nearest even, exact products,
float32 sums) up to the order of the sums. The depthwise layers and the stem are the int8
engine's AVX-512 loops (`int8_depthwise.h`, `int8_stem.h`) with float32 in and out: XLA's
float32 taps, summed in one fixed order (`bf16_kernel.cc`).

It is compiled into the library of `seg.inference.int8_kernel` (`build`), and runs where the
CPU has AVX-512 BF16 (`avx512_bf16`: Intel Xeons since Cooper Lake, AMD Zen 4 and later) or
AMX-BF16 tiles (`amx_bf16`, Intel Xeons since Sapphire Rapids); elsewhere `available()` is
False and the engine keeps XLA's bfloat16. `int8_kernel.emulate_loops` stands in for the
AMX tiles on CPUs with AVX-512 (tests). Exports (`jax.export`) never contain it.
"""

import ctypes
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from seg.inference import cpu_features, int8_kernel

TARGET = 'SegBf16Product'  # int8_kernel._TARGETS' key
PANEL = 16       # output channels per weight panel (bf16_product.h: kPanel)
K_MULTIPLE = 32  # inputs per AMX tile product; weights are packed to a multiple of it
MODES = {'linear': 0, 'relu6': 1, 'relu': 2}
# The kernel's loops (bf16_product.h: Isa), slowest first, and the CPU flags each needs.
LOOPS = {'avx512bf16': 0, 'amx': 1}
BF16_FLAGS = int8_kernel.AVX512_FLAGS | {'avx512_bf16'}
_state = {}


def unavailable_reason() -> Optional[str]:
  """Why `available()` is False (None when it is True)."""
  if not int8_kernel.available():
    return int8_kernel.unavailable_reason()
  if not loops():
    return 'the CPU has neither AVX-512 BF16 nor AMX-BF16'
  return None


def available(log=None) -> bool:
  """Whether the kernel runs here: the library builds (`int8_kernel.available`) and the CPU
  has one of its loops."""
  return int8_kernel.available(log) and bool(loops())


def built(loop: str) -> bool:
  """Whether the library has `loop` (compilers before GCC 10 / clang 9 have no AVX-512 BF16
  intrinsics, before GCC 11 / clang 12 no AMX ones) and this CPU runs its instructions."""
  return (int8_kernel.available() and
          int8_kernel._state['lib'].SegBf16HasLoop(ctypes.c_int(LOOPS[loop])) == 1)


def loops(flags=None) -> tuple:
  """The kernel's loops this CPU can run, slowest first: 'avx512bf16', 'amx' (amx_bf16, where
  Linux grants this process the tile registers). With `int8_kernel.emulate_loops` on, 'amx'
  is offered where its stand-in runs (AVX-512 F, BW, VL, DQ), and only there."""
  if flags is None:
    key = ('loops', int8_kernel.loops_emulated())
    if key not in _state:
      _state[key] = loops(cpu_features.cpu_flags())
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
  """Which loop runs here: the fastest of `loops()`. SEG_BF16_KERNEL_ISA=avx512bf16|amx forces
  one (an error where the CPU lacks it)."""
  wanted = os.environ.get('SEG_BF16_KERNEL_ISA', 'auto') or 'auto'
  if wanted != 'auto' and wanted not in LOOPS:
    raise ValueError(f"SEG_BF16_KERNEL_ISA must be auto, {', '.join(LOOPS)}, got {wanted!r}")
  have = loops()
  if not have:
    raise RuntimeError(f'the bfloat16 kernel is unavailable: {unavailable_reason()}')
  if wanted != 'auto' and wanted not in have:
    raise RuntimeError(f'SEG_BF16_KERNEL_ISA={wanted}, but this CPU or Linux offers only '
                       f'{", ".join(have)}')
  return have[-1] if wanted == 'auto' else wanted


def pack_weights(w: np.ndarray) -> np.ndarray:
  """[in, out] float -> the kernel's layout, 1-D uint16 (bfloat16 bits) of in' x
  ceil(out / 16) x 16, in' = in rounded up to 32 with zero weights.

  Rounded to bfloat16 to nearest even (as `astype(jnp.bfloat16)`). Panel p holds output
  channels 16p..16p+15 (zeros beyond `out`); inside it, for each pair of inputs, 16 channels
  x 2 inputs (bf16_product.h).
  """
  w = np.asarray(w)
  if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) and w.dtype != jnp.bfloat16:
    raise ValueError(f'expected [in, out] float weights, got {w.dtype} {w.shape}')
  k, n = w.shape
  panels = -(-n // PANEL)
  kp = -(-k // K_MULTIPLE) * K_MULTIPLE
  padded = np.zeros((kp, panels * PANEL), jnp.bfloat16)
  padded[:k, :n] = w.astype(jnp.bfloat16)
  # [k'/2, 2, panels, 16] -> [panels, k'/2, 16, 2]
  return np.ascontiguousarray(
      padded.reshape(kp // 2, 2, panels, PANEL).transpose(2, 0, 3, 1)).reshape(-1).view(
          np.uint16)


def product(x: jax.Array, w_packed: jax.Array, bias: jax.Array, mode: str = 'linear',
            residual: Optional[jax.Array] = None, loop: Optional[str] = None) -> jax.Array:
  """act(bf16(x) @ w + bias) (+ residual) over x's last axis, float32, in the kernel (CPU).

  x: [..., in] float32 (rounded to bfloat16 inside); w_packed: `pack_weights`; bias: float32
  [out]; mode: 'linear', 'relu6' or 'relu'; residual: float32 [..., out], 'linear' only,
  added after the bias. loop: one of `loops()` (default `isa()`).
  """
  if not available():
    raise RuntimeError(f'the bfloat16 kernel is unavailable: {unavailable_reason()}')
  if mode not in MODES:
    raise ValueError(f'mode must be one of {sorted(MODES)}, got {mode!r}')
  if residual is not None and mode != 'linear':
    raise ValueError(f"a residual is mode 'linear's, not {mode!r}")
  loop = loop or isa()
  if loop not in loops():
    raise ValueError(f"loop {loop!r} is not one of this CPU's: {loops()}")
  k, n = x.shape[-1], bias.shape[0]
  expected = -(-k // K_MULTIPLE) * K_MULTIPLE * -(-n // PANEL) * PANEL
  if w_packed.shape != (expected,) or w_packed.dtype != jnp.uint16:
    raise ValueError(f'packed weights for {k} inputs and {n} outputs are uint16 '
                     f'({expected},), got {w_packed.dtype} {w_packed.shape}')
  shape = x.shape[:-1] + (n,)
  if residual is not None and residual.shape != shape:
    raise ValueError(f'the residual must be {shape}, got {residual.shape}')
  residual = (jnp.zeros((0,), jnp.float32) if residual is None else
              residual.astype(jnp.float32))
  call = jax.ffi.ffi_call(int8_kernel._target(TARGET, loop),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  return call(x.astype(jnp.float32), w_packed, bias.astype(jnp.float32), residual,
              mode=np.int32(MODES[mode]), isa=np.int32(LOOPS[loop]))


# (stride, dilation) pairs the depthwise loop is compiled for (the int8 engine's).
DEPTHWISE_STRIDES = int8_kernel.DEPTHWISE_STRIDES


def depthwise(x: jax.Array, w: jax.Array, b: jax.Array, stride: int,
              dilation: int) -> jax.Array:
  """relu6(3x3 depthwise 'SAME' conv(x, w) + b), float32 in and out, in the kernel (a CPU
  with AVX-512 F, BW, VL and DQ, which every CPU `available()` is True on has): XLA's float32
  taps (`seg.inference.forward._depthwise`), summed in one fixed order with one rounding per
  tap (fused multiply-adds), so results may differ from XLA's by a rounding now and then.

  x: [n, h, w, c] float32 (any c); w: [3, 3, c]; b: [c]; (stride, dilation) in
  `DEPTHWISE_STRIDES`. Returns float32 [n, ceil(h / stride), ceil(w / stride), c].
  """
  from seg.model.layers import same_padding
  if not available():
    raise RuntimeError(f'the bfloat16 kernel is unavailable: {unavailable_reason()}')
  n, h, wd, c = x.shape
  if w.shape != (3, 3, c) or b.shape != (c,) or (stride, dilation) not in DEPTHWISE_STRIDES:
    raise ValueError(f'3x3 weights [3, 3, {c}], a bias [{c}] and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES} only, got {w.shape}, {b.shape}, '
                     f'({stride}, {dilation})')
  out = jax.ShapeDtypeStruct((n, -(-h // stride), -(-wd // stride), c), jnp.float32)
  return jax.ffi.ffi_call(int8_kernel._TARGETS['SegF32Depthwise'], out)(
      x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32),
      stride=np.int32(stride), dilation=np.int32(dilation),
      pad_top=np.int32(same_padding(h, 3, stride, dilation)[0]),
      pad_left=np.int32(same_padding(wd, 3, stride, dilation)[0]))


def expand_depthwise(x: jax.Array, w_packed: jax.Array, bias: jax.Array, wd: jax.Array,
                     bd: jax.Array, stride: int, dilation: int,
                     loop: Optional[str] = None) -> jax.Array:
  """`depthwise(product(x, w_packed, bias, 'relu6'), wd, bd, stride, dilation)` in one pass
  over bands of rows (bf16_kernel.cc): the same numbers, without the expansion's output
  going to memory. x: [n, h, w, in] float32; the rest as `product`'s and `depthwise`'s."""
  from seg.model.layers import same_padding
  if not available():
    raise RuntimeError(f'the bfloat16 kernel is unavailable: {unavailable_reason()}')
  loop = loop or isa()
  if loop not in loops():
    raise ValueError(f"loop {loop!r} is not one of this CPU's: {loops()}")
  n, h, wdt, k = x.shape
  e = bias.shape[0]
  expected = -(-k // K_MULTIPLE) * K_MULTIPLE * -(-e // PANEL) * PANEL
  if w_packed.shape != (expected,) or w_packed.dtype != jnp.uint16:
    raise ValueError(f'packed weights for {k} inputs and {e} outputs are uint16 '
                     f'({expected},), got {w_packed.dtype} {w_packed.shape}')
  if wd.shape != (3, 3, e) or bd.shape != (e,) or (stride, dilation) not in DEPTHWISE_STRIDES:
    raise ValueError(f'3x3 weights [3, 3, {e}], a bias [{e}] and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES} only, got {wd.shape}, {bd.shape}, '
                     f'({stride}, {dilation})')
  out = jax.ShapeDtypeStruct((n, -(-h // stride), -(-wdt // stride), e), jnp.float32)
  return jax.ffi.ffi_call(int8_kernel._target('SegBf16ExpandDepthwise', loop), out)(
      x.astype(jnp.float32), w_packed, bias.astype(jnp.float32), wd.astype(jnp.float32),
      bd.astype(jnp.float32), isa=np.int32(LOOPS[loop]), stride=np.int32(stride),
      dilation=np.int32(dilation), pad_top=np.int32(same_padding(h, 3, stride, dilation)[0]),
      pad_left=np.int32(same_padding(wdt, 3, stride, dilation)[0]))


def stem_supported(images_shape, stem_w_shape) -> bool:
  """Whether `stem` takes images of `images_shape` [n, h, w, 3] and a stem [3, 3, 3, c]: the
  int8 kernel's stem pass (`int8_kernel.stem_supported`) with c a multiple of 16."""
  return int8_kernel.stem_supported(images_shape, stem_w_shape) and stem_w_shape[3] % 16 == 0


def stem(images: jax.Array, ws: jax.Array, bs: jax.Array, wd: jax.Array,
         bd: jax.Array) -> jax.Array:
  """relu6(depthwise(relu6(stem conv(images, ws) + bs), wd) + bd) in one pass (CPU, AVX-512):
  the stem (3x3, stride 2, 'SAME') and block 0's depthwise layer, float32 in and out, XLA's
  float32 taps of `forward._stem` and `forward._depthwise` summed in one fixed order.

  images: [n, h, w, 3] float32; ws: [3, 3, 3, c]; bs, bd: [c]; wd: [3, 3, c]; c a multiple
  of 16 (`stem_supported`). Returns float32 [n, ceil(h / 2), ceil(w / 2), c].
  """
  from seg.model.layers import same_padding
  if not available():
    raise RuntimeError(f'the bfloat16 kernel is unavailable: {unavailable_reason()}')
  if not stem_supported(images.shape, ws.shape):
    raise ValueError(f'images [n, h, w, 3] and stem weights [3, 3, 3, c] with c a multiple '
                     f'of 16, got {images.shape}, {ws.shape}')
  n, h, w, _ = images.shape
  c = ws.shape[3]
  out = jax.ShapeDtypeStruct((n, -(-h // 2), -(-w // 2), c), jnp.float32)
  # The int8 engine's stem pass, its AVX-512 loops writing float32 (its scale unused).
  return jax.ffi.ffi_call(int8_kernel.STEM_TARGET, out)(
      images.astype(jnp.float32), ws.astype(jnp.float32), bs.astype(jnp.float32),
      wd.astype(jnp.float32), bd.astype(jnp.float32), jnp.ones((), jnp.float32),
      pad_top=np.int32(same_padding(h, 3, 2, 1)[0]),
      pad_left=np.int32(same_padding(w, 3, 2, 1)[0]), wide=True)


def pack_folded(folded):
  """Folded float32 params (`seg.inference.fold.fold_variables`, NumPy) with every 1x1
  product's weights also packed for the kernel ('wp' beside 'w'; the concat projection's as
  head['proj_branches_wp']): what `seg.inference.forward` runs in the kernel with
  dtype=bfloat16. The float32 'w' stay, for the products below the bfloat16 stride."""
  def packed(layer):
    return dict(layer, wp=pack_weights(layer['w']))
  blocks = [{name: packed(layer) if name in ('expand', 'project') else layer
             for name, layer in block.items()} for block in folded['blocks']]
  head = dict(folded['head'], aspp0=packed(folded['head']['aspp0']),
              logits=packed(folded['head']['logits']),
              proj_branches_wp=pack_weights(folded['head']['proj_branches']))
  return dict(folded, blocks=blocks, head=head)
