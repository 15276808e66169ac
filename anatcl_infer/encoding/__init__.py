"""Stage 3 — encoding: volumes to 512-d features, batched on CPU or GPU.

``encoder`` (``encode``, ``extract_features``), ``backends`` (who runs the forward pass: torch, or
OpenVINO on CPU via ``openvino_backend``), ``prefetch`` (the loader thread),
``allocator`` (keep freed memory on CPU).
"""
