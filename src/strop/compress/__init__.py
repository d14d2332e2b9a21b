"""Compress and export a finished run: ONNX, int8, pruning, distillation, each checked against the original."""
