"""The embed stage: texts in, dense vectors out (ONNX Runtime)."""
