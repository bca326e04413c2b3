"""Ground-truth task: principal-component extraction by one linear neuron (Oja 1982).

Each episode draws a random orthonormal basis ``Q`` and a covariance
``C = s^2 Q diag(lambda) Q^T`` with ``lambda_k = eig_decay**k`` and ``s = input_scale``
(so ``lambda_1 = s^2``; ``s = 1`` by default), then
presents ``steps`` Gaussian inputs ``x ~ N(0, C)`` online to one linear neuron ``y = w.x``
whose weights change by the rule after every sample (``e = e_pre = 0``: no error signal).
The neuron starts from ``w0 ~ N(0, I / dim) * init_scale``: a random direction of norm
about ``init_scale = 1``, so the task is to turn ``w`` onto the top component while keeping
its norm, which is what Oja's rule does. (From a smaller start a finite-horizon optimum also
grows the norm, and meta-learning then adds growth terms such as ``W x^2`` to Oja's.)

Meta-loss: the PCA reconstruction error of the final ``w``, in closed form,
``E||x - w w^T x||^2 = tr C - 2 w^T C w + ||w||^2 w^T C w``, minus its minimum
``tr C - lambda_1`` and divided by ``lambda_1``: the share of the top component's variance
that ``w`` fails to capture, 1 for a silent neuron (``w = 0``) whatever the dimension,
spectrum or input scale, so one tolerance (``train.prune_effect``) and one L1 weight mean
the same on every such task. It is zero exactly at ``w = +-v_1`` with
``||w|| = 1``, the fixed point of Oja's rule ``dw = eta (x y - y^2 w)``; a Hebbian rule
without the decay term grows ``||w||`` and pays for it. The reported "accuracy" is the
alignment ``|cos(w, v_1)|``.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ..inner._episode import Carry, InnerResult, scan_episode
from ..inner._network import NetState, Network
from ..rules._rules import AbstractRule
from ._task import AbstractTask


class PCATask(AbstractTask):
    """One linear neuron learning the top principal component online (see module doc;
    ``task.kind = "pca"``)."""

    name: ClassVar[str] = "pca"
    uses_images: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ("dim", "steps", "eig_decay", "input_scale")

    dim: int = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    eig_decay: float = eqx.field(static=True)
    init_scale: float = eqx.field(static=True, default=1.0)
    input_scale: float = eqx.field(static=True, default=1.0)
    weight_limit: float = eqx.field(static=True, default=0.0)

    @classmethod
    def from_config(cls, task, train) -> PCATask:
        return cls(
            task.dim,
            task.steps,
            task.eig_decay,
            input_scale=task.input_scale,
            weight_limit=train.weight_limit,
        )

    def episode_length(self) -> int:
        return self.steps

    def eigenvalues(self):
        """Covariance eigenvalues ``input_scale**2 * eig_decay**k``, largest first."""
        decay = self.eig_decay ** jnp.arange(self.dim, dtype=jnp.float32)
        return (self.input_scale**2) * decay

    def sample(self, key: PRNGKeyArray):
        """``(x, C, v1, w0)``: inputs ``(steps, dim)``, covariance, top eigenvector, start."""
        k_q, k_x, k_w = jax.random.split(key, 3)
        q, r = jnp.linalg.qr(jax.random.normal(k_q, (self.dim, self.dim)))
        q = q * jnp.sign(jnp.diag(r))[None, :]
        lam = self.eigenvalues()
        C = (q * lam[None, :]) @ q.T
        z = jax.random.normal(k_x, (self.steps, self.dim))
        x = (z * jnp.sqrt(lam)[None, :]) @ q.T
        w0 = jax.random.normal(k_w, (1, self.dim)) * self.init_scale / jnp.sqrt(self.dim)
        return x, C, q[:, 0], w0

    def loss(self, w, C):
        lam = self.eigenvalues()
        tr = jnp.sum(lam)
        wCw = w @ C @ w
        recon = tr - 2.0 * wCw + (w @ w) * wCw
        return (recon - (tr - lam[0])) / lam[0]

    def run(
        self,
        rule: AbstractRule,
        net: Network,
        feedback,
        key: PRNGKeyArray,
        pool=None,
        remat=False,
        record=None,
    ) -> InnerResult:
        """One episode (``pool`` is unused: the inputs are generated; there is no error
        signal, so ``feedback`` is unused too)."""
        x, C, v1, w0 = self.sample(key)
        carry0 = Carry.start(rule, NetState(W=(w0,), b=None), None)
        zero = jnp.zeros(1, w0.dtype)
        zero_in = jnp.zeros(self.dim, w0.dtype)

        def signals(carry, xt):
            y = carry.net.W[0] @ xt
            err = jnp.sum((xt - carry.net.W[0][0] * y[0]) ** 2)
            return [xt], [y], [zero_in, zero], err

        carry, stopped, errs = scan_episode(
            rule,
            net,
            "backprop",
            carry0,
            x,
            signals,
            weight_limit=self.weight_limit,
            remat=remat,
            record=record,
        )
        errs, recorded = errs if record is not None else (errs, None)
        w = carry.net.W[0][0]
        loss = self.loss(w, C)
        align = jnp.abs(w @ v1) / (jnp.linalg.norm(w) + 1e-12)
        diverged = ~jnp.all(jnp.isfinite(w)) | stopped
        return InnerResult(carry.net, errs, jnp.zeros_like(errs), loss, align, diverged, recorded)

    @staticmethod
    def score(result):
        """``1 - meta-loss``: the alignment alone would not see the weight norm."""
        return 1.0 - result.query_loss

    def diverged_score(self):
        """The score of a silent neuron (``w = 0``), 0: a diverged episode counts as no
        better than that."""
        return jnp.asarray(0.0, jnp.float32)
