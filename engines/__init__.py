"""flowar.engines: builders for ONNX Runtime sessions and TensorRT plans.

Nothing heavy is imported here: ``flowar.engines.ort`` imports onnxruntime and
``flowar.engines.trt`` imports TensorRT (or TensorRT-RTX) only when they are used.
"""
