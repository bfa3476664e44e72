"""Quickstart: a narrow DeepLabv3-MobileNetV2 trained on the embedded dataset on a CPU.

    python main.py train --config experiments/quickstart.py --workdir runs/quickstart

Trains, evaluates on the embedded val split and writes `eval.json` in the
workdir; then `python main.py predict --workdir runs/quickstart --input DIR
--output masks/` draws masks. Measured: see the README (figure and time).
"""

from experiments import base


def get_config():
  config = base.get_config()
  config.model.width = 0.5
  config.model.bn_momentum = 0.99      # a short run: statistics must follow the weights
  config.data.crop_size = 129
  config.data.eval_size = 161          # the embedded images are at most 160 pixels
  config.data.min_scale = 0.75         # small images: keep textures above the encoder's stride
  config.data.max_scale = 1.5
  config.train.steps = 2200
  config.train.batch_size = 16
  config.train.learning_rate = 0.05
  config.train.warmup_steps = 50
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.eval_every = 0
  config.eval.batch_size = 16
  return config
