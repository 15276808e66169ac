"""Stage 3 — encoding: volumes to 512-d features, batched on CPU or GPU.

``encoder`` (``encode``, ``extract_features``, the loader),
``allocator`` (keep freed memory on CPU).
"""
