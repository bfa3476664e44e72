"""DeepLabv3 + MobileNetV2 (width 1.0, OS16, reduced head) on PASCAL VOC 2012: the paper's recipe.

    python main.py prepare-data --dataset train_aug --manual-dir /path/with/archives
    python main.py train --config experiments/voc_mnv2_os16.py --workdir runs/voc_mnv2_os16
    python main.py eval --workdir runs/voc_mnv2_os16 --output runs/voc_mnv2_os16/val.json

The recipe of the MobileNetV2 paper and the DeepLab reference: train_aug (10,582
images), 513x513 crops, global batch 16 split across devices, poly learning rate
from 0.007 over 30,000 steps (power 0.9), momentum 0.9, weight decay 4e-5,
BatchNorm fine-tuned and synchronised across devices (decay 0.997 in the MobileNetV2
backbone as TF-slim's training_scope, 0.9997 in the head as DeepLab), random scale
0.5-2.0 and flips, evaluation at OS16 on the 1,449 val images padded to 513x513
(tests/train/test_recipe.py pins each value against DeepLab's sources).

It starts from ImageNet weights, as DeepLab does: without `train.init_from` it stops at
once and prints the import-weights commands below; `--config.train.from_scratch=True`
trains from random weights instead (with a warning: far below the figures below).

Aims for: 75.32% val mIoU, the MobileNetV2 paper's figure (Table 7, "MNet V2*",
OS16, no ASPP, no MF), from a COCO-pretrained checkpoint; public reproductions
report about 70-71% when starting from ImageNet weights alone. NOT reproduced in
this repository: VOC, SBD and pretrained weights cannot be downloaded where it is
developed. Start from ImageNet weights as the recipe does (README, "Pretrained
weights"):

    python main.py import-weights --format deeplab-tf mobilenet_v2_1.0_224 --output runs/mobilenet_v2_1.0_224
    python main.py train --config experiments/voc_mnv2_os16.py --workdir runs/voc_mnv2_os16 \
        --config.train.init_from=runs/mobilenet_v2_1.0_224
"""

from seg.config import default_config


def get_config():
  config = default_config()
  config.data.dataset = 'train_aug'
  config.data.train_split = 'train_aug'
  config.data.eval_split = 'val'
  return config
