"""ZeRO-3's per-layer gather inside the layer scan, with the gradient split back where it was.

Under -z 3 the stacked per-layer tensors arrive split over the devices (the step runs per device in
shard_map); the scan body all_gathers one layer's tensors as it reaches the layer, and the
transpose of that gather reduce-scatters each layer's gradient in the dtype the forward read (bf16
in a bf16 run, as llm.c's). Left to XLA's partitioner, the backward first all-reduced every whole
fp32 per-layer gradient (Llama 3.1-8B on 8 GPUs: 161 all-reduces moving 26 GiB a step), then, with
the gradients constrained back to their split layout, reduce-scattered them in fp32 (26.38 GiB; 14.96
in bf16 here)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class LayerGather:
    """axis_name: the mesh axis the layer tensors are split over; dims, per tensor name, the
    dimension of a layer's slice to all_gather over it."""

    axis_name: str
    dims: tuple[tuple[str, int], ...] = ()

    @property
    def names(self) -> frozenset[str]:
        """The tensors gathered inside the layer scan (the rest are gathered before the model runs)."""
        return frozenset(name for name, _ in self.dims)


def gathered_block(block: Callable, gather: LayerGather | None) -> Callable:
    """The scan body `block(carry, (layer tensors, ...))` with the layer's tensors gathered first."""
    if gather is None:
        return block
    dims = dict(gather.dims)
    return lambda carry, xs: block(carry, ({k: jax.lax.all_gather(v, gather.axis_name, axis=dims[k], tiled=True)
                                            if k in dims else v for k, v in xs[0].items()}, *xs[1:]))
