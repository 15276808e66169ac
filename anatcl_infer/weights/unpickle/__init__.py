"""Read ``torch.save`` checkpoints without executing any code from them, in bounded memory.

The authors' ``.pth`` files are pickles that carry training-time objects next to the
weights: an ``argparse.Namespace`` of options, optimizer and GradScaler state, a fitted
``models.estimators.AgeEstimator`` (a scikit-learn ``GridSearchCV`` with masked arrays
and scorer functions) or whole ``nn.Module`` objects of classes that cannot be imported.
This package reads the torch container itself (zip, or the legacy pre-1.6 stream) and
unpickles it with an allowlist:

* tensors are rebuilt here from the raw storage bytes, read straight from the file
  after their declared sizes were checked against the archive; overlapping or stride-0
  views are refused;
* containers, primitives, namespaces, paths, dates, numpy arrays/scalars, dtypes,
  ``torch.Size`` and ``torch.device`` are reconstructed;
* a class or function of a module outside the standard library, torch and numpy is
  never imported: it becomes an inert placeholder, dropped from the result, except that
  an ``nn.Module`` placeholder is turned into its state dict (whole-model pickles);
* any other global of the standard library, torch or numpy (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``, ``torch.load``...), and loader functions of
  other libraries (``joblib.load``, ``dill``...), are refused with
  :class:`~anatcl_infer.errors.UnsafeCheckpointError`.

Why not PyTorch's ``weights_only`` unpickler with ``safe_globals`` stand-ins: its own
allowlist calls ``bytearray``/storage constructors with sizes the file chooses (a 3 MB
file can ask for 8 GiB, and the legacy format allocates every storage at its declared
size before reading it), it bounds neither nesting nor object count, and stand-ins are
registered in a process-wide list, so one file's names would leak into the next load
(and into other threads). Reading storages directly keeps this loader about as fast as
``torch.load`` (``benchmarks/checkpoint_load.py``).

Modules (each imports only the ones above it):

* :mod:`.limits`: :data:`LIMITS` and the errors for a broken bound;
* :mod:`.prescan`: the opcode pre-scan run before any pickle is unpickled;
* :mod:`.stand_ins`: placeholders and frozen wrappers handed to the unpickler;
* :mod:`.rebuild`: tensor, storage and numpy rebuilds;
* :mod:`.allowlist`: the allowlist and the unpickler applying it;
* :mod:`.result`: the returned object (tensors materialised, placeholders dropped);
* :mod:`.containers`: the zip and legacy container readers;
* :mod:`.load`: :func:`safe_load`.
"""

from __future__ import annotations

from .allowlist import _ALLOWED
from .limits import LIMITS
from .load import safe_load
from .stand_ins import Placeholder

__all__ = ["safe_load", "Placeholder", "LIMITS"]
