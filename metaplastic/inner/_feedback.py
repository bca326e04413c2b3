"""Credit assignment: how the output error travels back to each layer.

A credit pathway is an :class:`AbstractCreditPathway`: ``init(net, key)`` draws its feedback
state at the start of an episode (``None`` when it derives everything from ``W``) and
``errors(net, state, B, hs, e_out)`` returns the errors ``[e_0, ..., e_L]`` at every layer's
units. :data:`CREDIT_PATHWAYS` maps the names ``train.feedback`` accepts to the classes;
:func:`register_pathway` adds one from outside the package.

Notation (layers 1-based as in the papers; in code ``W[l-1]`` is ``W_l``): ``h_0 = x``,
``z_l = W_l h_{l-1} (+ b_l)``, ``h_l = g(z_l)`` for hidden layers, the output ``z_L`` is
linear and ``e_L = softmax(z_L) - onehot(label)``. Errors are taken at the pre-activations:
a hidden layer's ``e_l = (M_{l+1}^T e_{l+1}) * g'(z_l)`` for the pathway's feedback matrices
``M``, and the input layer's ``e_0 = M_1^T e_1`` (no nonlinearity there).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._errors import MetaplasticError, unknown_name
from .._registry import register
from ._network import AbstractNetwork, NetState, xavier_uniform


class AbstractCreditPathway(eqx.Module):
    """How the output error reaches every layer (an extension point: subclass, set
    ``name``, implement :meth:`errors` (and :meth:`init` if it keeps feedback matrices),
    then :func:`register_pathway`). Settings are static fields, so a pathway is hashable and
    is compiled into the episode."""

    #: the name ``train.feedback`` selects it by
    name: ClassVar[str] = ""
    #: ``True``: the feedback matrices ``B`` change after every sample by the rule's
    #: feedback update (the rule is then wrapped in
    #: :class:`~metaplastic.rules.PlasticFeedback`)
    plastic: ClassVar[bool] = False

    def init(self, net: AbstractNetwork, key: PRNGKeyArray) -> tuple[Array, ...] | None:
        """Feedback matrices at the start of an episode (default: none)."""
        return None

    @abc.abstractmethod
    def errors(
        self,
        net: AbstractNetwork,
        state: NetState,
        B: tuple[Array, ...] | None,
        hs: list[Array],
        e_out: Array,
    ) -> list[Array]:
        """``[e_0, ..., e_L]`` for the forward activities ``hs = [x, h_1, ..., z_L]``
        (:meth:`AbstractNetwork.forward`) and the output error ``e_out``."""

    @classmethod
    def from_config(cls, train: Any) -> AbstractCreditPathway:
        """The pathway ``train`` (a ``[train]`` config) describes; override to read
        settings."""
        return cls()


def _chain(net: AbstractNetwork, state, mats, hs: list[Array], e_out: Array) -> list[Array]:
    """Errors sent back layer by layer through ``mats`` (``M_l`` shaped like ``W_l``)."""
    L = net.n_layers
    errs = [None] * (L + 1)
    errs[L] = e_out
    for j in range(L - 1, -1, -1):
        back = errs[j + 1] @ mats[j]
        errs[j] = net.hidden_error(state, j, hs, back) if j > 0 else back
    return errs


def _random_like_weights(net: AbstractNetwork, key: PRNGKeyArray) -> tuple[Array, ...]:
    keys = jax.random.split(key, net.n_layers)
    return tuple(xavier_uniform(k, s) for k, s in zip(keys, net.shapes, strict=True))


class Backprop(AbstractCreditPathway):
    """Exact transpose of the forward weights: ``M_l = W_l`` (online gradient descent; in
    general the network's ``dz_l / dh_{l-1}``, :meth:`AbstractNetwork.forward_matrices`)."""

    name: ClassVar[str] = "backprop"

    def errors(self, net, state, B, hs, e_out):
        return _chain(net, state, net.forward_matrices(state, hs), hs, e_out)


class FeedbackAlignment(AbstractCreditPathway):
    """Fixed random feedback (Lillicrap et al. 2016): ``M_l = B_l``, Xavier-uniform, drawn
    fresh every episode and fixed within it."""

    name: ClassVar[str] = "fa"

    def init(self, net, key):
        return _random_like_weights(net, key)

    def errors(self, net, state, B, hs, e_out):
        return _chain(net, state, B, hs, e_out)


class DirectFeedbackAlignment(AbstractCreditPathway):
    """Direct feedback alignment (Nokland 2016): the output error goes straight to every
    layer through fixed random ``D_l`` of shape ``(n_L, n_l)``:
    ``e_l = (D_l^T e_L) * g'(z_l)``, ``e_0 = D_0^T e_L``."""

    name: ClassVar[str] = "dfa"

    def init(self, net, key):
        keys = jax.random.split(key, net.n_layers)
        shapes = [(net.sizes[-1], net.sizes[j]) for j in range(net.n_layers)]
        return tuple(xavier_uniform(k, s) for k, s in zip(keys, shapes, strict=True))

    def errors(self, net, state, B, hs, e_out):
        L = net.n_layers
        errs = [None] * (L + 1)
        errs[L] = e_out
        for j in range(L - 1, -1, -1):
            back = e_out @ B[j]
            errs[j] = net.hidden_error(state, j, hs, back) if j > 0 else back
        return errs


class SignSymmetric(AbstractCreditPathway):
    """Sign-symmetric feedback (Liao, Leibo & Poggio 2016): ``M_l = sign(W_l) mean|W_l|``,
    recomputed every step (scaled to the forward weights' mean magnitude as in Moskovitz et
    al. 2018, so errors keep the size they have under backprop; ``W_l`` is the network's
    :meth:`AbstractNetwork.forward_matrices`)."""

    name: ClassVar[str] = "sign_symmetric"

    def errors(self, net, state, B, hs, e_out):
        fwd = net.forward_matrices(state, hs)
        mats = tuple(jnp.sign(w) * jnp.mean(jnp.abs(w)) for w in fwd)
        return _chain(net, state, mats, hs, e_out)


class KolenPollack(FeedbackAlignment):
    """Plastic feedback (Kolen & Pollack 1994; Akrout et al. 2019): ``B`` starts random as
    in ``fa`` and after every sample changes by the rule's feedback update
    ``dB = theta_fb[0] (-e x^T) - theta_fb[1] B``, whose coefficients are meta-learned."""

    name: ClassVar[str] = "kolen_pollack"
    plastic: ClassVar[bool] = True


PC_VARIANTS = ("fixed_prediction", "strict")


class PredictiveCoding(AbstractCreditPathway):
    """Predictive coding (Rosenbaum 2022, "On the relationship between predictive coding and
    backpropagation"; Whittington & Bogacz 2017; Millidge et al. 2020): errors come from
    ``steps`` iterations of inference with step size ``rate``, using the forward weights.

    With ``eps_l`` the error at the activity ``h_l`` (so ``e_l = eps_l * g'(z_l)`` for hidden
    layers, ``e_0 = eps_0``) and ``e_L = softmax(z_L) - onehot`` fixed:

    * ``fixed_prediction`` (predictions held at their feed-forward values):
      ``eps_l <- (1 - rate) eps_l + rate W_{l+1}^T e_{l+1}``, all layers at once from the
      previous iteration's values, starting at ``eps_l = 0``. With ``rate = 1`` (the
      default: ``rate = 0`` means 1 here) this equals
      backprop's errors exactly once ``steps >= L`` (information moves one layer per step);
      ``steps = 0`` means ``L``.
    * ``strict``: beliefs ``v_l`` (hidden layers, starting at ``h_l``) relax by
      ``v_l <- v_l + rate (-eps_l + J_{l+1}(v_l)^T eps_{l+1})`` with prediction errors
      ``eps_l = v_l - g(W_l v_{l-1} + b_l)``, ``eps_L = softmax(W_L v_{L-1} + b_L) - onehot``
      and ``J_{l+1}(v)^T u = W_{l+1}^T (u * g'(W_{l+1} v + b_{l+1}))`` (``g' = 1`` at the
      linear output); ``steps = 0`` means 20 and ``rate = 0`` means 0.1 (at 1 the beliefs
      diverge). It only approximates backprop's errors.
      The input layer, which has no belief, gets ``e_0 = W_1^T e_1``.

    The weight update then uses the forward activities and these errors, as in Torch2PC.
    In a network whose drive is not ``W_l h + b_l`` (:class:`~metaplastic.inner.EINetwork`),
    ``W_l`` in these equations is its :meth:`AbstractNetwork.forward_matrices` at the forward
    activities and the drives come from :meth:`AbstractNetwork.pre`.
    """

    name: ClassVar[str] = "predictive_coding"
    variant: str = eqx.field(static=True, default="fixed_prediction")
    steps: int = eqx.field(static=True, default=0)
    rate: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        if self.variant not in PC_VARIANTS:
            raise unknown_name(
                "predictive-coding variant", self.variant, PC_VARIANTS, "train.pc_variant"
            )
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise MetaplasticError(f"train.pc_steps must be an integer >= 0, got {self.steps}")
        if not 0.0 <= self.rate <= 1.0:
            raise MetaplasticError(
                f"train.pc_rate must lie in [0, 1] (0 = the variant's default), got {self.rate}"
            )

    @property
    def step_size(self) -> float:
        """``rate``, or with ``rate = 0`` the variant's default: 1 for fixed prediction
        (backprop's errors after ``L`` steps), 0.1 for strict PC (which diverges at 1)."""
        if self.rate:
            return self.rate
        return 1.0 if self.variant == "fixed_prediction" else 0.1

    @classmethod
    def from_config(cls, train: Any) -> PredictiveCoding:
        return cls(variant=train.pc_variant, steps=train.pc_steps, rate=train.pc_rate)

    def errors(self, net, state, B, hs, e_out):
        if self.variant == "strict":
            return self._strict(net, state, hs, e_out)
        L = net.n_layers
        steps = self.steps or L
        mats = net.forward_matrices(state, hs)

        def to_e(eps):
            e = [net.hidden_error(state, j, hs, eps[j]) if j > 0 else eps[j] for j in range(L)]
            return e + [e_out]

        def body(_, eps):
            e = to_e(eps)
            new = [e[j + 1] @ mats[j] for j in range(L)]
            r = self.step_size
            return [(1.0 - r) * a + r * n for a, n in zip(eps, new, strict=True)]

        dtype = jnp.result_type(e_out, *state.W)
        eps0 = [jnp.zeros(hs[j].shape, dtype) for j in range(L)]
        return to_e(jax.lax.fori_loop(0, steps, body, eps0))

    def _strict(self, net, state, hs, e_out):
        L = net.n_layers
        target = jax.nn.softmax(hs[L]) - e_out
        mats = net.forward_matrices(state, hs)

        def pre(j, v_in):  # z_{j+1} = W_{j+1} v_j (+ b)
            return net.pre(state, j, v_in)

        def eps_of(v):
            """Prediction errors of the beliefs ``v = [x, v_1, ..., v_{L-1}]``."""
            eps = [None] * (L + 1)
            for j in range(1, L):
                eps[j] = v[j] - net.act(pre(j - 1, v[j - 1]))
            eps[L] = jax.nn.softmax(pre(L - 1, v[L - 1])) - target
            return eps

        def body(_, hidden):
            v = [hs[0], *hidden]
            eps = eps_of(v)
            new = []
            for j in range(1, L):
                u = eps[j + 1]
                if j + 1 < L:  # hidden: through g' at the belief's drive
                    u = u * net.act_deriv_from_output(net.act(pre(j, v[j])))
                new.append(v[j] + self.step_size * (-eps[j] + u @ mats[j]))
            return new

        dtype = jnp.result_type(e_out, *state.W)
        start = [h.astype(dtype) for h in hs[1:L]]
        hidden = jax.lax.fori_loop(0, self.steps or 20, body, start)
        eps = eps_of([hs[0], *hidden])
        errs = [None] * (L + 1)
        errs[L] = eps[L]
        for j in range(1, L):
            errs[j] = net.hidden_error(state, j, hs, eps[j])
        errs[0] = errs[1] @ mats[0]
        return errs


#: Name -> credit pathway class (``train.feedback``). :func:`register_pathway` adds one.
CREDIT_PATHWAYS: dict[str, type[AbstractCreditPathway]] = {}


def register_pathway(cls: type[AbstractCreditPathway]) -> type[AbstractCreditPathway]:
    """Add a pathway class to :data:`CREDIT_PATHWAYS` under its ``name`` (a decorator)."""
    return register(CREDIT_PATHWAYS, cls, AbstractCreditPathway, "credit pathway")


for _cls in (
    Backprop,
    FeedbackAlignment,
    DirectFeedbackAlignment,
    SignSymmetric,
    KolenPollack,
    PredictiveCoding,
):
    register_pathway(_cls)

#: The built-in pathways' names.
FEEDBACK_MODES = tuple(CREDIT_PATHWAYS)


def check_mode(mode: str) -> str:
    if mode not in CREDIT_PATHWAYS:
        raise unknown_name("feedback mode", mode, tuple(CREDIT_PATHWAYS), "train.feedback")
    return mode


def as_pathway(feedback: str | AbstractCreditPathway) -> AbstractCreditPathway:
    """A pathway object from itself or its name (with default settings)."""
    if isinstance(feedback, AbstractCreditPathway):
        return feedback
    return CREDIT_PATHWAYS[check_mode(feedback)]()


def init_feedback(mode, net: AbstractNetwork, key: PRNGKeyArray) -> tuple[Array, ...] | None:
    """The feedback matrices of pathway ``mode`` (a name or a pathway) at the start of an
    episode (``None`` if derived from ``W``)."""
    return as_pathway(mode).init(net, key)


def backward(
    net: AbstractNetwork,
    state: NetState,
    B: tuple[Array, ...] | None,
    hs: list[Array],
    e_out: Array,
    mode="fa",
) -> list[Array]:
    """Errors at every layer's units, ``[e_0, e_1, ..., e_L]``, by pathway ``mode`` (a name
    or a pathway); see the module docstring for the equations."""
    return as_pathway(mode).errors(net, state, B, hs, e_out)
