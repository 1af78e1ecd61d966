"""The training loop's wing: throughput levers, speed reporting, and recipe pieces.

* :mod:`~tvlars_scale.training.levers`: ``model.channels_last`` (NHWC inputs, and weights where
  the engine keeps their layout) and ``run.compile`` (``torch.compile`` of the whole model, or of
  its repeated blocks with ``run.compile_regional``), applied around
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
