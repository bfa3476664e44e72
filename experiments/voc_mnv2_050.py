"""voc_mnv2_os16.py with MobileNetV2 width (depth multiplier) 0.5.

    python main.py import-weights --format deeplab-tf mobilenet_v2_0.5_224 --output runs/mnv2_050
    python main.py train --config experiments/voc_mnv2_050.py --workdir runs/voc_mnv2_050 \
        --config.train.init_from=runs/mnv2_050

Channel counts: TF-slim's ImageNet checkpoint mobilenet_v2_0.5_224
(https://storage.googleapis.com/mobilenet_v2/checkpoints/mobilenet_v2_0.5_224.tgz), the one
this recipe starts from, rounds them to multiples of 8 (`model.divisible_by = 8`, the
default). DeepLab's own width-0.5 VOC model, mobilenetv2_dm05_coco_voc_trainaug
(deeplabv3_mnv2_dm05_pascal_trainaug_2018_10_01.tar.gz, 70.19% val in DeepLab's model zoo),
comes from DeepLab's feature extractor, which rounds them to multiples of 1 at depth
multipliers other than 1 (`model.divisible_by = 1`; 12 instead of 16 channels after the
second block). `import-weights` reads the rounding from the file's shapes either way. No
figure of either has been reproduced in this repository (see voc_mnv2_os16.py).
"""

from experiments import voc_mnv2_os16


def get_config():
  config = voc_mnv2_os16.get_config()
  config.model.width = 0.5
  config.model.divisible_by = 8   # TF-slim's mobilenet_v2_0.5_224 (see above)
  return config
