"""Stage 2 — weights: where checkpoints come from and how they are read safely.

``registry`` (published models, from the top-level ``weights/manifest.json``) → ``download``
(URLs and the Hugging Face Hub, hash-verified) → ``jail`` (a separate, limited process that runs
``unpickle`` -- the authors' pickles, no code run -- and ``selection`` -- model or EMA weights,
wrapper prefixes -- and writes safetensors) → ``convert`` (original file → ``config.json`` +
``model.safetensors``) → ``checkpoint`` (that format, strict keys) → ``integrity`` (the record
written beside a cached model at conversion, checked at every load) → ``loading.load_model`` (any
source to a ready network). ``untrained`` builds the published network with random weights from a
seed; ``publish`` pushes a converted model to the Hub.
"""
