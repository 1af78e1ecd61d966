"""The training loop's wing: throughput levers, speed reporting, and recipe pieces.

* :mod:`~tvlars_scale.training.levers`: ``model.channels_last`` (NHWC weights and inputs) and
  ``run.compile`` (``torch.compile``, per block where the model repeats blocks), applied around
  Accelerate's ``prepare`` in the order each backend documents;
* :mod:`~tvlars_scale.training.reporting`: model FLOPs per sample, MFU, peak memory, the data-wait
  fraction and the ``run.profile`` trace;
* :mod:`~tvlars_scale.training.ema`: ``run.ema``, the moving average of the weights, sharded like
  the master weights and evaluated beside them;
* :mod:`~tvlars_scale.training.clip` and :mod:`~tvlars_scale.training.optimizer_step`:
  ``optim.grad_clip`` (one all-reduce) and the step that skips non-finite gradients;
* :mod:`~tvlars_scale.training.init_from`: ``model.init_from`` (weights from a checkpoint, an
  export or a timm weights file, a new head where the class count differs).
"""
