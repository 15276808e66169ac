"""Read ``torch.save`` checkpoints without executing any code from them, in bounded memory.

The authors' ``.pth`` files are pickles that carry training-time objects next to the
weights: an ``argparse.Namespace`` of options, optimizer and GradScaler state, a fitted
``models.estimators.AgeEstimator`` (a scikit-learn ``GridSearchCV`` with masked arrays
and scorer functions) or whole ``nn.Module`` objects of classes that cannot be imported.
This package reads the torch container itself (zip, or the legacy pre-1.6 stream) and
unpickles it with an allowlist:

* tensors are rebuilt here from the raw storage bytes, read straight from the file
  after their declared sizes were checked against the archive; overlapping or stride-0
  views are refused, and views share their storage (as with ``torch.load``);
* containers, primitives, namespaces, paths, dates, ``torch.Size`` and ``torch.device`` are
  reconstructed; numpy arrays, scalars and dtypes only of plain numeric/bool kinds (a dtype's
  state may set its byte order and nothing else; void and structured dtypes are refused,
  object/text ones held inert and dropped);
* before anything is built, the opcode stream is walked: its size, object count, memo and the
  nesting depth of every object are bounded (a tuple nested a million deep would overflow the
  C stack when hashed); every size a load allocates -- storages, the pickle, numpy arrays as
  itemsize x count, ``bytearray(n)``, containers built from ranges or text -- is charged in
  bytes to one budget per load (``LIMITS["memory_bytes"]`` plus the file's size);
* a class or function of a module outside the standard library, torch and numpy is
  never imported: it becomes an inert placeholder, dropped from the result, except that
  an ``nn.Module`` placeholder is turned into its state dict (whole-model pickles); so do
  classes of ``__main__`` (the training script), ``typing`` names, numpy random generators
  and seed sequences, a few data-only standard-library classes, and ``functools.partial``
  with the callable it wraps (never called);
* any other global of the standard library, torch or numpy (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``, ``torch.load``...), and loader functions of
  other libraries (``joblib.load``, ``dill``...), are refused with
  :class:`~anatcl_infer.errors.UnsafeCheckpointError`;
* every failure is a :class:`~anatcl_infer.errors.CheckpointError` (a FIFO or a device is
  refused before a byte is read); nothing else escapes.

This is the first layer. ``load_model`` and ``anatcl convert`` run it in a separate, limited
process (:mod:`anatcl_infer.weights.jail`), so that a crash or a bomb it misses harms nothing.

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
