"""The paper's experiments (arXiv 2309.14053): the run grid (``grid``), the Table-1 report
(``report``), the figures (``plots``), the paper's Table 1 values (``table1.tsv``), an in-process
study with each solution's sharpness (``study``, ``sharpness``).

The library (``optim``, ``data``, ``models``, ``tasks``, ``trainer``, ``checkpoint``) imports nothing
from this package; it only reads what the library writes (a run's ``config.yaml``, ``metrics.json``
and per-layer telemetry)::

    python -m tvlars_scale.paper.grid print [--filter dataset=cifar10 ...]
    python -m tvlars_scale.paper.report runs/paper_table1 > table1.md
    python -m tvlars_scale.paper.plots phi --out phi.png
    python -m tvlars_scale.paper.study run --grid configs/digits_regime.yaml
    python -m tvlars_scale.paper.study summarize runs/digits_regime --out results/digits_regime
"""
