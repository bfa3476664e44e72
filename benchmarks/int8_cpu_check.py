"""The int8 engine on a CPU not measured before (an AMX Xeon, an AVX2-only or AVX-VNNI core):
one command for what docs/performance.md needs from it.

    python benchmarks/int8_cpu_check.py [--output benchmarks/results/int8-cpu-check-DATE-HHMM-CPU.json]
        [--rounds 2] [--skip-peers]

Steps, each a fresh process, their output kept whole in the JSON file:
1. the CPU: lscpu's model name, the flags the kernels read, the kernel's loops
   (`int8_kernel.loops()`, the one the engine runs, which the compiler built) and each
   loop's first-use check (`loop_checks`: null where it computed its product right);
2. the kernels' tests (tests/inference/test_int8_kernel.py, test_float_kernel.py,
   test_loop_check.py, test_upsampled_argmax.py): passed /
   skipped / failed, so that a loop first met here is checked before it is timed (the AMX,
   AMX-BF16 and AVX-VNNI loops were written and checked through stand-ins on CPUs without
   them);
3. every product in each real loop, one core (`int8_kernel_layers.py`, `taskset -c 0`): the
   loop to choose per CPU, and where AMX tiles beat VNNI;
4. the network kernel by kernel in each real loop, one core and both cores
   (`int8_timeline.py`), and the bfloat16 and float32 engines' in each of their loops, both
   cores (`int8_timeline.py --dtype`: where an AMX CPU's time goes once the products are fast);
5. the peers side by side (`peers/run.py`: ONNX Runtime float32 and int8, PyTorch
   `torch.compile` bfloat16, the engine's float32, bfloat16 and int8; --rounds rounds,
   batches 1 and 8): issue 17's ratios, needing benchmarks/requirements-peers.txt; and the
   engine's bfloat16 in its other forms (`BF16_ROWS`: the bfloat16 kernel and XLA's
   products, from other strides; the defaults were chosen on CPUs without AMX, where
   bfloat16 products run at most ~2x float32's) and its float32 in both formulations
   (`F32_ROWS`: XLA's products, and the float kernel, in AVX2 on CPUs without AVX-512);
   on AMX CPUs each dtype also without the oneDNN flag the commands add there (`ONEDNN_OFF`);
6. the class maps call by call (`engine_ab.py`, batch 8, float32 and int8): the default
   against XLA's upsampling and argmax (`SEG_UPSAMPLE_ARGMAX=xla`), and against the batch
   in one part per device (`--parts-b devices`), both chosen on a Zen 5 (2026-12-07); and
   XLA's preprocessing (`SEG_PIXELS=xla`, the stem passes reading pixels since 2026-12-07),
   the float engines' passes over memory, chosen there too (`FLOAT_ABS`: two calls for a
   depthwise layer and its projection, float32 hand-offs, the stem pass apart); and the
   float networks at batch 1 with XLA's head pooling (`int8_ab.py`, `SEG_HEAD_POOL=xla`).
Prints the key figures at the end (a step that fails is recorded and the rest go on).
7.7 minutes with --rounds 3 on the 2-core AMD EPYC Zen 4 (2026-12-06; the peers 6.3 of them);
8.1 on a Zen 5 with the two bfloat16 rows (2026-12-06 19:09 UTC; the peers 6.6); 10.2
there with the bfloat16 kernel's tests and four bfloat16 rows (20:55 UTC: tests 1.4, the
peers 7.9); with --skip-peers and the class-map A/Bs 4.6 there (2026-12-07 01:58 UTC:
tests 1.5, the A/Bs 0.7); with the float engines' timelines too 3.2 (04:20 UTC), and their
four A/Bs 3 (04:38-04:41 UTC).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peers'))
from run import ENGINE  # noqa: E402  (benchmarks/peers/run.py: the engine's command line)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The engine's bfloat16 besides its default (the float kernel from stride 2 where the CPU
# has AVX-512 BF16 or AMX-BF16, else XLA's products from stride 16): the kernel from strides
# 16 and 4, and XLA's products from 16 and 8.
BF16_ROWS = (('kernel-from-16', 'SEG_BF16_FORMULATION=kernel SEG_BF16_FROM_STRIDE=16'),
             ('kernel-from-4', 'SEG_BF16_FORMULATION=kernel SEG_BF16_FROM_STRIDE=4'),
             ('xla-from-16', 'SEG_BF16_FORMULATION=xla SEG_BF16_FROM_STRIDE=16'),
             ('xla-from-8', 'SEG_BF16_FORMULATION=xla SEG_BF16_FROM_STRIDE=8'))
# The engine's float32 in both formulations (the default: the float kernel where the CPU has
# AVX-512, XLA's products elsewhere; `kernel` runs the kernel's AVX2 loops there).
F32_ROWS = (('xla', 'SEG_F32_FORMULATION=xla'), ('kernel', 'SEG_F32_FORMULATION=kernel'))
# On AMX CPUs the inference commands add --xla_cpu_use_onednn=true (cpu_features.choose,
# chosen on 2026-11-29 when XLA ran the products; the kernels run them now): each dtype's
# engine without it too, there.
ONEDNN_OFF = 'XLA_FLAGS=--xla_cpu_use_onednn=false'
# The float engines' one-pass and hand-off choices against their A/B switches (engine_ab.py
# settings for B), per dtype.
FLOAT_ABS = (('float32', 'two calls per depthwise layer', 'SEG_DEPTHWISE_PROJECT=two'),
             ('bfloat16', 'two calls per depthwise layer', 'SEG_DEPTHWISE_PROJECT=two'),
             ('bfloat16', 'two calls, float32 hand-offs',
              'SEG_DEPTHWISE_PROJECT=two SEG_BF16_HANDOFF=float32'),
             ('bfloat16', 'the stem pass apart', 'SEG_FLOAT_STEM=pass'))
INFO = r'''
import json, subprocess
import jax.numpy as jnp
from seg.inference import float_kernel, cpu_features, int8_kernel
flags = cpu_features.cpu_flags()
lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
field = lambda name: next((l.split(':', 1)[1].strip() for l in lscpu.splitlines()
                           if l.startswith(name + ':')), '')
model = field('Model name')
ok = int8_kernel.available()
print(json.dumps({
    'model': model, 'family': field('CPU family'), 'model_number': field('Model'),
    'nproc': __import__('os').cpu_count(),
    'flags': sorted(f for f in flags if f.startswith(('avx512', 'amx')) or
                    f in ('avx2', 'fma', 'avx_vnni')),
    'kernel': ok, 'why_not': int8_kernel.unavailable_reason(),
    'loops': list(int8_kernel.loops()) if ok else [],
    'isa': int8_kernel.isa() if ok else None,
    'built': {l: int8_kernel.built(l) for l in int8_kernel.ISAS} if ok else {},
    'bf16_loops': list(float_kernel.loops()) if ok else [],
    'f32_loops': list(float_kernel.f32_loops()) if ok else [],
    'loop_checks': {'int8': int8_kernel.loop_verdicts(), 'bfloat16': float_kernel.loop_verdicts(),
                    'float32': float_kernel.loop_verdicts(jnp.float32)} if ok else {},
    'choice': cpu_features.choose().reason}))
'''


def run(command, env=None, timeout=1800):
  """(exit code, seconds, stderr + stdout) of a command (a list, or a shell line) in the
  repository root: the results (stdout) last, where the tails kept in the report look."""
  start = time.time()
  try:
    done = subprocess.run(command, shell=isinstance(command, str), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    code, out = done.returncode, done.stderr + done.stdout
  except subprocess.TimeoutExpired as e:
    code, out = 124, f'timed out after {timeout} s\n{e.stdout or ""}'
  shown = command if isinstance(command, str) else ' '.join(command)[:80]
  print(f'  [{code}] {time.time() - start:.0f} s  {shown}', flush=True)
  return code, round(time.time() - start, 1), out


def one_core() -> str:
  return 'taskset -c 0 ' if shutil.which('taskset') else ''


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', default='')
  parser.add_argument('--rounds', type=int, default=2, help='peers rounds')
  parser.add_argument('--skip-peers', action='store_true')
  args = parser.parse_args()
  python = sys.executable
  report = {'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ'), 'steps': {}}

  code, _, out = run([python, '-c', INFO])
  info = json.loads(out.strip().splitlines()[-1]) if code == 0 else {'error': out[-2000:]}
  report['cpu'] = info
  print(json.dumps(info, indent=1), flush=True)
  loops = info.get('loops', [])

  code, seconds, out = run(f'{python} -m pytest -q -p no:cacheprovider '
                           'tests/inference/test_int8_kernel.py '
                           'tests/inference/test_float_kernel.py '
                           'tests/inference/test_loop_check.py '
                           'tests/inference/test_upsampled_argmax.py')
  counts = dict((k, int(v)) for v, k in re.findall(r'(\d+) (passed|skipped|failed|error)', out))
  report['steps']['tests'] = {'exit': code, 'seconds': seconds, 'counts': counts,
                              'tail': out[-3000:]}

  code, seconds, out = run(f'{one_core()}{python} benchmarks/int8_kernel_layers.py')
  total = re.search(r'^all\s+[\d.]+ GMAdd\s+(.*)$', out, re.M)
  report['steps']['layers_one_core'] = {
      'exit': code, 'seconds': seconds, 'output': out,
      'all_products_ms': [float(v) for v in re.findall(r'([\d.]+) \(', total.group(1))]
      if total else None}

  report['steps']['timeline'] = {}
  for loop in loops:
    for cores, prefix in (('one core', one_core()), ('all cores', '')):
      code, seconds, out = run(f'{prefix}{python} benchmarks/int8_timeline.py --iters 50',
                               env={'SEG_INT8_KERNEL_ISA': loop})
      call = re.search(r'a network call took ([\d.]+)', out)
      report['steps']['timeline'][f'{loop}, {cores}'] = {
          'exit': code, 'network_ms': float(call.group(1)) if call else None,
          'output': out[-6000:]}
  for dtype, float_loops in (('bfloat16', info.get('bf16_loops', [])),
                             ('float32', info.get('f32_loops', []))):
    variable = {'bfloat16': 'SEG_BF16_KERNEL_ISA', 'float32': 'SEG_F32_KERNEL_ISA'}[dtype]
    for loop in float_loops:
      code, seconds, out = run(f'{python} benchmarks/int8_timeline.py --dtype {dtype} '
                               '--iters 50', env={variable: loop})
      call = re.search(r'a network call took ([\d.]+)', out)
      report['steps']['timeline'][f'{dtype} {loop}, all cores'] = {
          'exit': code, 'network_ms': float(call.group(1)) if call else None,
          'output': out[-6000:]}

  # Named by date and time (a second run never overwrites or mixes with the first), model
  # name and family / model number: virtual machines often name only 'AMD EPYC' or 'Intel
  # Xeon Processor', for Zen 4 (family 25) and Zen 5 (26) alike.
  stem = '-'.join(part for part in (
      report['date_utc'][:10], report['date_utc'][11:16].replace(':', ''),
      re.sub(r'[^a-z0-9]+', '-', info.get('model', 'cpu').lower()).strip('-') or 'cpu',
      f'f{info["family"]}m{info["model_number"]}' if info.get('family') else '') if part)

  if not args.skip_peers:
    jsonl = os.path.join('benchmarks', 'results', f'peers-{stem}-int8-cpu-check.jsonl')
    code, seconds, out = run(
        f'{python} benchmarks/peers/run.py --only onnxruntime-float32,onnxruntime-int8,'
        f'torch-compile-bfloat16 --engine --rounds {args.rounds} --batches 1,8 --iters 50 '
        f'--output {jsonl}' + ''.join(
            f' --extra "seg-engine-bfloat16-{name}={env} {ENGINE} --dtype bfloat16"'
            for name, env in BF16_ROWS) + ''.join(
            f' --extra "seg-engine-float32-{name}={env} {ENGINE}"'
            for name, env in F32_ROWS) + ''.join(
            f' --extra "seg-engine-{dtype}-no-onednn={ONEDNN_OFF} {ENGINE} --dtype {dtype}"'
            for dtype in ('float32', 'bfloat16', 'int8')
            if any(f.startswith('amx') for f in info.get('flags', []))), timeout=3600)
    report['steps']['peers'] = {'exit': code, 'seconds': seconds, 'jsonl': jsonl,
                                'table': out[-5000:]}

  report['steps']['class_maps'] = {}

  def class_map_ab(dtype, name, b, iters):
    code, seconds, out = run(f'{python} benchmarks/engine_ab.py --dtype {dtype} --batch 8 '
                             f'--iters {iters} {b}')
    ratio = re.search(r'B / A, median of the pairs: ([\d.]+)', out)
    report['steps']['class_maps'][f'{dtype}, B: {name}'] = {
        'exit': code, 'b_over_a': float(ratio.group(1)) if ratio else None,
        'output': out[-1500:]}

  for dtype in ('float32', 'int8'):
    for name, b in (('xla upsampling and argmax', 'SEG_UPSAMPLE_ARGMAX=xla'),
                    ('one part per device', '--parts-b devices'),
                    ('xla preprocessing', 'SEG_PIXELS=xla')):
      class_map_ab(dtype, name, b, 30)
  kernels = {'bfloat16': info.get('bf16_loops'), 'float32': info.get('f32_loops')}
  for dtype, name, b in FLOAT_ABS:
    if kernels[dtype]:  # (the float kernel runs here in that dtype)
      class_map_ab(dtype, name, b, 20)
  # The head's pooling in the kernel: the network at batch 1 (int8_ab.py, any dtype).
  report['steps']['network_abs'] = {}
  for dtype in ('bfloat16', 'float32'):
    if kernels[dtype]:
      code, seconds, out = run(f'{python} benchmarks/int8_ab.py --dtype {dtype} --batch 1 '
                               '--iters 100 SEG_HEAD_POOL=xla')
      ratio = re.search(r'B / A, median of the pairs: ([\d.]+)', out)
      report['steps']['network_abs'][f'{dtype}, batch 1, B: xla head pooling'] = {
          'exit': code, 'b_over_a': float(ratio.group(1)) if ratio else None,
          'output': out[-1500:]}

  output = args.output or os.path.join(ROOT, 'benchmarks', 'results',
                                       f'int8-cpu-check-{stem}.json')
  with open(output, 'w') as f:
    json.dump(report, f, indent=1)

  print(f'\n{info.get("model")}: loops {loops}, the engine runs {info.get("isa")}')
  print(f'tests: {report["steps"]["tests"]["counts"]}')
  layers = report['steps']['layers_one_core']['all_products_ms']
  if layers:
    names = [f'kernel {loop}' for loop in loops] + ['xla int8', 'xla float32']
    print('all products, one core, ms: ' + ', '.join(
        f'{n} {v}' for n, v in zip(names, layers)))
  for key, value in report['steps']['timeline'].items():
    print(f'network, {key}: {value["network_ms"]} ms')
  for key, value in report['steps']['class_maps'].items():
    print(f'class maps, {key}: B / A {value["b_over_a"]}')
  for key, value in report['steps']['network_abs'].items():
    print(f'network, {key}: B / A {value["b_over_a"]}')
  if 'peers' in report['steps']:
    print(report['steps']['peers']['table'][-2500:])
  print(f'written: {output}')


if __name__ == '__main__':
  main()
