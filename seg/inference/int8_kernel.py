"""The int8 engine's own kernels: the 1x1 products (AVX2 loops, AVX-VNNI, AVX-512 VNNI or AMX
tiles where the CPU has them) and the depthwise layers between an expansion and its
projection.

    if int8_kernel.available():                     # builds and registers them once
      wp = int8_kernel.pack_weights(w_int8)        # [in, out] int8 -> packed, 1-D
      y = int8_kernel.product(xq, wp, scale, bias, mode='relu6')   # inside jit, on a CPU
      q = int8_kernel.depthwise(y_uint8, w, b, stride, dilation, inv_out)   # uint8 -> uint8
      q = int8_kernel.expand_depthwise(xq, wp, scale, bias, inv_mid, w, b, stride, dilation,
                                       inv_out)         # both in one pass
      q0 = int8_kernel.stem(images, ws, bs, wd, bd, inv_out)    # float32 image -> uint8

On CPUs with AVX2 and FMA but no int8 dot instructions XLA's int8 products run no faster
than its float32 ones; on every CPU the quantise / dequantise around XLA's products is
separate passes over memory (docs/performance.md, "int8"). On CPUs with AVX-VNNI or
AVX-512 VNNI the kernel multiplies with their dot-product instructions, on CPUs with AMX
(`amx_int8`) in tiles (`isa()`); `emulate_loops` stands in for AVX-VNNI and AMX on CPUs
without them (tests). `int8_product.h` multiplies uint8 or int8 activations by packed int8
weights into exact int32 sums and applies scale, bias, the activation and (mode
'relu6_uint8') the rounding to the next layer's uint8 input in the same loop: the numbers
of XLA's int8 formulation, from a third of the memory traffic.
`int8_depthwise.cc` takes an expansion's uint8 output through the 3x3 depthwise layer,
ReLU6 and the rounding to the projection's uint8 input in one pass (or, `expand_depthwise`,
the expansion and that layer in one pass over bands of rows); `int8_stem.cc` takes the
image through the stem and block 0's depthwise layer to block 0's projection's uint8 input.
Both run in AVX-512 loops beside the VNNI and AMX loops, in AVX2 ones elsewhere.

They are C++ compiled on first use with the system's C++ compiler against the XLA FFI headers
that jaxlib ships (`jax.ffi.include_dir()`), into $XDG_CACHE_HOME/seg/kernels (~/.cache/seg/
kernels, or $TMPDIR/seg-kernels-UID where that cannot be written; SEG_KERNEL_DIR overrides),
one library per version of the sources, flags and jaxlib, written atomically so that
concurrent processes share it. Where they cannot be built (no compiler, not x86 with AVX2
and FMA) `available()` is False, says why in `unavailable_reason()`, and the engine uses
XLA's int8 formulation. Exports (`jax.export`) never contain them.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from seg.inference import cpu_features, loop_check

HERE = os.path.dirname(os.path.abspath(__file__))
# Compiled together into one library; the headers are part of its key.
SOURCES = tuple(os.path.join(HERE, name)
                for name in ('int8_kernel.cc', 'int8_depthwise.cc', 'int8_stem.cc',
                             'float_kernel.cc'))
HEADERS = tuple(os.path.join(HERE, name)
                for name in ('int8_product.h', 'kernel_threads.h', 'kernel_cpu.h',
                             'int8_depthwise.h', 'int8_stem.h', 'amx_emulation.h',
                             'float_product.h', 'class_map.h', 'mask_png.h'))
TARGET = 'seg_int8_product'
DEPTHWISE_TARGET = 'seg_int8_depthwise'
STEM_TARGET = 'seg_int8_stem'
STEM_PROJECT_TARGET = 'seg_int8_stem_project'
EXPAND_DEPTHWISE_TARGET = 'seg_int8_expand_depthwise'
_TARGETS = {'SegInt8Product': TARGET, 'SegInt8Depthwise': DEPTHWISE_TARGET,
            'SegInt8Stem': STEM_TARGET, 'SegInt8StemProject': STEM_PROJECT_TARGET,
            'SegInt8ExpandDepthwise': EXPAND_DEPTHWISE_TARGET,
            'SegFloatProduct': 'seg_float_product',
            'SegF32Depthwise': 'seg_f32_depthwise',
            'SegFloatExpandDepthwise': 'seg_float_expand_depthwise',
            'SegFloatStemProject': 'seg_float_stem_project',
            'SegFloatDepthwiseProject': 'seg_float_depthwise_project',
            'SegFloatMean': 'seg_float_mean',
            'SegUpsampledArgmax': 'seg_upsampled_argmax'}  # library symbol: FFI target
PANEL = 16   # output channels per weight panel (int8_product.h: kPanel)
GROUP = 4    # consecutive input channels per 32-bit lane
AMX_K = 64   # input channels per AMX tile product
MODES = {'linear': 0, 'relu6': 1, 'relu': 2, 'relu6_uint8': 3, 'linear_int8': 4,
         'linear_offset_uint8': 5}
# The kernel's loops (int8_product.h: Isa) and the CPU flags each needs.
ISAS = {'avx2': 0, 'vnni': 1, 'amx': 2, 'avxvnni': 3}
AVX512_FLAGS = cpu_features.AVX512_FLAGS
VNNI_FLAGS = AVX512_FLAGS | {'avx512_vnni'}
# The loops whose instruction multiplies unsigned inputs: signed ones as x + 128.
OFFSET_LOOPS = ('avxvnni', 'vnni')
# The loops `emulate_loops` stands in for, and the CPU flags their stand-ins need.
EMULATED = {'avxvnni': VNNI_FLAGS, 'amx': AVX512_FLAGS}
# The targets that take a loop, and the suffix of the emulation library's (`emulate_loops`).
LOOP_TARGETS = ('SegInt8Product', 'SegInt8StemProject', 'SegInt8ExpandDepthwise',
                'SegFloatProduct', 'SegFloatExpandDepthwise', 'SegFloatStemProject',
                'SegFloatDepthwiseProject')
EMULATION = '_emulation'
CXX_FLAGS = ('-O3', '-mavx2', '-mfma', '-ffp-contract=off', '-shared', '-fPIC', '-std=c++17',
             '-w')
_state = {}
_emulation = []  # the emulation library's path, once loaded (`emulate_loops`)


def kernel_dir() -> str:
  """Where built kernels are kept (SEG_KERNEL_DIR, else $XDG_CACHE_HOME/seg/kernels)."""
  chosen = os.environ.get('SEG_KERNEL_DIR')
  if chosen:
    return chosen
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'seg', 'kernels')


def _compiler() -> Optional[str]:
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def build(directory: Optional[str] = None, log=None, defines=()) -> str:
  """Compiles `SOURCES` into one library (once per version of them, the flags and jaxlib)
  and returns its path. `defines`: preprocessor macros (e.g. 'SEG_KERNEL_EMULATION').

  Where the default directory (`kernel_dir()`, not chosen by SEG_KERNEL_DIR or `directory`)
  cannot be written (a read-only home on a cluster), builds in $TMPDIR/seg-kernels-UID
  instead. Raises RuntimeError with the compiler's message when it fails. `log`: told when
  it compiles, and where.
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError('no C++ compiler (g++, c++, clang++ or $CXX) on PATH')
  include = jax.ffi.include_dir()
  source = b''
  for name in SOURCES + HEADERS:
    with open(name, 'rb') as f:
      source += f.read()
  flags = CXX_FLAGS + tuple(f'-D{name}' for name in defines)
  # The compiler as resolved: `g++` switched to another version behind the same path
  # (update-alternatives, a distribution upgrade) builds afresh, with the loops it can build.
  key = hashlib.sha256(source + ' '.join(flags).encode() + jax.lib.__version__.encode() +
                       os.path.realpath(cxx).encode()).hexdigest()[:16]
  chosen = directory or os.environ.get('SEG_KERNEL_DIR')
  directory = directory or kernel_dir()
  stem = '-'.join(['int8_kernel'] + [d.lower().replace('_', '-') for d in defines])
  path = os.path.join(directory, f'{stem}-{key}.so')
  if os.path.exists(path):
    return path
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=directory)
  except OSError as e:
    if chosen:
      raise RuntimeError(f'cannot write the int8 kernel to {directory}: {e}') from e
    fallback = os.path.join(tempfile.gettempdir(), f'seg-kernels-{os.getuid()}')
    if log:
      log(f'{directory} cannot be written ({e.strerror or e}): the int8 kernel goes to '
          f'{fallback} (SEG_KERNEL_DIR chooses)')
    return build(fallback, log, defines)
  os.close(fd)
  if log:
    log(f"compiling the project's CPU kernels into {directory} (once) ...")
  try:
    done = subprocess.run([cxx, *flags, f'-I{include}', *SOURCES, '-o', tmp],
                          capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f'{cxx} failed on {", ".join(SOURCES)}:\n{done.stderr[-2000:]}')
    os.replace(tmp, path)  # atomic: a concurrent build writes the same bytes
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def cpu_supported(flags=None, machine: Optional[str] = None) -> bool:
  """Whether the CPU runs the kernel (x86-64 with AVX2 and FMA)."""
  flags = cpu_features.cpu_flags() if flags is None else frozenset(flags)
  return cpu_features.has_avx2_fma(flags, machine or platform.machine())


def available(log=None) -> bool:
  """Builds (first time) and registers the kernel with XLA; False where it cannot. `log`:
  told when it compiles, and when the loops first run in a separate process (`apart`)."""
  if log:
    _state['log'] = log
  if 'ok' not in _state:
    try:
      if not cpu_supported():
        raise RuntimeError('the CPU lacks AVX2 and FMA (or is not x86-64)')
      path = build(log=log)
      lib = ctypes.cdll.LoadLibrary(path)
      for name, target in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, name)),
                                    platform='cpu')
      _state.update(ok=True, reason=None, lib=lib, path=path)
    except (RuntimeError, OSError) as e:
      _state.update(ok=False, reason=str(e))
  return _state['ok']


def emulate_loops(on: bool = True) -> None:
  """Runs the loops this CPU lacks but can stand in for from now on (`on`), or only its own
  again: a second library, built with -DSEG_KERNEL_EMULATION, in which the AMX loop's tile
  instructions are plain C++ (`amx_emulation.h`; on CPUs with AVX-512 F, BW, VL and DQ) and
  the AVX-VNNI loop's instruction is its AVX-512 VL encoding (on CPUs with AVX-512 VNNI).
  `loops()` then offers 'amx' and 'avxvnni' there, in those forms, so that tests check their
  tiling, padding and output loops on CPUs without them. The emulated tiles are far slower
  than real ones; never chosen unless asked (here or by SEG_INT8_LOOP_EMULATION=1)."""
  if on and not _emulation:
    if not available():
      raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
    path = build(defines=('SEG_KERNEL_EMULATION',))
    lib = ctypes.cdll.LoadLibrary(path)
    for name in LOOP_TARGETS:
      jax.ffi.register_ffi_target(_TARGETS[name] + EMULATION,
                                  jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
    _emulation.append(path)  # registered once per process
  _state['emulate'] = on
  _state.pop('loops', None)
  _state.pop('isa', None)


def loops_emulated() -> bool:
  """Whether the 'amx' and 'avxvnni' loops run in their stand-ins (`emulate_loops`, or
  SEG_INT8_LOOP_EMULATION=1 in the environment when first asked)."""
  if 'emulate' not in _state:
    if os.environ.get('SEG_INT8_LOOP_EMULATION', '0') not in ('0', '1', ''):
      raise ValueError('SEG_INT8_LOOP_EMULATION must be 0 or 1')
    emulate_loops(os.environ.get('SEG_INT8_LOOP_EMULATION') == '1')
  return _state['emulate']


def _target(name: str, loop: str) -> str:
  """The FFI target of kernel `name` (a key of `_TARGETS`) running `loop`."""
  return _TARGETS[name] + (EMULATION if loop in EMULATED and loops_emulated() else '')


def record_call_times(on: bool = True) -> None:
  """Starts recording the start and end of every kernel call afresh (`on`), or stops
  (keeping what was recorded): per-kernel times of a whole network at full speed
  (benchmarks/int8_timeline.py)."""
  if not available():
    raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
  _state['lib'].SegRecordCallTimes(ctypes.c_int(1 if on else 0))


def call_times() -> np.ndarray:
  """[calls, 2] float64: the start and end of each kernel call recorded since
  `record_call_times()`, in call order, in seconds on `time.monotonic()`'s clock (the
  kernels' steady clock, CLOCK_MONOTONIC)."""
  if not available():
    raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
  lib = _state['lib']
  lib.SegCallTimes.restype = ctypes.c_int64
  count = lib.SegCallTimes(None, ctypes.c_int64(0))
  out = np.zeros((count, 2), np.float64)
  lib.SegCallTimes(out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), ctypes.c_int64(count))
  return out


def unavailable_reason() -> Optional[str]:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  return _state.get('reason')


def loops(flags=None) -> tuple:
  """The kernel's loops this CPU can run, slowest first: 'avx2', 'avxvnni' (AVX-VNNI: the
  VNNI instruction in 256 bits, on CPUs without AVX-512), 'vnni' (AVX-512 VNNI), 'amx'
  (amx_int8, where Linux grants this process the tile registers). With `emulate_loops` on,
  'avxvnni' and 'amx' are offered where their stand-ins run (`EMULATED`), and only there."""
  if flags is None:
    if 'loops' not in _state:
      # Offered while they compute their first-use checks (`loop_check`), then those right.
      _state['loops'] = loops(cpu_features.cpu_flags())
      _state['loops'] = loop_check.agreeing(_state['loops'], f'{__name__}:check_loop',
                                            loop_verdicts(), 'int8', apart())
    return _state['loops']
  flags = frozenset(flags)
  emulated = loops_emulated()
  found = ['avx2']
  if (EMULATED['avxvnni'] <= flags if emulated else 'avx_vnni' in flags) and built('avxvnni'):
    found.append('avxvnni')
  if VNNI_FLAGS <= flags:
    found.append('vnni')
  if (EMULATED['amx'] <= flags if emulated else
      'amx_int8' in flags and available() and _state['lib'].SegAmxPermitted() == 1) and (
          built('amx')):
    found.append('amx')
  return tuple(found)


def loop_verdicts() -> dict:
  """The loops' first-use checks so far (`loop_check`; asking `loops()` runs them): loop ->
  None (right) or what was wrong; the stand-ins apart from the real loops."""
  return _state.setdefault(('verdicts', loops_emulated()), {})


def apart() -> loop_check.Apart:
  """Where the loops run apart first (`loop_check.agreeing`): the library whose loops run
  (the emulation library where `loops_emulated()`) and the same choice for the separate
  process."""
  emulated = loops_emulated()
  return loop_check.Apart(_emulation[0] if emulated else _state['path'],
                          {'SEG_INT8_LOOP_EMULATION': '1' if emulated else '0'},
                          _state.get('log'))


def check_loop(loop: str) -> Optional[str]:
  """`loop_check`'s product in `loop` (weights packed for it) from unsigned inputs (float32
  out, and the expansions' uint8 out: inv_out 32, so min(32 relu6(sum), 127)) and from
  signed ones (as the engine hands them to this loop: x + 128 for the VNNI loops; float32
  out with the int8 requantisation beside it, inv_out 1: the sums clipped to [-127, 127]),
  against NumPy's: None where it is right, else what differs."""
  x, w, b, expected = loop_check.integer_problem(0, 4)
  xs, _, _, expected_s = loop_check.integer_problem(-4, 4)
  w_packed = pack_weights(w.astype(np.int8), AMX_K if loop == 'amx' else GROUP)
  scale, bias = np.ones(w.shape[1], np.float32), b.astype(np.float32)
  offset = loop in OFFSET_LOOPS
  xs = (xs + 128).astype(np.uint8) if offset else xs.astype(np.int8)

  def run(w_packed, scale, bias, x, xs):
    return [product(x, w_packed, scale, bias, loop=loop),
            product(x, w_packed, scale, bias, 'relu6_uint8', 32.0, loop=loop),
            *product(xs, w_packed, scale, bias, loop=loop, offset_input=offset,
                     requantised='int8')]

  got = loop_check.run_apart(run, w_packed, scale, bias, x.astype(np.uint8), xs)
  wanted = (expected, np.minimum(np.clip(expected, 0, 6) * 32, 127), expected_s,
            np.clip(expected_s, -127, 127))
  for want, have in zip(wanted, got):
    wrong = loop_check.mismatch(want.astype(np.dtype(have.dtype)), have)
    if wrong:
      return wrong
  return None


def built(loop: str) -> bool:
  """Whether the kernel library has `loop`: compilers before GCC 11 and clang 12 have no
  AVX-VNNI or AMX intrinsics, and the build leaves those two loops out."""
  return available() and _state['lib'].SegHasLoop(ctypes.c_int(ISAS[loop])) == 1


def isa() -> str:
  """Which of the kernel's loops runs here: the fastest of `loops()` ('amx', 'vnni',
  'avxvnni' or 'avx2'). SEG_INT8_KERNEL_ISA=avx2|avxvnni|vnni|amx forces one (an error where
  the CPU lacks it)."""
  if 'isa' not in _state:
    wanted = os.environ.get('SEG_INT8_KERNEL_ISA', 'auto') or 'auto'
    if wanted != 'auto' and wanted not in ISAS:
      raise ValueError(f"SEG_INT8_KERNEL_ISA must be auto, {', '.join(ISAS)}, got {wanted!r}")
    have = loops() if available() else ('avx2',)
    if not have:
      raise RuntimeError('no int8 loop computed its first-use check product right: ' +
                         '; '.join(f'{loop}: {why}' for loop, why in loop_verdicts().items()))
    if wanted != 'auto' and wanted not in have:
      raise RuntimeError(f'SEG_INT8_KERNEL_ISA={wanted}, but this CPU or Linux offers only '
                         f'{", ".join(have)}{loop_check.refused(loop_verdicts(), wanted)}')
    _state['isa'] = have[-1] if wanted == 'auto' else wanted
  return _state['isa']


def k_multiple() -> int:
  """The input channels `pack_weights` pads to for this machine's loop (64 for AMX tiles)."""
  return AMX_K if isa() == 'amx' else GROUP


def pack_weights(w: np.ndarray, k_multiple: int = GROUP) -> np.ndarray:
  """[in, out] int8 -> the kernel's layout, 1-D int8 of in' x ceil(out / 16) x 16.

  in' = in rounded up to `k_multiple` (4, or 64 for AMX tiles) with zero weights. Panel p
  holds output channels 16p..16p+15 (zeros beyond `out`); inside it, for each group of 4
  inputs, 16 channels x 4 inputs (int8_product.h).
  """
  w = np.asarray(w)
  if w.dtype != np.int8 or w.ndim != 2:
    raise ValueError(f'expected [in, out] int8 weights, got {w.dtype} {w.shape}')
  k, n = w.shape
  if k % GROUP:
    raise ValueError(f'the kernel needs a multiple of {GROUP} input channels, got {k}')
  if k_multiple % GROUP:
    raise ValueError(f'k_multiple must be a multiple of {GROUP}, got {k_multiple}')
  panels = -(-n // PANEL)
  kp = -(-k // k_multiple) * k_multiple
  padded = np.zeros((kp, panels * PANEL), np.int8)
  padded[:k, :n] = w
  # [k'/4, 4, panels, 16] -> [panels, k'/4, 16, 4]
  return np.ascontiguousarray(
      padded.reshape(kp // GROUP, GROUP, panels, PANEL).transpose(2, 0, 3, 1)).reshape(-1)


def signed_input_form() -> str:
  """How signed product inputs are stored for this machine's loop: 'offset_uint8' (x + 128
  as uint8, which the VNNI loops multiply without flipping each input) where `isa()` is
  'vnni' or 'avxvnni', else 'int8'. SEG_INT8_SIGNED_INPUTS=int8 keeps int8 (A/B timings);
  read when traced."""
  wanted = os.environ.get('SEG_INT8_SIGNED_INPUTS', 'auto') or 'auto'
  if wanted not in ('auto', 'int8'):
    raise ValueError(f'SEG_INT8_SIGNED_INPUTS must be auto or int8, got {wanted!r}')
  return 'offset_uint8' if isa() in OFFSET_LOOPS and wanted == 'auto' else 'int8'


def product(x: jax.Array, w_packed: jax.Array, scale: jax.Array, bias: jax.Array,
            mode: str = 'linear', inv_out=1.0, loop: Optional[str] = None,
            offset_input: bool = False, residual: Optional[jax.Array] = None,
            requantised: Optional[str] = None, keep_float: bool = True):
  """act(int32(x @ w) * scale + bias) over x's last axis (one FMA), in the kernel (CPU only).

  x: [..., in] uint8 in [0, 127] or int8 in [-127, 127], or with `offset_input` a signed
  input stored as x + 128, uint8 in [1, 255] (`signed_input_form`; loops other than the VNNI
  ones get it back as int8 first); w_packed: `pack_weights`; scale, bias: float32 [out].
  mode: 'linear', 'relu6', 'relu' (float32 [..., out]), 'relu6_uint8' (uint8 [..., out] =
  round(relu6(y) * inv_out) clipped to [0, 127], computed as one FMA with scale and bias
  times inv_out; inv_out >= 127 / 6, a float32 scalar, traced or not), 'linear_int8' (int8
  [..., out] = round(y * inv_out) clipped to [-127, 127], the same way) or
  'linear_offset_uint8' (that + 128 as uint8, the next product's `offset_input`).
  'linear' only: `residual` (float32 [..., out]) is added to y; `requantised` ('int8' or
  'offset_uint8') also returns round(y * inv_out) clipped to [-127, 127] in that form (y times
  inv_out, then rounded: XLA's quantisation of y), as (float32 y, it), or only it when not
  `keep_float`. loop: one of `loops()` (default `isa()`); AMX tiles need weights packed to
  64 inputs, and other weights take the next loop down.
  """
  if not available():
    raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
  if x.dtype not in (jnp.uint8, jnp.int8):
    raise ValueError(f'x must be uint8 or int8, got {x.dtype}')
  if (residual is not None or requantised or not keep_float) and mode != 'linear':
    raise ValueError(f"residual, requantised and keep_float are mode 'linear's, not {mode!r}")
  if requantised not in (None, 'int8', 'offset_uint8') or not (keep_float or requantised):
    raise ValueError(f"requantised is None, 'int8' or 'offset_uint8' (needed without "
                     f"keep_float), got {requantised!r}")
  shape = x.shape[:-1] + scale.shape
  out_dtype = {'relu6_uint8': jnp.uint8, 'linear_int8': jnp.int8,
               'linear_offset_uint8': jnp.uint8}.get(mode, jnp.float32)
  none = lambda dtype: jax.ShapeDtypeStruct((0,), dtype)
  q_dtype = jnp.uint8 if requantised == 'offset_uint8' else jnp.int8
  x, loop, offset_input = _loop_and_input(x, w_packed, scale.shape[0], loop, offset_input)
  call = jax.ffi.ffi_call(_target('SegInt8Product', loop), (
      jax.ShapeDtypeStruct(shape, out_dtype) if keep_float else none(out_dtype),
      jax.ShapeDtypeStruct(shape, q_dtype) if requantised else none(q_dtype)))
  if residual is not None and residual.shape != shape:
    raise ValueError(f'the residual must be {shape}, got {residual.shape}')
  residual = (jnp.zeros((0,), jnp.float32) if residual is None else
              residual.astype(jnp.float32))
  out, out_q = call(x, w_packed, scale, bias, jnp.asarray(inv_out, jnp.float32), residual,
                    mode=np.int32(MODES[mode]),
                    is_signed=bool(x.dtype == jnp.int8 or offset_input),
                    offset_input=bool(offset_input), isa=np.int32(ISAS[loop]),
                    q_offset=requantised == 'offset_uint8')
  if not requantised:
    return out
  return (out, out_q) if keep_float else out_q


def _loop(w_packed, out_channels: int, loop: Optional[str]) -> str:
  """The loop that runs a product: `loop` checked (default `isa()`), AMX only where the
  weights are packed for its tiles."""
  loop = loop or isa()
  if loop not in loops():
    raise ValueError(f'loop {loop!r} is not one of this CPU\'s: {loops()}')
  k_packed = w_packed.shape[0] // (-(-out_channels // PANEL) * PANEL)
  if loop == 'amx' and k_packed % AMX_K:
    loop = 'vnni' if 'vnni' in loops() else 'avx2'
  return loop


def _loop_and_input(x, w_packed, out_channels: int, loop: Optional[str], offset_input: bool):
  """(x, loop, offset_input) as the kernel takes them: `_loop`, and x + 128 back to int8
  for loops other than the VNNI ones."""
  loop = _loop(w_packed, out_channels, loop)
  if offset_input and x.dtype != jnp.uint8:
    raise ValueError(f'offset_input: x must be uint8 (x + 128), got {x.dtype}')
  if offset_input and loop not in OFFSET_LOOPS:  # the other loops multiply int8
    x, offset_input = jax.lax.bitcast_convert_type(x ^ np.uint8(128), jnp.int8), False
  return x, loop, offset_input



DEPTHWISE_CHANNELS = 8  # int8_depthwise.cc: channels per vector
# (stride, dilation) pairs the depthwise kernel is compiled for: MobileNetV2's at output
# stride 8, 16 and 32.
DEPTHWISE_STRIDES = ((1, 1), (2, 1), (1, 2), (1, 4))


def depthwise_supported(shape, stride: int, dilation: int) -> bool:
  """Whether `depthwise` takes an input of `shape` [n, h, w, c] with these (3x3 weights)."""
  return shape[-1] % DEPTHWISE_CHANNELS == 0 and (stride, dilation) in DEPTHWISE_STRIDES


def depthwise(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, dilation: int,
              inv_out, loop: Optional[str] = None) -> jax.Array:
  """The 3x3 depthwise layer between the kernel's expansion and projection (CPU only):
  min(round(relu6(depthwise 'SAME' conv(x, w) + b) * inv_out), 127) as uint8.

  x: [n, h, w, c] uint8 (0 is 0.0; the scale is in w); w: [3, 3, c] float32; b: [c]
  float32; c a multiple of 8; (stride, dilation) in `DEPTHWISE_STRIDES`; inv_out: 1 / the
  projection's input scale (float32 scalar, traced or not). Returns uint8 [n, ceil(h /
  stride), ceil(w / stride), c], the projection's input: XLA's float32 taps and
  quantisation, the taps summed in one fixed order (`int8_depthwise.cc`). Its AVX-512 loop
  runs where the products' `loop` (default `isa()`) is 'vnni' or 'amx', its AVX2 loop
  elsewhere: the same numbers.
  """
  from seg.model.layers import same_padding
  if not available():
    raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
  n, h, wd, c = x.shape
  if x.dtype != jnp.uint8 or c % DEPTHWISE_CHANNELS:
    raise ValueError(f'x must be uint8 with a multiple of {DEPTHWISE_CHANNELS} channels, '
                     f'got {x.dtype} {x.shape}')
  if w.shape != (3, 3, c) or (stride, dilation) not in DEPTHWISE_STRIDES:
    raise ValueError(f'3x3 weights [3, 3, {c}] and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES} only, got {w.shape}, ({stride}, {dilation})')
  kh, kw = 3, 3
  out = jax.ShapeDtypeStruct((n, -(-h // stride), -(-wd // stride), c), jnp.uint8)
  return jax.ffi.ffi_call(DEPTHWISE_TARGET, out)(
      x, w.astype(jnp.float32), b.astype(jnp.float32), jnp.asarray(inv_out, jnp.float32),
      stride=np.int32(stride), dilation=np.int32(dilation),
      pad_top=np.int32(same_padding(h, kh, stride, dilation)[0]),
      pad_left=np.int32(same_padding(wd, kw, stride, dilation)[0]),
      wide=_depthwise_wide(loop))


def _depthwise_wide(loop: Optional[str]) -> bool:
  """Whether the depthwise and stem layers beside the products' `loop` run in their AVX-512
  loops: where that loop is VNNI's or AMX's (their CPUs have AVX-512 F, BW, VL and DQ)."""
  loop = loop or isa()
  if loop not in loops():
    raise ValueError(f'loop {loop!r} is not one of this CPU\'s: {loops()}')
  return loop in ('vnni', 'amx')


def stem_supported(images_shape, stem_w_shape) -> bool:
  """Whether `stem` takes images of `images_shape` [n, h, w, 3] and a stem [3, 3, 3, c]."""
  return (len(images_shape) == 4 and images_shape[-1] == 3 and
          tuple(stem_w_shape[:3]) == (3, 3, 3) and stem_w_shape[3] % DEPTHWISE_CHANNELS == 0)


def stem_images(images: jax.Array, sizes: Optional[jax.Array],
                stem_w_shape) -> Tuple[jax.Array, jax.Array]:
  """(images, sizes) as the stem passes take them, checked with the stem's weights' shape
  (`stem_supported`): float32 images (preprocessed; other float dtypes converted) or uint8
  pixels (the passes preprocess them as `seg.preprocessing.preprocess_padded` does: u / 127.5
  - 1, 0 outside each image's valid region); sizes int32 [n, 2] (valid rows, columns) or [0]
  for whole images."""
  if not stem_supported(images.shape, stem_w_shape):
    raise ValueError(f'images [n, h, w, 3] and stem weights [3, 3, 3, c] with c a multiple '
                     f'of {DEPTHWISE_CHANNELS}, got {images.shape}, {stem_w_shape}')
  if images.dtype != jnp.uint8:
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'images are float (preprocessed) or uint8 pixels, got {images.dtype}')
    images = images.astype(jnp.float32)
  if sizes is None:
    return images, jnp.zeros((0,), jnp.int32)
  if tuple(sizes.shape) != (images.shape[0], 2):
    raise ValueError(f'sizes are [n, 2] for {images.shape[0]} images, got {sizes.shape}')
  return images, jnp.asarray(sizes, jnp.int32)


def stem(images: jax.Array, ws: jax.Array, bs: jax.Array, wd: jax.Array, bd: jax.Array,
         inv_out, project=None, loop: Optional[str] = None,
         sizes: Optional[jax.Array] = None) -> jax.Array:
  """The stem and block 0's depthwise layer, to block 0's projection's input (CPU only):
  min(round(relu6(depthwise(relu6(stem conv(images, ws) + bs), wd) + bd) * inv_out), 127)
  as uint8, both convolutions 3x3 'SAME' (the stem stride 2, the depthwise stride 1).

  images: [n, h, w, 3] float32 (preprocessed, 0 is padding), or uint8 pixels with their
  valid `sizes` (`stem_images`: preprocessed as they are read); ws: [3, 3, 3, c]; bs, bd: [c];
  wd: [3, 3, c], all float32, c a multiple of 8; inv_out: 1 / the projection's input scale
  (float32 scalar, traced or not). Returns uint8 [n, ceil(h / 2), ceil(w / 2), c]: XLA's
  float32 stem, taps and quantisation, summed in one fixed order (`int8_stem.cc`).
  With `project` = (w_packed, scale, bias, mode, inv_next), mode 'linear_int8' or
  'linear_offset_uint8': `product(that, w_packed, scale, bias, mode, inv_next, loop)` in the
  same pass, bit for bit (block 0's projection writing block 1's input). The layers run in
  AVX-512 loops where `loop` (default `isa()`) is 'vnni' or 'amx' and c a multiple of 16,
  else in AVX2 ones: the same numbers.
  """
  from seg.model.layers import same_padding
  if not available():
    raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
  images, sizes = stem_images(images, sizes, ws.shape)
  n, h, w, _ = images.shape
  c = ws.shape[3]
  if wd.shape != (3, 3, c) or bs.shape != (c,) or bd.shape != (c,):
    raise ValueError(f'depthwise weights [3, 3, {c}] and biases [{c}], got {wd.shape}, '
                     f'{bs.shape}, {bd.shape}')
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  pads = dict(pad_top=np.int32(same_padding(h, 3, 2, 1)[0]),
              pad_left=np.int32(same_padding(w, 3, 2, 1)[0]))
  if project is None:
    out = jax.ShapeDtypeStruct((n, -(-h // 2), -(-w // 2), c), jnp.uint8)
    return jax.ffi.ffi_call(STEM_TARGET, out)(
        images, sizes, f32(ws), f32(bs), f32(wd), f32(bd), f32(inv_out), **pads,
        wide=_depthwise_wide(loop))
  w_packed, scale, bias, mode, inv_next = project
  if mode not in ('linear_int8', 'linear_offset_uint8') or c % GROUP:
    raise ValueError(f"the projection writes the next input: mode 'linear_int8' or "
                     f"'linear_offset_uint8' on a multiple of {GROUP} channels, got {mode!r}, {c}")
  loop = _loop(w_packed, scale.shape[0], loop)
  out = jax.ShapeDtypeStruct((n, -(-h // 2), -(-w // 2), scale.shape[0]),
                             jnp.int8 if mode == 'linear_int8' else jnp.uint8)
  return jax.ffi.ffi_call(_target('SegInt8StemProject', loop), out)(
      images, sizes, f32(ws), f32(bs), f32(wd), f32(bd), f32(inv_out), w_packed, f32(scale),
      f32(bias), f32(inv_next), mode=np.int32(MODES[mode]), isa=np.int32(ISAS[loop]), **pads)


def expand_depthwise(x: jax.Array, w_packed: jax.Array, scale: jax.Array, bias: jax.Array,
                     inv_mid, wd: jax.Array, bd: jax.Array, stride: int, dilation: int,
                     inv_out, loop: Optional[str] = None, offset_input: bool = False) -> jax.Array:
  """`depthwise(product(x, w_packed, scale, bias, 'relu6_uint8', inv_mid), wd, bd, stride,
  dilation, inv_out)` in one pass (CPU only), bit for bit: the expansion's output is computed
  a band of rows at a time into a buffer that stays in cache, never whole in memory.

  x: [n, h, w, in] as `product` takes it (uint8, int8, or x + 128 with `offset_input`);
  the expansion's outputs a multiple of 8; the rest as `product` and `depthwise`. Returns
  uint8 [n, ceil(h / stride), ceil(w / stride), expanded].
  """
  from seg.model.layers import same_padding
  if not available():
    raise RuntimeError(f'the int8 kernel is unavailable: {unavailable_reason()}')
  n, h, w, _ = x.shape
  e = scale.shape[0]
  if x.dtype not in (jnp.uint8, jnp.int8) or not depthwise_supported((n, h, w, e), stride,
                                                                       dilation):
    raise ValueError(f'x must be uint8 or int8 [n, h, w, in] with a multiple of '
                     f'{DEPTHWISE_CHANNELS} expanded channels and (stride, dilation) in '
                     f'{DEPTHWISE_STRIDES}, got {x.dtype} {x.shape}, {e}, ({stride}, {dilation})')
  if wd.shape != (3, 3, e) or bd.shape != (e,):
    raise ValueError(f'depthwise weights [3, 3, {e}] and bias [{e}], got {wd.shape}, {bd.shape}')
  x, loop, offset_input = _loop_and_input(x, w_packed, e, loop, offset_input)
  out = jax.ShapeDtypeStruct((n, -(-h // stride), -(-w // stride), e), jnp.uint8)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return jax.ffi.ffi_call(_target('SegInt8ExpandDepthwise', loop), out)(
      x, w_packed, f32(scale), f32(bias), f32(inv_mid), f32(wd), f32(bd), f32(inv_out),
      is_signed=bool(x.dtype == jnp.int8 or offset_input), offset_input=bool(offset_input),
      isa=np.int32(ISAS[loop]), stride=np.int32(stride), dilation=np.int32(dilation),
      pad_top=np.int32(same_padding(h, 3, stride, dilation)[0]),
      pad_left=np.int32(same_padding(w, 3, stride, dilation)[0]))
