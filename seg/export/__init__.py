"""Exports of a trained model for other runtimes: LiteRT (`tflite.py`) and ONNX (`onnx.py`), both
re-expressions of the folded network that walk `network.py`; Hugging Face folders are written by
`seg.weights.hf.write_hf` (beside its reader, one name mapping both ways), `jax.export` files by
`seg.inference.export`. `exporter.py` is the `export` command."""

FORMATS = ('jax', 'tflite', 'onnx', 'hf')
