"""scikit-learn integration (``[sklearn]`` extra): ``AnatCLEncoder`` inside a pipeline.

The implementation lives in :mod:`anatcl_infer.downstream.transformer`.
"""

from .downstream.transformer import AnatCLEncoder

__all__ = ["AnatCLEncoder"]
