"""Quality control and explanation: what the model sees, and what drives its predictions.

``metrics`` (per-input numbers and the ``qc_flag`` rule), ``plots`` (three-slice pictures,
``[qc]`` extra), ``report`` (the ``anatcl qc`` folder and its HTML page, from
``templates/report.html.j2``), ``explain`` (gradient × input relevance maps behind
``anatcl explain``).
"""
