"""Quickstart: a narrow DeepLabv3-MobileNetV2 trained on the embedded dataset on a CPU.

    python main.py train --config experiments/quickstart.py --workdir runs/quickstart

Trains from scratch, evaluates on the embedded val split and writes `eval.json` in the
workdir; then `python main.py predict --workdir runs/quickstart --input DIR
--output masks/` draws masks. Over seeds: `python benchmarks/quickstart_seeds.py`.

Measured (2026-12-02, the 2-core Intel Xeon VM, `benchmarks/quickstart_seeds.py`; table and
history in docs/training.md): seeds 0, 1, 2 reached 88.22%,
87.69%, 86.58% val mIoU (min 86.58%, mean 87.50%), seed 0 on two fake devices 82.72%; 12m10s
on a quiet machine (seed 1).
With SGD (LR 0.02, the recipe of 2026-12-01) seed 0 gave 68.30% on an AMD EPYC but 56.38% on
this Intel Xeon; the recipe before that (129x129 crops, 2,200 steps, LR 0.05) 50.75-71.87%.
"""

from seg.config import default_config


def get_config():
  config = default_config()
  config.model.width = 0.5
  config.model.backbone_bn_momentum = 0.99  # a short run: statistics must follow the weights
  config.model.head_bn_momentum = 0.99
  # 97x97 crops train 1.8x as many images a second as 129x129 (same objects, textures
  # and scales): more steps in the same time, and the old recipe was under-trained.
  config.data.crop_size = 97
  config.data.eval_size = 161          # the embedded images are at most 160 pixels
  config.data.min_scale = 0.75         # small images: keep textures above the encoder's stride
  config.data.max_scale = 1.5
  config.train.steps = 4000
  config.train.from_scratch = True     # by design: the embedded data needs no ImageNet weights
  config.train.batch_size = 16
  # Adam, not DeepLab's SGD: on the Intel Xeon SGD (LR 0.02) reached 56.38% for seed 0 and was
  # still climbing; Adam 1e-3 72.01%, Adam 3e-3 88.22% (docs/training.md, 2026-12-02).
  config.train.optimizer = 'adam'
  config.train.learning_rate = 0.003
  config.train.warmup_steps = 50
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.eval_every = 0
  config.eval.batch_size = 16
  return config
