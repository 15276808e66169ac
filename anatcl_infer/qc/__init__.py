"""Quality control: what the model sees. ``metrics`` (per-input numbers and flags), ``plots``
(three-slice pictures, ``[qc]`` extra), ``report`` (the ``anatcl qc`` folder and HTML page).
"""
