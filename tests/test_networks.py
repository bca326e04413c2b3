"""Networks as an extension point: the EI network (Dale's law, I-Norm, GradNorm) against
autodiff references, its constraints, its config keys, and a network defined outside the
package running in train."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from metaplastic._errors import MetaplasticError
from metaplastic.inner import (
    NETWORKS,
    EINetwork,
    NetState,
    Network,
    backward,
    register_network,
)
from metaplastic.inner._episode import apply_rule, start_carry
from metaplastic.rules import TermPoolRule
from metaplastic.run import build_config, build_setup
from metaplastic.run._cli import main

from .conftest import tiny_task

SIZES = (9, 8, 7, 4)
sg = jax.lax.stop_gradient


def _sample(norm: str, error_norm: str = "none", bias: bool = True):
    # several inhibitory units per layer: with one, its output reaches every excitatory unit
    # equally (W_EI rows sum to 1), a shift that layer norm cannot see
    net = EINetwork(
        SIZES,
        norm=norm,
        error_norm=error_norm,
        bias=bias,
        activation="tanh",
        inhibitory_fraction=0.5,
    )
    state = net.init(jax.random.key(0))
    if bias:  # non-zero biases, so the test sees them
        state = NetState(
            W=state.W,
            b=tuple(
                0.1 * jax.random.normal(jax.random.key(5 + i), b.shape)
                for i, b in enumerate(state.b)
            ),
            extra=state.extra,
        )
    x = jax.random.uniform(jax.random.key(1), (SIZES[0],))
    return net, state, x


def _reference_logits(net, W, state, x):
    """The EI forward pass written out, with the inhibition held constant exactly where
    the docstring says the task loss sees it as constant (under I-Norm: all of it)."""
    h = x
    L = len(W)
    for layer in range(L):
        p = state.extra[layer]
        exc = W[layer] @ h + state.b[layer]
        if net.norm == "inorm" and layer < L - 1:
            inh = p.W_EI @ (p.W_IX @ sg(h))
            sigma = jnp.sqrt(jnp.mean((p.B_IX @ sg(h)) ** 2) + 1e-5)
            z = (exc - inh) / sigma
        else:
            z = exc - p.W_EI @ (p.W_IX @ h)
            if net.norm == "layer" and layer < L - 1:
                z = (z - z.mean()) / jnp.sqrt(z.var() + 1e-5)
        h = jnp.tanh(z) if layer < L - 1 else z
    return h


@pytest.mark.parametrize("norm", ["none", "layer", "inorm"])
def test_ei_backprop_errors_are_the_gradient_of_the_loss(norm):
    net, state, x = _sample(norm)
    label = 2
    hs = net.forward(state, x)
    np.testing.assert_allclose(hs[-1], _reference_logits(net, state.W, state, x), rtol=1e-6)
    e_out = jax.nn.softmax(hs[-1]) - jax.nn.one_hot(label, SIZES[-1])
    errs = backward(net, state, None, hs, e_out, "backprop")

    def loss(W):
        return -jax.nn.log_softmax(_reference_logits(net, W, state, x))[label]

    grads = jax.grad(loss)(state.W)
    for layer, g in enumerate(grads):
        expected = jnp.outer(errs[layer + 1], hs[layer])
        if norm == "inorm" and layer < net.n_layers - 1:  # dz/dW_EX = h / sigma_I
            p = state.extra[layer]
            expected = expected / jnp.sqrt(jnp.mean((p.B_IX @ hs[layer]) ** 2) + 1e-5)
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)


def test_gradnorm_is_the_layer_norm_jacobian_and_center_subtracts_the_mean():
    net, state, x = _sample("inorm", "gradnorm")
    hs = net.forward(state, x)
    back = jax.random.normal(jax.random.key(3), (SIZES[1],))
    d = back * (1.0 - hs[1] ** 2)
    z = net.pre(state, 0, hs[0])

    def layer_norm(v):
        return (v - v.mean()) / jnp.sqrt(v.var() + 1e-5)

    _, vjp = jax.vjp(layer_norm, z)
    np.testing.assert_allclose(
        net.hidden_error(state, 1, hs, back), vjp(d)[0], rtol=1e-4, atol=1e-6
    )
    centred = EINetwork(SIZES, norm="inorm", error_norm="center", activation="tanh")
    np.testing.assert_allclose(
        centred.hidden_error(state, 1, hs, back), d - d.mean(), rtol=1e-5, atol=1e-7
    )


def test_dale_law_holds_after_an_update_that_pushes_weights_negative():
    net, state, x = _sample("inorm", bias=False)
    net = EINetwork(SIZES, norm="inorm", inhibitory_rate=0.5, activation="tanh")
    rule = TermPoolRule.from_names(["pseudo_gradient"], [-50.0])  # a huge anti-gradient step
    carry = start_carry(rule, net, "backprop", jax.random.key(0))
    from metaplastic.inner._episode import forward_backward

    pres, posts, errs, _, _ = forward_backward(net, "backprop", carry, x, 1)
    raw = apply_rule(rule, carry, pres, posts, errs, "backprop")  # no network: unclamped
    assert min(float(w.min()) for w in raw.net.W) < 0
    new = apply_rule(rule, carry, pres, posts, errs, "backprop", net)
    for leaf in jax.tree_util.tree_leaves((new.net.W, new.net.extra)):
        assert float(leaf.min()) >= 0.0
    assert any(
        float(jnp.max(jnp.abs(a - b))) > 0
        for a, b in zip(
            jax.tree_util.tree_leaves(new.net.extra),
            jax.tree_util.tree_leaves(carry.net.extra),
            strict=True,
        )
    )


def test_inhibitory_plasticity_lowers_the_local_loss():
    net = EINetwork(SIZES, norm="inorm", inhibitory_rate=1e-3, activation="tanh")
    state = net.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (SIZES[0],))
    pres = net.forward(state, x)[:-1]
    new = net.after_update(state, pres)
    for layer in (0, 1):  # the two I-Norm layers
        exc = state.W[layer] @ pres[layer]
        before = net._local_loss(state.extra[layer], exc, pres[layer])
        after = net._local_loss(new.extra[layer], exc, pres[layer])
        assert float(after) < float(before)
    assert new.extra[2] is state.extra[2]  # the output layer has no I-Norm


def test_ei_settings_are_validated_and_refused_for_the_mlp():
    with pytest.raises(Exception, match="network.norm"):
        EINetwork(SIZES, norm="batch")
    with pytest.raises(Exception, match="inorm"):
        EINetwork(SIZES, inhibitory_rate=0.1)
    with pytest.raises(Exception, match="network kind"):
        build_config("pool", "digits", None, ["network.kind=cnn"])
    with pytest.raises(Exception, match="does not apply"):
        build_config("pool", "digits", None, ["network.norm=inorm"])
    cfg = build_config("pool", "digits", None, ["network.kind=ei", "network.norm=inorm"])
    net = build_setup(cfg).net
    assert isinstance(net, EINetwork) and net.norm == "inorm" and net.sizes[0] == 64


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_task())
    return path


@pytest.mark.slow  # a whole `metaplastic train` run (12-19 s); `-m slow`
def test_ei_network_trains_from_the_command_line(tmp_path, task):
    args = ["train", "--rule", "pool", "--task", str(task), "--quiet", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(
        main, [*args, "--set", "network.kind=ei", "--set", "network.norm=inorm"]
    )
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(main, [*args[:-2], "--set", "network.error_norm=gradnorm"])
    assert bad.exit_code == 2 and "network.error_norm" in bad.stderr


def test_a_network_from_outside_the_package_registers(tmp_path, task):
    class LeakyMLP(Network):
        """The MLP with a leak: every hidden drive is halved."""

        name: ClassVar[str] = "halved_mlp_test"

        def pre(self, state, layer, h):
            z = super().pre(state, layer, h)
            return 0.5 * z if layer < self.n_layers - 1 else z

    register_network(LeakyMLP)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_network(type("Other", (LeakyMLP,), {"name": "mlp"}))
        cfg = build_config("pool", str(task), None, ["network.kind=halved_mlp_test"])
        setup = build_setup(cfg)
        assert isinstance(setup.net, LeakyMLP)
        hs = setup.net.forward(setup.net.init(jax.random.key(0)), jnp.ones(setup.net.sizes[0]))
        plain = Network(setup.net.sizes, activation=setup.net.activation)
        z = plain.pre(setup.net.init(jax.random.key(0)), 0, jnp.ones(setup.net.sizes[0]))
        np.testing.assert_allclose(hs[1], plain.act(0.5 * z), rtol=1e-6)
        # it trains inside `train` together with a task from outside the package: see
        # tests/test_tasks.py (one run for both keeps the suite short)
    finally:
        NETWORKS.pop("halved_mlp_test", None)


def test_batch_forward_keeps_task_and_local_losses_apart_and_applies_gradnorm():
    net = EINetwork(SIZES, norm="inorm", bias=True, activation="relu")
    state = net.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (6, SIZES[0]))
    hp = {"local_weights": (100.0, 100.0)}

    def task(s, back=None):
        logits, _, _ = net.batch_forward(s, x, back=back, **hp)
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 1])

    def local(s):
        return net.batch_forward(s, x, **hp)[1]

    g_task, g_local = jax.grad(task)(state), jax.grad(local)(state)
    for layer in (0, 1):  # I-Norm layers: the task loss sees the inhibition as constant ...
        for leaf in jax.tree_util.tree_leaves(g_task.extra[layer]):
            assert float(jnp.max(jnp.abs(leaf))) == 0.0
        assert float(jnp.max(jnp.abs(g_local.W[layer]))) == 0.0  # ... and only it is local
        assert float(jnp.max(jnp.abs(g_local.extra[layer].W_IX))) > 0.0
    assert float(jnp.max(jnp.abs(g_task.extra[2].W_IX))) > 0.0  # the plain EI output layer
    # GradNorm changes the errors below an I-Norm layer but not the top layer's gradient
    g_gn = jax.grad(task)(state, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(g_gn.W[2], g_task.W[2], rtol=1e-6)
    assert float(jnp.max(jnp.abs(g_gn.W[0] - g_task.W[0]))) > 1e-6


EQUATION_RULE = '[rule]\nkind = "equation"\nequations = ["-0.03*e*x.T + 0.01*(y*x.T - y*y.T*W)"]\n'
EI_FULL = [
    "network.kind=ei",
    "network.norm=inorm",
    "network.error_norm=gradnorm",
    "network.inhibitory_rate=0.001",
    "network.hidden=[16]",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule,feedback",
    [(r, "fa") for r in ("taylor", "mlp", "scaling_pool", "equation")]
    + [
        ("pool", f)
        for f in ("backprop", "fa", "dfa", "sign_symmetric", "kolen_pollack", "predictive_coding")
    ],
)
def test_every_rule_kind_and_pathway_runs_in_an_ei_network(rule, feedback, tmp_path):
    if rule == "equation":
        (tmp_path / "eq.toml").write_text(EQUATION_RULE)
        rule = str(tmp_path / "eq.toml")
    cfg = build_config(rule, "digits", {"feedback": feedback}, EI_FULL)
    setup = build_setup(cfg)
    from metaplastic.run import build_rule

    r = build_rule(cfg, setup.net.n_layers)
    problem = setup.problem(cfg)
    res = problem.episode(r, jax.random.key(0))
    assert not bool(res.diverged) and float(res.query_accuracy) > 0
    grads = jax.grad(lambda rr: problem.episode(rr, jax.random.key(0)).query_loss)(r)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("cls", [Network, EINetwork])
def test_network_settings_are_checked(cls):
    """Sizes need an input and an output width, all at least 1; beta and init_scale > 0."""
    cls((5, 3), beta=0.5, init_scale=0.5)  # any positive value is fine
    for bad in [{"sizes": (5,)}, {"sizes": (5, 0)}, {"sizes": (0, 3)}]:
        with pytest.raises(MetaplasticError, match="at least an input and an output"):
            cls(**bad)
    with pytest.raises(MetaplasticError, match="beta must be positive"):
        cls((5, 3), beta=0.0)
    with pytest.raises(MetaplasticError, match="init_scale must be positive"):
        cls((5, 3), init_scale=0.0)


@pytest.mark.parametrize("cls", [Network, EINetwork])
def test_network_defaults_are_the_config_defaults(cls):
    """A network built in Python without options is the one a ``[network]`` table without
    those keys gives (so the docs' defaults hold for both ways of building it)."""
    from metaplastic.run._config import NetworkConfig

    net, cfg = cls((5, 3)), NetworkConfig()
    for option in cls.options:
        assert getattr(net, option) == getattr(cfg, option), option


def test_init_scale_multiplies_the_start_weights():
    key = jax.random.key(4)
    base, big = Network((5, 4, 3)).init(key), Network((5, 4, 3), init_scale=2.0).init(key)
    for a, b in zip(base.W, big.W, strict=True):
        np.testing.assert_allclose(b, 2.0 * a, rtol=1e-7)


def test_lognormal_start_weights_have_the_asked_mean_and_an_equal_spread():
    from metaplastic.inner._network import _lognormal

    w = np.asarray(_lognormal(jax.random.key(0), (300, 300), 0.3))
    assert np.all(w > 0)
    assert abs(w.mean() - 0.3) < 0.01 and abs(w.std() - 0.3) < 0.02


def test_layer_norm_and_error_norm_act_on_the_last_axis_of_a_batch():
    """On a batch (EINetwork.batch_forward's shape) each row is normalised on its own."""
    from metaplastic.inner._network import _standardise, normalise_error

    z = jax.random.normal(jax.random.key(1), (4, 6)) * jnp.arange(1.0, 7.0)
    d = jax.random.normal(jax.random.key(2), (4, 6))
    for i in range(4):
        np.testing.assert_allclose(_standardise(z)[i], _standardise(z[i]), rtol=1e-5)
        np.testing.assert_allclose(
            normalise_error(d, z, 1.0, 1.0, 1.0)[i],
            normalise_error(d[i], z[i], 1.0, 1.0, 1.0),
            rtol=1e-5,
            atol=1e-6,
        )


def test_error_norm_of_a_constant_drive_stays_finite():
    """``s = sqrt(var(z) + 1e-5)``: a drive without spread divides by sqrt(1e-5), not 0."""
    from metaplastic.inner._network import normalise_error

    d = jnp.array([1.0, -2.0, 0.5])
    out = normalise_error(d, jnp.full(3, 0.7), 1.0, 0.0, 1.0)
    np.testing.assert_allclose(out, (d - d.mean()) / np.sqrt(1e-5), rtol=1e-4)


def test_ei_network_settings_are_checked_at_their_boundaries():
    """inhibitory_fraction in (0, 1], inhibitory_rate >= 0 (and > 0 only with I-Norm),
    local_weight > 0; the end points that are allowed are accepted."""
    EINetwork((5, 3), inhibitory_fraction=1.0)
    EINetwork((5, 3), norm="inorm", inhibitory_rate=0.5, local_weight=0.5)
    bad = [
        ({"inhibitory_fraction": 0.0}, "inhibitory_fraction"),
        ({"inhibitory_fraction": 1.01}, "inhibitory_fraction"),
        ({"norm": "inorm", "inhibitory_rate": -0.1}, "inhibitory_rate must be >= 0"),
        ({"inhibitory_rate": 0.1}, 'set network.norm = "inorm"'),
        ({"local_weight": 0.0}, "local_weight must be positive"),
        ({"norm": "batch"}, "EI normalisation"),
        ({"error_norm": "batch"}, "error normalisation"),
    ]
    for kwargs, match in bad:
        with pytest.raises(MetaplasticError, match=match):
            EINetwork((5, 3), **kwargs)
    assert EINetwork((5, 3)).n_inhibitory(4) == 1 and EINetwork((5, 3)).n_inhibitory(30) == 3


def test_ei_start_weights_have_the_he_mean_and_normalised_inhibitory_output():
    """Excitatory and inhibitory input weights are lognormal with mean
    ``init_scale sqrt(2 / n_in)``; each excitatory unit's inhibitory inputs sum to 1."""
    for init_scale in (1.0, 2.0):
        state = EINetwork((400, 60), init_scale=init_scale).init(jax.random.key(3))
        want = init_scale * np.sqrt(2.0 / 400)
        p = state.extra[0]
        assert abs(float(jnp.mean(state.W[0])) / want - 1) < 0.05
        assert abs(float(jnp.mean(p.W_IX)) / want - 1) < 0.1
        assert abs(float(jnp.mean(p.B_IX)) / want - 1) < 0.1
        np.testing.assert_allclose(jnp.sum(p.W_EI, axis=1), 1.0, rtol=1e-5)


def test_inorm_local_loss_is_its_formula():
    """``lw (mean(u)^2 + (var(u) - 1)^2)`` with ``u = (exc - W_EI W_IX h) / sigma`` and
    ``sigma = sqrt(mean((B_IX h)^2) + 1e-5)``."""
    net = EINetwork(SIZES, norm="inorm", inhibitory_fraction=0.5, local_weight=3.0)
    state = net.init(jax.random.key(2))
    p = state.extra[0]
    h = jax.random.uniform(jax.random.key(3), (SIZES[0],))
    exc = state.W[0] @ h + 0.3
    P = {k: np.asarray(getattr(p, k), np.float64) for k in ("W_IX", "W_EI", "B_IX")}
    hh = np.asarray(h, np.float64)
    sigma = np.sqrt(np.mean((P["B_IX"] @ hh) ** 2) + 1e-5)
    u = (np.asarray(exc, np.float64) - P["W_EI"] @ (P["W_IX"] @ hh)) / sigma
    want = 3.0 * (u.mean() ** 2 + (u.var() - 1.0) ** 2)
    np.testing.assert_allclose(float(net._local_loss(p, exc, h)), want, rtol=1e-5)


@pytest.mark.parametrize("norm", ["none", "layer", "inorm"])
def test_batch_forward_is_the_per_sample_forward_pass_row_by_row(norm):
    """Logits and drives of ``batch_forward`` equal ``forward`` on each row; with I-Norm
    its local loss is the mean over rows of each layer's ``_local_loss`` summed, and the
    layer-norm reference equals the ``norm = "layer"`` network."""
    net, state, _ = _sample(norm)
    X = jax.random.uniform(jax.random.key(9), (3, SIZES[0]))
    logits, local, drives = net.batch_forward(state, X)
    want_local = 0.0
    for i in range(3):
        hs = net.forward(state, X[i])
        np.testing.assert_allclose(logits[i], hs[-1], rtol=1e-5, atol=1e-6)
        for layer in range(net.n_layers - 1):
            np.testing.assert_allclose(
                net.act(drives[layer][i]), hs[layer + 1], rtol=1e-5, atol=1e-6
            )
            if norm == "inorm":
                exc = state.W[layer] @ hs[layer] + state.b[layer]
                want_local += net._local_loss(state.extra[layer], exc, hs[layer]) / 3
    np.testing.assert_allclose(local, want_local, rtol=1e-5, atol=1e-7)
    if norm == "inorm":
        ln = EINetwork(SIZES, norm="layer", bias=True, activation="tanh", inhibitory_fraction=0.5)
        ref = net.batch_forward(state, X, layer_norm_reference=True)[0]
        for i in range(3):
            np.testing.assert_allclose(ref[i], ln.forward(state, X[i])[-1], rtol=1e-5, atol=1e-6)


def test_batch_forward_takes_its_error_transform_from_the_network_by_default():
    """``back=None`` means the network's ``error_norm``: the task gradient then equals the
    one with GradNorm's coefficients passed explicitly, and differs from no transform."""
    from metaplastic.inner._network import ERROR_NORM_COEFFICIENTS

    net, state, _ = _sample("inorm", "gradnorm")
    X = jax.random.uniform(jax.random.key(9), (3, SIZES[0]))

    def grad(n, **kw):
        return jax.grad(lambda s: jnp.sum(n.batch_forward(s, X, **kw)[0] ** 2))(state).W[0]

    default = grad(net)
    np.testing.assert_allclose(default, grad(net, back=ERROR_NORM_COEFFICIENTS["gradnorm"]))
    plain, *_ = _sample("inorm")
    assert not np.allclose(default, grad(plain), rtol=1e-3)


def test_inhibitory_plasticity_is_one_clamped_gradient_step_of_the_local_loss():
    net = EINetwork(SIZES, norm="inorm", inhibitory_rate=0.01, activation="tanh")
    state = net.init(jax.random.key(4))
    x = jax.random.uniform(jax.random.key(5), (SIZES[0],))
    pres = net.forward(state, x)[: net.n_layers]
    new = net.after_update(state, pres)
    exc = state.W[0] @ pres[0]
    g = jax.grad(net._local_loss)(state.extra[0], exc, pres[0])
    for name in ("W_IX", "W_EI", "B_IX"):
        want = jnp.maximum(getattr(state.extra[0], name) - 0.01 * getattr(g, name), 0.0)
        np.testing.assert_allclose(getattr(new.extra[0], name), want, rtol=1e-5, atol=1e-8)


def test_dale_clamp_zeroes_only_negative_weights():
    from metaplastic.inner._network import EINetwork, NetState

    st = NetState(
        W=(jnp.array([[-1.0, 0.5]]),), b=(jnp.array([-2.0]),), extra=(jnp.array([-0.1, 0.25]),)
    )
    out = EINetwork.clamp(st)
    assert out.W[0].tolist() == [[0.0, 0.5]] and out.b[0].tolist() == [-2.0]
    np.testing.assert_array_equal(out.extra[0], [0.0, 0.25])


def test_exact_inhibition_makes_inorm_a_layer_norm_at_start_and_keeps_its_pool_signed():
    """The authors' start: I-Norm's drive equals layer norm of the excitatory drive (exact
    centring by W_IX = mean row of W_EX, exact scaling by B_IX from the SVD), its local loss
    is ~0, and the signed B_IX survives the Dale clamp and the inhibitory update."""
    from metaplastic.inner._network import _standardise

    for sizes in ((6, 9, 4, 3),):  # more units than inputs, then fewer
        net = EINetwork(sizes, activation="relu", norm="inorm", inhibition_init="exact")
        st = jax.jit(net.init)(jax.random.key(0))
        x = jax.random.uniform(jax.random.key(1), (7, sizes[0]))
        _, local, drives = jax.jit(net.batch_forward)(st, x)
        np.testing.assert_allclose(drives[0], _standardise(x @ st.W[0].T), atol=1e-4)
        assert float(local) < 1e-4
        p = st.extra[0]
        assert float(jnp.min(p.B_IX)) < 0  # signed
        kept = jax.jit(EINetwork.clamp, static_argnums=1)(st, True).extra[0].B_IX
        np.testing.assert_array_equal(kept, p.B_IX)
        assert float(jnp.min(EINetwork.clamp(st).extra[0].B_IX)) == 0.0
    net = EINetwork((20, 15, 3), norm="inorm", inhibition_init="exact", inhibitory_rate=0.1)
    st = jax.jit(net.init)(jax.random.key(2))
    h = jax.random.uniform(jax.random.key(3), (20,))
    after = jax.jit(net.after_update)(st, [h, net.act(net.pre(st, 0, h))])
    assert float(jnp.min(after.extra[0].B_IX)) < 0
    with pytest.raises(MetaplasticError, match="inhibition init"):
        EINetwork((4, 3), inhibition_init="svd")


def test_bounded_scaling_keeps_a_silent_unit_finite_where_fixed_target_scaling_grows():
    """A silent unit (ybar = 0) under the fixed-target step grows like (1 + gamma rho)^t
    without limit; under scaling_bounded its gain settles below c^tanh(1). An over-active
    unit shrinks to no less than 1/c. Unknown step names are refused."""
    from metaplastic.inner import BOUNDED_GAIN, scaling_step

    W0 = jnp.ones((2, 3))
    p0 = {"W": [W0, jnp.ones((1, 2))]}
    nrm0 = [jnp.linalg.norm(W0, axis=1)]
    ybar = [jnp.array([0.0, 50.0])]  # silent, far over the target 0.5

    def run(coefs, steps=3000):
        def body(_, p):
            return scaling_step(coefs, [0.5], p, ybar, nrm0)

        p = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, p))(p0)
        return np.asarray(jnp.linalg.norm(p["W"][0], axis=1) / nrm0[0])

    fixed = run({"scaling_fixed": 0.01}, 300)
    assert fixed[0] > 4.0  # 1.005^300 = 4.5 and still growing
    gain = run({"scaling_bounded": 0.05})
    assert 1.0 < gain[0] < BOUNDED_GAIN ** np.tanh(1.0) + 1e-3
    assert 1.0 / BOUNDED_GAIN - 1e-3 < gain[1] < 1.0
    np.testing.assert_allclose(run({"scaling_bounded": 0.05}, 4000), gain, rtol=1e-3)  # settled
    with pytest.raises(MetaplasticError, match="scaling step"):
        scaling_step({"scaling_unbounded": 0.1}, [0.5], p0, ybar, nrm0)
