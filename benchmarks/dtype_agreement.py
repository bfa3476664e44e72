"""How often the bfloat16 (or int8, or float32-kernel) engine predicts XLA's float32 class.

    python benchmarks/dtype_agreement.py --workdir runs/quickstart [--split val]
        [--dtype bfloat16|int8|float32]

Runs the trained model of a workdir through `seg.inference.engine.Engine` in float32 with
XLA's products (the reference, what exports run) and in bfloat16 (bf16 products
accumulating in float32), int8 (the workdir's int8_scales.json, calibrated on the training
split if missing) or float32 in the CPU's own formulation (the project's kernel on AVX-512
CPUs) on every image of the split (at its original size, padded as `eval` pads), and
prints the share of pixels whose predicted class is identical, the worst image's share,
and the largest logit difference relative to the largest float32 logit; and the same share
for the engine's class maps (`Engine.predict`: its own upsampling and argmax, the CPU
kernel's where `upsample_argmax` is 'kernel') against the reference's argmax.
"""

import argparse


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--split', default=None, help='default: the config\'s eval_split')
  parser.add_argument('--batch-size', type=int, default=4)
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'int8', 'float32'))
  args = parser.parse_args()

  import numpy as np
  import tensorflow_datasets as tfds  # benchmark-only script: reads the data like seg/data

  from seg import checkpoint
  from seg.inference import engine
  from seg.data import pipeline
  from seg.model import create_model

  config = checkpoint.load_config(args.workdir)
  variables, step = checkpoint.load_model_variables(args.workdir, create_model(config.model))
  split = args.split or config.data.eval_split
  images = [ex['image'] for ex in tfds.as_numpy(pipeline.split_examples(config.data, split))]
  f32 = engine.Engine(config, variables, 'float32', args.batch_size, f32_formulation='xla')
  scales = (engine.int8_scales_for(args.workdir, config, variables) if args.dtype == 'int8'
            else None)
  bf16 = engine.Engine(config, variables, args.dtype, args.batch_size, int8_scales=scales)
  same = total = same_maps = 0
  worst, max_rel = 1.0, 0.0
  for start in range(0, len(images), 32):
    chunk = images[start:start + 32]
    la, lb = f32.logits(chunk), bf16.logits(chunk)
    for a, b, mask in zip(la, lb, bf16.predict(chunk)):
      agree = np.argmax(a, -1) == np.argmax(b, -1)
      same += int(agree.sum())
      same_maps += int((np.argmax(a, -1) == mask).sum())
      total += agree.size
      worst = min(worst, float(agree.mean()))
      max_rel = max(max_rel, float(np.abs(a - b).max() / np.abs(a).max()))
    print(f'  {min(start + 32, len(images))}/{len(images)} images', flush=True)
  print(f'{args.workdir} (step {step}), {split}: {len(images)} images, {total:,} pixels; '
        f'{args.dtype} formulation: '
        f'{bf16.int8_formulation or bf16.bf16_formulation or bf16.f32_formulation}')
  print(f'  {args.dtype} class == XLA float32 class: {100 * same / total:.3f}% of pixels '
        f'({total - same:,} differ; worst image {100 * worst:.2f}%)')
  print(f'  max |logit difference| / max |float32 logit|: {max_rel:.2e}')
  print(f'  class maps (upsampling and argmax: {bf16.upsample_argmax}) == XLA float32 class: '
        f'{100 * same_maps / total:.3f}% of pixels ({total - same_maps:,} differ)')


if __name__ == '__main__':
  main()
