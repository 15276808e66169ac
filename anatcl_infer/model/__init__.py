"""The network and where it runs.

Stage 1: ``resnet`` (the bare network, :class:`~anatcl_infer.model.resnet.AnatCLNetwork`),
``fused`` (its fused CPU plan) and ``devices`` (the choice of device) depend only on the
configuration; weights and encoding build on them.

Above encoding: ``network`` holds the public :class:`AnatCL`, the network plus ``encode`` and the
Hugging Face Hub methods, which call the weights and encoding stages. This ``__init__`` imports it,
which registers it as the class the loaders return.
"""

from .network import ARCHITECTURES, AnatCL, ResNet3D, build_encoder

__all__ = ["ARCHITECTURES", "AnatCL", "ResNet3D", "build_encoder"]
