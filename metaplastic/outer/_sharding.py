"""Shard the meta-batch (gradient) or population (ES) axis over the devices of the run."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._errors import MetaplasticError

#: ``train.vmap_width = 0`` (auto): every device runs ``lax.map`` over single entries
#: (vmapped one at a time). Results are then bit-identical for any device count, since every
#: entry is computed by the same program, and 1 is the only width that divides every
#: device's share for every device count. Cost, measured with
#: ``scripts/bench_vmap_width.py`` on the 2-core CPU (digits preset, pool rule, one device;
#: ``results/bench/vmap_width_cpu.json``): width 1 takes 7.8 ms per episode for
#: forward-mode meta-gradients (meta-batch 16) against 4.0 ms with the whole meta-batch
#: vmapped at once, and 0.59 against 0.39 ms per member-episode for OpenAI-ES (population
#: 16); widths 4 and 8 lie in between. At the reference size batching does not help
#: (docs/performance.md). ``-1`` vmaps each device's whole share at once.
AUTO_VMAP_WIDTH = 1
#: ``train.vmap_width`` value for "vmap each device's whole share at once" (the former
#: default: fastest on small networks, not bit-identical across device counts).
WHOLE_SHARE = -1


class AxisSharding(eqx.Module):
    """Splits a leading axis over ``n`` devices and gathers results back (replicated).

    With one device both operations are the identity, so single- and multi-device runs
    execute the same program apart from where the work happens; reductions always run on
    the gathered, replicated arrays, which keeps results independent of the device count.
    """

    n: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    split: NamedSharding | None = eqx.field(static=True)
    whole: NamedSharding | None = eqx.field(static=True)

    def __init__(self, requested: int, axis_size: int, what: str, width: int = 0):
        available = jax.devices()  # all processes' devices in a multi-process run
        if requested < 0 or requested > len(available):
            raise MetaplasticError(
                f"train.devices={requested}: the run sees {len(available)} device(s); "
                f"use 0 (all usable) or a number up to {len(available)}"
            )
        if requested == 0:  # the most devices that divide the axis evenly
            n = max(d for d in range(1, len(available) + 1) if axis_size % d == 0)
        else:
            n = requested
            if axis_size % n:
                raise MetaplasticError(
                    f"train.{what}={axis_size} does not split evenly over {n} devices; make "
                    f"it a multiple of {n} or change train.devices"
                )
        self.n = n
        if width == 0:
            width = AUTO_VMAP_WIDTH
        if width < WHOLE_SHARE or (width > 0 and (axis_size // n) % width):
            raise MetaplasticError(
                f"train.vmap_width={width} must divide the {axis_size // n} {what} entries "
                f"each of the {n} device(s) gets (0 = auto, one at a time; -1 = all at once)"
            )
        self.width = width
        if n == 1:
            self.split = self.whole = None
        else:
            mesh = Mesh(np.asarray(available[:n]), ("batch",))
            self.split = NamedSharding(mesh, PartitionSpec("batch"))
            self.whole = NamedSharding(mesh, PartitionSpec())

    def scatter(self, tree):
        """Constrain every leaf's leading axis to be split over the devices."""
        if self.split is None:
            return tree
        return jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, self.split), tree
        )

    def gather(self, tree):
        """Constrain every leaf to be replicated (all-gather)."""
        if self.whole is None:
            return tree
        return jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, self.whole), tree
        )

    def map(self, fn, xs):
        """``vmap(fn)(xs)`` over the leading axis, split over the devices.

        With ``width > 0`` each device runs ``lax.map`` over chunks of ``width`` vmapped
        entries, so every entry is computed by the same program whatever the device count:
        then results are bit-identical across device counts (XLA's batched kernels round
        differently at different batch sizes). ``width = -1`` (:data:`WHOLE_SHARE`) vmaps a
        device's whole share; the constructor turns 0 into :data:`AUTO_VMAP_WIDTH`.
        """
        leaves = jax.tree_util.tree_leaves(xs)
        size = leaves[0].shape[0]
        if self.width == WHOLE_SHARE:
            return self.gather(jax.vmap(fn)(self.scatter(xs)))
        chunks = size // (self.n * self.width)

        def split(x):
            return x.reshape(self.n, chunks, self.width, *x.shape[1:])

        def merge(y):
            return y.reshape(size, *y.shape[3:])

        grid = self.scatter(jax.tree_util.tree_map(split, xs))
        out = jax.vmap(lambda d: jax.lax.map(jax.vmap(fn), d))(grid)
        return jax.tree_util.tree_map(merge, self.gather(out))
