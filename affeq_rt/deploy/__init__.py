"""Deployment: hybrid ONNX models, Triton repositories, OIP v2 serving."""
