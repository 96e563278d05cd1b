"""ONNX: the graph emitter for embedded architectures, the tracer fallback, and artifact sessions."""
