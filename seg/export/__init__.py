"""Exports of a trained model for other runtimes: LiteRT (`tflite.py`), ONNX (`onnx.py`), Hugging
Face (`hf.py`), beside `seg.inference.export` (the `jax.export` file). `exporter.py` is the
`export` command; `network.py` is the one description of the layers the re-expressions walk."""

FORMATS = ('jax', 'tflite', 'onnx', 'hf')
