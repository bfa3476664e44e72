"""PyTorch peer: the network of model.py on the CPU, eager or torch.compile'd, float32 or bfloat16.

    python benchmarks/peers/bench_torch.py --mode eager|compile --dtype float32|bfloat16 --batch 1

  eager              plain PyTorch, float32
  compile            torch.compile (inductor) with freezing: weights become constants, so
                     BatchNorm folds into the convs and oneDNN prepacks their weights
                     (PyTorch's advice for CPU inference)
  compile --dtype bfloat16
                     the same under torch.autocast('cpu', bfloat16): convs run in bfloat16
                     through oneDNN (AVX512_BF16 / AMX where the CPU has them), logits bfloat16

Always torch.inference_mode(), torch.set_num_threads(--threads, default 2), input float32
[batch, 3, H, W] uniform in [-1, 1]. Compilation runs before the warm-up and is reported
as compile_s, not timed. Prints one JSON line (measure.py).
"""

import argparse
import contextlib
import time

import measure  # a sibling: a script's folder is on sys.path


def main():
  parser = measure.add_common_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
  parser.add_argument('--mode', choices=['eager', 'compile'], default='eager')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  args = parser.parse_args()
  if args.mode == 'eager' and args.dtype != 'float32':
    parser.error('bfloat16 is measured with --mode compile only')

  import torch
  import transformers
  from model import build_model
  torch.set_num_threads(args.threads)
  model = build_model()
  x = torch.rand(args.batch, 3, args.height, args.width,
                 generator=torch.Generator().manual_seed(0)) * 2 - 1
  autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if args.dtype == 'bfloat16'
              else contextlib.nullcontext())
  compile_s = None
  if args.mode == 'compile':
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    model = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
      model(x)   # compiles
    compile_s = round(time.perf_counter() - start, 1)

  with torch.inference_mode(), autocast:
    out = model(x)
    times = measure.time_runs(lambda: model(x), args.warmup, args.iters)
  measure.emit(measure.record(
      f'torch-{args.mode}', args.dtype, args.batch, args.height, args.width, times,
      torch.get_num_threads(), framework=f'torch {torch.__version__}, '
      f'transformers {transformers.__version__}', compile_s=compile_s,
      output_shape=list(out.shape), output_dtype=str(out.dtype).replace('torch.', '')))


if __name__ == '__main__':
  main()
