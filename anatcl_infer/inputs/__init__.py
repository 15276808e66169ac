"""Stage 1 — inputs: find scans, read them, check them, and put them on the model's grid.

``discovery`` (files, folders, globs, BIDS) → ``io`` (reading: ``headers`` says what a header means, as
nibabel does; ``streams`` moves the bytes, bounded) → ``checks`` (refusals and
input-kind guess) → ``conform`` (exact re-indexing or resampling onto the reference grid) →
``preprocess.prepare`` (the whole chain, driven by a ``PreprocessConfig``). ``template`` is the
packaged MNI152 grey-matter template. The optional raw-T1 routes (``[prep]`` extra): ``t1_route``
(:func:`~anatcl_infer.inputs.t1_route.prepare_t1`, the one entry point, routed by the model's input
kind), ``registration`` (SimpleITK affine registration to MNI152 and its similarity) and ``raw_t1``
(deepmriprep, deepbet and their weights).
"""
