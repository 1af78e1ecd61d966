"""The trainer's throughput levers and what a run reports about its speed.

* :mod:`~tvlars_scale.training.levers`: ``model.channels_last`` (NHWC weights and inputs) and
  ``run.compile`` (``torch.compile``, per block where the model repeats blocks), applied around
  Accelerate's ``prepare`` in the order each backend documents;
* :mod:`~tvlars_scale.training.reporting`: model FLOPs per sample, MFU, peak memory, the data-wait
  fraction and the ``run.profile`` trace.
"""
