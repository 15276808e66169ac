"""Mutated real checkpoints (tests/checkpoint_mutations.py): each loads or ends in a package error, in bounded memory.

120 cases run through the allowlist unpickler and the state-dict extraction in a worker process
under a 4 GiB address-space limit (a death would be reported, the worker restarted); a few also go
through ``load_model``, i.e. the jail. ``benchmarks/checkpoint_fuzz.py --n 10000`` is the long run.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path

import pytest

from checkpoint_mutations import KINDS, run_fuzz, write_cases

N_CASES = 120
PEAK_RSS = 1536 << 20  # the first layer's 1 GiB budget plus torch and the interpreter

_ALLOWED = {"loaded", "loaded (CheckpointError)", "CheckpointError", "UnsafeCheckpointError"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicated members it is asked to write
        return write_cases(tmp_path_factory.mktemp("fuzz"), N_CASES, seed=22)


@pytest.mark.slow
def test_every_mutant_loads_or_is_a_package_error_and_the_worker_never_dies(cases, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = run_fuzz([p for _s, _k, p in cases], tmp_path, timeout=600, env=env)
    outcomes = result["outcomes"]
    assert len(outcomes) == N_CASES >= 100
    assert not result["deaths"], result["deaths"]
    unexpected = {p: o for p, o in outcomes.items() if o not in _ALLOWED}
    assert not unexpected, unexpected
    assert result["peak_rss"] < PEAK_RSS, result["peak_rss"]
    # the corpus exercises every kind of mutation, and both outcomes
    assert {k for _s, k, _p in cases} >= set(KINDS) - {"legacy_flip", "zip_flip"}
    counts = collections.Counter(outcomes.values())
    assert counts["loaded"] > 0 and counts["CheckpointError"] > N_CASES // 2


@pytest.mark.slow
def test_mutants_through_load_model_end_in_package_errors(cases):
    from anatcl_infer import load_model
    from anatcl_infer.errors import AnatCLError

    picked = [p for _s, kind, p in cases if kind in ("deep_nesting", "huge_integer", "swap_global")][:3]
    for path in picked:
        with pytest.raises(AnatCLError) as info:
            load_model(path, device="cpu")  # the seeds are not AnatCL networks: at best a key mismatch
        assert str(path) in str(info.value)
