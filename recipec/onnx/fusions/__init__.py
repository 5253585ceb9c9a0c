"""Rewrite rules recipec adds where onnxruntime's and onnxscript's fusions do not fire (see docs/onnx-passes.md)."""
