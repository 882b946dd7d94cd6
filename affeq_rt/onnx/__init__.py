"""ONNX export of split backbones and the one place that creates onnxruntime sessions."""
