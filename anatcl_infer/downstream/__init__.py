"""Stage 4 — downstream: what is done with features.

``features`` (the Parquet features table), ``heads`` (brain-age and score heads), ``probe`` (the
paper's linear-probing protocol), ``transformer`` (the scikit-learn ``AnatCLEncoder``).
"""
