"""Stage 1 — inputs: find scans, read them, check them, and put them on the model's grid.

``discovery`` (files, folders, globs, BIDS) → ``io`` (reading: ``headers`` says what a header means, as
nibabel does; ``streams`` moves the bytes, bounded) → ``checks`` (refusals and
input-kind guess) → ``conform`` (exact re-indexing or resampling onto the reference grid) →
``preprocess.prepare`` (the whole chain, driven by a ``PreprocessConfig``). ``template`` is the
packaged MNI152 grey-matter template; ``raw_t1`` is the optional raw-T1 route (``[prep]`` extra).
"""
