"""The paper's experiments (arXiv 2309.14053): the run grid (``grid``), the Table-1 report
(``report``), the figures (``plots``) and the paper's Table 1 values (``table1.yaml``).

The library (``optim``, ``data``, ``models``, ``tasks``, ``trainer``, ``checkpoint``) imports nothing
from this package; it only reads what the library writes (a run's ``config.yaml``, ``metrics.json``
and per-layer telemetry)::

    python -m tvlars_scale.paper.grid print [--filter dataset=cifar10 ...]
    python -m tvlars_scale.paper.report runs/paper_table1 > table1.md
    python -m tvlars_scale.paper.plots phi --out phi.png
"""
