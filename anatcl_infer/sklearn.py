"""scikit-learn integration (``[sklearn]`` extra): ``AnatCLEncoder`` inside a pipeline.

The implementation lives in :mod:`anatcl_infer.downstream.transformer`.
"""

from ._optional import require

require("sklearn", "sklearn")  # a bare install: MissingDependencyError (an ImportError) naming the extra

from .downstream.transformer import AnatCLEncoder  # noqa: E402

__all__ = ["AnatCLEncoder"]
