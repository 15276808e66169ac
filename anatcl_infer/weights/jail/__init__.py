"""The jail: an untrusted ``.pth``/``.pt`` is read in a separate, limited process that writes safetensors.

The allowlist unpickler (:mod:`anatcl_infer.weights.unpickle`) runs nothing from a file, but it
is written by hand on top of numpy and CPython, inside whatever process calls it: one
overlooked corner (a forged numpy dtype, a tuple nested a million deep) and a 400-byte file
crashes the caller or corrupts its memory. So ``load_model(path.pth)``, URLs, registry files and
``anatcl convert`` read the pickle in a child process instead (:func:`convert_in_jail`):

* a fresh interpreter (``python -I``: no user site, no ``PYTHON*`` variables, not the caller's
  working directory on ``sys.path``) started with ``close_fds`` and stdin from ``/dev/null``;
  its environment is a short allowlist (``PATH``, locale, ``TMPDIR``, ``LD_LIBRARY_PATH``), so no
  proxies, tokens or credentials reach it; ``CUDA_VISIBLE_DEVICES=""`` and one thread;
* on Linux it leaves the network first (``unshare`` of a new network namespace, with a user
  namespace when not root): no interface but a loopback that is down, so no TCP/UDP at all.
  Where unprivileged namespaces are disabled this step is skipped (logged at debug level);
  Unix sockets named by a path stay reachable either way;
* where the kernel has Landlock (Linux >= 5.13), it then keeps write rights only inside its job
  folder and, from Landlock ABI 4, loses TCP too (a second network barrier where namespaces are
  off); older kernels skip this step (logged at debug level);
* after importing torch it sets its own limits: address space (``RLIMIT_AS``) to what it has
  mapped at that point plus the memory budget (2 GiB plus twice the file's size), measured
  rather than fixed so that a CUDA build of torch, which maps far more, gets the same budget;
  CPU time (``RLIMIT_CPU``), the size of files it writes (``RLIMIT_FSIZE``), open files, no core
  dumps; the parent kills it at a wall-clock deadline (120 s plus 1 s per 20 MB);
* it runs the allowlist unpickler (the first layer: nothing in the file is run), picks the
  weights (model or EMA, wrapper prefixes), checks them strictly against the network, and
  writes ``config.json`` + ``model.safetensors`` into a fresh temporary folder, with a JSON report
  of its log lines, warnings or error; then it exits;
* the caller reads only that safetensors file (a format that cannot carry code), checking names
  and shapes before reading any tensor. A crash, a signal, a limit or the deadline becomes one
  :class:`~anatcl_infer.errors.CheckpointError` naming the file and what happened ("killed by
  SIGSEGV", "exceeded the 2.3 GiB memory budget", "took longer than 123 s").

What it does not do: the child runs as the calling user and can read what the user can (and,
without Landlock, write too), and it may start processes; there is no seccomp filter. It is
there so that a parser bug or a resource bomb harms nothing but a throw-away process, and so
that nothing from the file reaches the caller but tensors. The cost is one interpreter start and ``import torch`` (~2-3 s on an idle
machine), paid once per file: the converted form is cached.

:data:`JAIL` holds the limits (tests lower them).
"""

from __future__ import annotations

from .parent import JAIL, JailLimits, convert_in_jail, jailed, read_in_jail

__all__ = ["JAIL", "JailLimits", "convert_in_jail", "read_in_jail", "jailed"]
