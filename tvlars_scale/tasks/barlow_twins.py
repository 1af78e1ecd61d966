r"""Barlow Twins pretraining (Zbontar et al., 2021) at very large batch.

Objective
---------
Two augmented views of the same images go through the backbone and the projector, giving embeddings
:math:`z^A, z^B \in \mathbb{R}^{N \times D}`. Each embedding dimension is standardised over the
batch (batch norm without affine parameters, biased variance, eps 1e-5, as the reference code's
``nn.BatchNorm1d(D, affine=False)``), and the cross-correlation matrix

.. math::
    C_{ij} = \frac{1}{N} \sum_b \hat z^A_{b,i} \hat z^B_{b,j}

is pushed towards the identity:
:math:`L = \sum_i (1 - C_{ii})^2 + \lambda_{\text{off}} \sum_{i \ne j} C_{ij}^2`,
with :math:`\lambda_{\text{off}} = 0.0051` by default.

Across ranks
------------
N is the *global* micro-batch: the per-dimension means and variances, and the cross-correlation
itself, are sums over samples, so every rank computes its partial sums and one ``all_reduce(SUM)``
over the data-parallel group completes each (``_global_sum``). The reference implementation
all-reduces ``C`` but standardises with ``SyncBatchNorm``; here the statistics are reduced
explicitly, so the loss is that of the concatenated batch whatever the world size, and it is
replicated on every rank. Autograd on each rank therefore differentiates ``world_size * L`` with
respect to its own rows, and the data-parallel gradient *averaging* of DDP and DeepSpeed turns that
into the gradient of the global ``L`` exactly. The statistics' all-reduces are all-reduced again in
the backward pass (two vectors of length D); the D x D all-reduce of ``C`` is not: everything
downstream of ``C`` is replicated, so its backward all-reduce is ``world_size * grad``, computed
locally (``_AllReduceSum``).

What gradient accumulation does to this objective
-------------------------------------------------
The loss is not a mean over samples: the batch statistics and the square of ``C`` couple all N
samples. Plain accumulation over K micro-batches of n samples (K n = N) optimises
:math:`\frac{1}{K} \sum_k L(C_k)` where each :math:`C_k` is standardised with its own micro-batch
statistics. That is a different objective from :math:`L(C)` of the effective batch: with
:math:`C_k = C + \epsilon_k` and sampling noise of variance about :math:`1/n` per (weakly
correlated) entry, the squares give
:math:`\frac{1}{K} \sum_k L(C_k) \approx L(C) + \lambda_{\text{off}} D (D - 1) / n + O(D / n)`.
The extra terms depend on the *micro*-batch size and not on the effective batch (D = 4096,
n = 64: about 1,300, the order of the loss itself), so a "16K batch" built from 64-sample
micro-batches trains on a 64-sample objective, with noisier correlations and a redundancy
penalty it can never remove, not on the 16K one whose behaviour the paper's Table 1 reports. The
gradient is the mean of per-micro-batch gradients: it is not the big-batch gradient either.

Exact accumulation (Gradient Cache, Gao et al., 2021)
-----------------------------------------------------
``gradient_cache_step`` restores the effective-batch objective at the memory cost of the micro
batch: (1) embed every micro-batch of the step without gradients, (2) compute the loss over the
whole effective batch (across ranks) and its gradient with respect to the cached embeddings,
(3) recompute each micro-batch with gradients and back-propagate its slice of the cached embedding
gradient. Its parameter gradients are those of the big-batch loss (up to floating-point order),
for a model without batch statistics in the backbone; batch-norm layers inside the backbone or
projector still normalise per micro-batch (and per rank unless converted to SyncBatchNorm), which
no accumulation scheme can undo. Costs: one extra forward pass per micro-batch and the augmented
views of the step kept in memory (``2 x per-rank effective batch`` images).

The recompute must see the inputs of the first pass exactly: the augmented views are cached (not
re-drawn), and the RNG state before each micro-batch's first forward is replayed before its
recompute so that dropout / stochastic depth draw the same masks. Buffers (batch-norm running
statistics) are restored after the no-grad pass so they are updated once per micro-batch, by the
recompute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tvlars_scale.config import Config
from tvlars_scale.data import BatchAugment, ImageData
from tvlars_scale.data.loader import PAD_LABEL
from tvlars_scale.data.ssl_views import TwoViewAugment, barlow_twins_recipe
from tvlars_scale.data.stream_loader import StreamingLoader, Transform
from tvlars_scale.data.streaming import StreamingData
from tvlars_scale.models import init_kaiming_uniform
from tvlars_scale.tasks.base import Accumulation, MicroBatch, Task, build_configured_model
from tvlars_scale.tasks.linear_eval import LinearEvalSettings, extract_features, linear_evaluation

DEFAULT_PROJECTOR_DIMS: tuple[int, ...] = (2048, 2048, 4096)
DEFAULT_OFF_DIAGONAL_WEIGHT = 0.0051
BATCH_NORM_EPS = 1e-5  # as nn.BatchNorm1d, which the reference uses to standardise embeddings

ViewPair = tuple[Tensor, Tensor]


def build_projector(in_dim: int, dims: Sequence[int] = DEFAULT_PROJECTOR_DIMS) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a last Linear without BN/ReLU (the paper's projector)."""
    if not dims:
        raise ValueError("projector dims must name at least one layer")
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in dims[:-1]:
        # No bias before BN: BN's shift makes it redundant (as in the reference code).
        layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(True)]
        width = hidden
    layers.append(nn.Linear(width, dims[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwinsModel(nn.Module):
    """Backbone (features, no classifier head) followed by the projector."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projector_dims: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.projector = build_projector(feature_dim, projector_dims)

    def forward(self, view1: Tensor, view2: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``(z1, z2)`` for a pair of views; the backbone's features for one batch of images.

        Both views go through ONE call: DDP and the DeepSpeed engine expect one forward per
        backward (two wrapped calls would mark each parameter's gradient ready twice).
        """
        if view2 is None:
            return self.backbone(view1)
        return self.projector(self.backbone(view1)), self.projector(self.backbone(view2))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all_reduce(SUM); with ``replicated_consumer`` no collective in its backward.

    Every rank computes the same loss, so autograd on each rank differentiates ``world_size * L``
    with respect to its own inputs; the data-parallel gradient averaging (DDP, DeepSpeed) divides
    that back to the gradient of ``L``. The backward of an all-reduce is the all-reduce of the
    upstream gradients. When everything downstream of the result is replicated (the loss computed
    from the global ``C``), the upstream gradient is the same on every rank and that all-reduce is
    ``world_size * grad``: computed locally, which saves the D x D collective in the backward pass.
    """

    @staticmethod
    def forward(ctx, partial: Tensor, group, replicated_consumer: bool) -> Tensor:
        ctx.group, ctx.replicated_consumer = group, replicated_consumer
        total = partial.clone()
        # collective: all_reduce(SUM) of this rank's partial sums over the data-parallel group
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None, None]:
        if ctx.replicated_consumer:
            return grad_total * dist.get_world_size(ctx.group), None, None
        grad = grad_total.clone()
        # collective: all_reduce(SUM) of the upstream gradients (they differ per rank here)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None, None


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _global_sum(
    partial: Tensor, group: dist.ProcessGroup | None, replicated_consumer: bool = False
) -> Tensor:
    if not _distributed(group):
        return partial
    return _AllReduceSum.apply(partial, group, replicated_consumer)


def cross_correlation(z1: Tensor, z2: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Cross-correlation ``C`` (D x D) of the two views over the global batch of all ranks.

    Three all-reduces: the per-dimension sums (and the sample count), the centred squared sums
    (two passes, like batch norm: no cancellation from E[z^2] - E[z]^2), and ``C`` itself. In the
    backward pass only the two small statistics vectors are all-reduced, never ``C``.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"need two (N, D) embeddings of one shape: {z1.shape}, {z2.shape}")
    # fp32: under bf16 autocast the D x D products and the squared sums lose too much precision.
    views = torch.stack([z1, z2]).float()  # (2, N, D)
    local_count = views.new_tensor([views.shape[1]])
    sums = _global_sum(torch.cat([views.sum(1).flatten(), local_count]), group)
    num_samples = sums[-1]
    centered = views - (sums[:-1] / num_samples).view(2, 1, -1)
    var = _global_sum(centered.pow(2).sum(1), group) / num_samples
    z1_hat, z2_hat = centered * torch.rsqrt(var + BATCH_NORM_EPS).unsqueeze(1)
    return _global_sum(z1_hat.T @ z2_hat, group, replicated_consumer=True) / num_samples


def _off_diagonal(c: Tensor) -> Tensor:
    """A view of the off-diagonal entries of a square matrix (no copy, no cancellation)."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


def barlow_twins_loss_from_correlation(
    c: Tensor, off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT
) -> Tensor:
    on_diagonal = (torch.diagonal(c) - 1.0).pow(2).sum()
    return on_diagonal + off_diagonal_weight * _off_diagonal(c).pow(2).sum()


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The Barlow Twins loss of the global batch; identical on every rank of ``group``."""
    return barlow_twins_loss_from_correlation(cross_correlation(z1, z2, group), off_diagonal_weight)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    device_state = None
    if device.type != "cpu":
        device_state = torch.get_device_module(device.type).get_rng_state(device)
    return torch.get_rng_state(), device_state


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    cpu_state, device_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.get_device_module(device.type).set_rng_state(device_state, device)


def gradient_cache_step(
    model: nn.Module,
    micro_batches: Sequence[ViewPair],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    backward: Callable[[Tensor], None],
    micro_batch_context: Callable[[], AbstractContextManager] = nullcontext,
) -> Tensor:
    """One optimizer step's backward passes with the effective-batch loss (exact accumulation).

    ``model(view1, view2) -> (z1, z2)``; ``micro_batches`` are this rank's augmented view pairs
    for the step (cached, so the recompute sees the same pixels); ``loss_fn`` maps the step's
    embeddings (this rank's rows) to the loss of the whole effective batch (it reduces across
    ranks). Each micro-batch is then recomputed inside ``micro_batch_context()`` and
    ``backward(surrogate)`` is called there: ``surrogate`` is a scalar whose parameter gradient is
    the micro-batch's share of the effective-batch gradient, so the caller can route it through
    its own backward (Accelerate / DeepSpeed accumulation). Returns the detached loss.
    """
    if not micro_batches:
        raise ValueError("gradient_cache_step needs at least one micro-batch")
    device = micro_batches[0][0].device
    buffers = [b.detach().clone() for b in model.buffers()]
    rng_states, cached_z1, cached_z2 = [], [], []
    with torch.no_grad():
        for view1, view2 in micro_batches:
            rng_states.append(_rng_state(device))
            z1, z2 = model(view1, view2)
            cached_z1.append(z1)
            cached_z2.append(z2)
        # Running statistics are updated by the recompute below; undo the first pass's update.
        for live, saved in zip(model.buffers(), buffers, strict=True):
            live.copy_(saved)

    z1 = torch.cat(cached_z1).requires_grad_(True)
    z2 = torch.cat(cached_z2).requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(z1, z2)
        grad_z1, grad_z2 = torch.autograd.grad(loss, (z1, z2))
    sizes = [view1.shape[0] for view1, _ in micro_batches]
    for (view1, view2), rng_state, g1, g2 in zip(
        micro_batches, rng_states, grad_z1.split(sizes), grad_z2.split(sizes), strict=True
    ):
        _set_rng_state(device, rng_state)
        with micro_batch_context():
            y1, y2 = model(view1, view2)
            backward((y1 * g1).sum() + (y2 * g2).sum())
    return loss.detach()


class BarlowTwinsTask(Task):
    """Barlow Twins pretraining; each evaluation is a linear evaluation of the frozen backbone."""

    # The loss is over the global (micro-)batch: its statistics all-reduce the sample count, so
    # micro batches that differ by one sample between ranks need no weighting.
    loss_is_sample_mean = False

    def __init__(self, config: Config, data: ImageData | StreamingData, rank: int):
        self.config, self.data, self.settings = config, data, config.task
        # Streamed data arrives as DecodedViews (cropped in the loader's workers, with each view's
        # photometric parameters): the device applies the rest of the same recipe.
        recipe = barlow_twins_recipe(data.image_size, data.mean, data.std, flip=config.data.flip)
        self.augment = TwoViewAugment(recipe, seed=config.run.seed + rank)
        self.eval_transform = BatchAugment(data.mean, data.std, train=False)
        self._train_features: tuple[Tensor, Tensor] | None = None  # per evaluation

    def build_model(self) -> nn.Module:
        model = self.config.model
        backbone = build_configured_model(self.config, self.data)
        backbone.reset_classifier(0)  # timm interface: the model now returns pooled features
        bt_model = BarlowTwinsModel(backbone, backbone.num_features, self.settings.projector_dims)
        if model.init == "kaiming_uniform":
            init_kaiming_uniform(bt_model.projector)
        if model.sync_batchnorm:
            bt_model = nn.SyncBatchNorm.convert_sync_batchnorm(bt_model)
        return bt_model

    def state_dict(self) -> dict:
        return {"augment": self.augment.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.augment.load_state_dict(state["augment"])

    def _loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return barlow_twins_loss(z1, z2, self.settings.off_diagonal_weight)

    def training_loss(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return self._loss(*model(*self.augment(images)))

    def forward_backward(
        self, model: nn.Module, micro_batches: Sequence[MicroBatch], accumulation: Accumulation
    ) -> Tensor:
        if not self.settings.exact_accumulation or len(micro_batches) == 1:
            return super().forward_backward(model, micro_batches, accumulation)
        views = [self.augment(images) for images, _ in micro_batches]
        # accumulation.backward divides by grad_accum_steps; the surrogates already carry each
        # micro-batch's exact share of the effective-batch gradient.
        scale = float(len(micro_batches))
        return gradient_cache_step(
            model,
            views,
            self._loss,
            lambda surrogate: accumulation.backward(surrogate * scale),
            accumulation.micro_batch,
        )

    def eval_outputs(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if self._train_features is None:  # first test micro-batch of this evaluation
            self._train_features = self._training_split_features(model, images.device)
        return {"features": model(self.eval_transform(images)).float(), "label": labels}

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        train_features, train_labels = self._train_features
        self._train_features = None
        # host sync: boolean indexing of the padding mask, once per evaluation.
        valid = outputs["label"] != PAD_LABEL
        settings = LinearEvalSettings(
            epochs=self.settings.linear_eval_epochs,
            batch_size=self.settings.linear_eval_batch_size,
            lr=self.settings.linear_eval_lr,
            weight_decay=self.settings.linear_eval_weight_decay,
            seed=self.config.run.seed,
        )
        test_features, test_labels = outputs["features"][valid], outputs["label"][valid]
        return linear_evaluation(
            train_features,
            train_labels,
            test_features,
            test_labels,
            self.data.num_classes,
            settings,
        )

    def _training_split_features(self, model: nn.Module, device: torch.device):
        """Backbone features of the whole training split, every rank computing an equal share."""
        if isinstance(self.data, StreamingData):
            return self._streamed_training_split_features(model, device)
        images, labels = self.data.train_images, self.data.train_labels
        world_size = dist.get_world_size() if _distributed(None) else 1
        rank = dist.get_rank() if world_size > 1 else 0
        per_rank = -(-len(images) // world_size)
        # Equal shares (the last wraps around) so that every rank runs the same number of forwards:
        # ZeRO-3 gathers parameters collectively inside each one.
        index = torch.arange(rank * per_rank, (rank + 1) * per_rank) % len(images)
        local = extract_features(
            model, images[index], self.eval_transform, self.config.batch.micro_batch_size, device
        )
        if world_size > 1:
            shares = [torch.empty_like(local) for _ in range(world_size)]
            # collective: all_gather of every rank's share of the training features
            dist.all_gather(shares, local)
            local = torch.cat(shares)[: len(images)]
        return local, labels.to(device)

    def _streamed_training_split_features(self, model: nn.Module, device: torch.device):
        """The training split read like the evaluation split (centre crops, no augmentation):
        each rank its shard, padded to equal micro batches (ZeRO-3 gathers parameters in every
        forward), the shards gathered back into the split's order. A full read of the split per
        evaluation, by a loader made for it and closed at its end (no decode workers idle
        between evaluations)."""
        world_size = dist.get_world_size() if _distributed(None) else 1
        rank = dist.get_rank() if world_size > 1 else 0
        data = self.config.data
        loader = StreamingLoader(
            self.data.train,
            Transform(self.data.image_size, train=False, eval_resize=data.eval_resize),
            self.config.batch.micro_batch_size,
            rank,
            world_size,
            shuffle=False,
            drop_last=False,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            bad_images=data.bad_images,
            device=device,
        )
        features, labels = [], []
        for images, batch_labels in loader:
            features.append(model(self.eval_transform(images)).float())
            labels.append(batch_labels)
        loader.close()
        local = torch.cat(features), torch.cat(labels)
        if world_size > 1:
            gathered = []
            for tensor in local:
                shares = [torch.empty_like(tensor) for _ in range(world_size)]
                # collective: all_gather of every rank's share of the training features / labels
                dist.all_gather(shares, tensor)
                # Rank r holds global micro batch k's r-th slice: back to [k, r, sample] order.
                stacked = torch.stack(shares).unflatten(1, (len(loader), -1)).transpose(0, 1)
                gathered.append(stacked.flatten(0, 2))
            local = tuple(gathered)
        # Without shuffling, the split's samples come first in order, then the padding.
        return local[0][: len(self.data.train)], local[1][: len(self.data.train)]
