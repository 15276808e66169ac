"""Stage 1 — the network: the 3D ResNet encoder and its projection head (``network``), and the
choice of device it runs on (``devices``).

Depends only on the configuration; weights, encoding and everything else build on it.
"""

from .network import ARCHITECTURES, AnatCL, ResNet3D, build_encoder

__all__ = ["ARCHITECTURES", "AnatCL", "ResNet3D", "build_encoder"]
