"""``python -m anatcl_infer.weights.jail JOB_DIR``: run one jailed read by hand (the parent normally starts it)."""

from __future__ import annotations

import sys

from .child import main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m anatcl_infer.weights.jail JOB_DIR (a folder holding job.json)")
    sys.exit(main(sys.argv[1]))
