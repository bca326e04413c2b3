"""The numba loop behind :mod:`metaplastic.inner._native` (imported only when
``train.gradient = "native"`` runs, so that numba's import and compile cost stays out of
every other run). See that module for the equations.

Memory traffic, not arithmetic, bounds this loop (the weights and their three tangents are
2.9 MB at the reference size, more than a core's L2), so it streams each matrix as few
times per online step as it can:

* a hidden layer's forward pass also accumulates Oja's ``W^T y`` and its tangents: ``y_i``
  is known as soon as row ``i``'s dot product is, and the row is still in L1;
* the input layer's update at step ``t`` is fused with its forward pass (and those sums)
  at step ``t + 1``, since the next input is known: one read-modify-write pass over the
  largest matrix per step instead of three passes;
* the fixed feedback matrices are read once per step for the errors.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np


@nb.njit(fastmath=True, cache=True)
def act(code, beta, z):
    if code == 1:  # softplus(beta z) / beta, overflow-safe
        bz = beta * z
        if bz > 20.0:
            return z
        return math.log1p(math.exp(bz)) / beta
    if code == 2:
        return z if z > 0.0 else 0.0
    if code == 3:
        return math.tanh(z)
    return z


@nb.njit(fastmath=True, cache=True)
def deriv(code, beta, h):
    """``(g'(z), dg'/dh)`` from ``h = g(z)``."""
    if code == 1:
        s = 1.0 - math.exp(-beta * h)
        return s, beta * (1.0 - s)
    if code == 2:
        return (1.0 if h > 0.0 else 0.0), 0.0
    if code == 3:
        return 1.0 - h * h, -2.0 * h
    return 1.0, 0.0


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _finish_row(h, hd, s, sd, oa, i, z, z0, z1, z2, hidden, act_code, beta):
    """Store unit ``i``'s activity and tangents (hidden: through g) and return them."""
    if hidden:
        hv = act(act_code, beta, z)
        g, dg = deriv(act_code, beta, hv)
        s[oa + i] = g
        sd[oa + i] = dg
        z0, z1, z2 = g * z0, g * z1, g * z2
    else:
        hv = z
    h[oa + i] = hv
    hd[0, oa + i] = z0
    hd[1, oa + i] = z1
    hd[2, oa + i] = z2
    return hv, z0, z1, z2


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _forward_layer(W, T, h, hd, s, sd, U, UD, w0, ia, oa, ni, no, hidden, act_code, beta):
    """``z = W h``, ``z'_k = T_k h + W h'_k``; for a hidden layer also Oja's
    ``U = W^T y`` and ``UD_k = T_k^T y + W^T y'_k`` (row by row, while the row is in L1)."""
    if hidden:
        for j in range(ni):
            U[ia + j] = 0.0
            UD[0, ia + j] = 0.0
            UD[1, ia + j] = 0.0
            UD[2, ia + j] = 0.0
    for i in range(no):
        row = w0 + i * ni
        z = np.float32(0.0)
        z0 = np.float32(0.0)
        z1 = np.float32(0.0)
        z2 = np.float32(0.0)
        for j in range(ni):
            w = W[row + j]
            hj = h[ia + j]
            z += w * hj
            z0 += T[0, row + j] * hj + w * hd[0, ia + j]
            z1 += T[1, row + j] * hj + w * hd[1, ia + j]
            z2 += T[2, row + j] * hj + w * hd[2, ia + j]
        yi, y0, y1, y2 = _finish_row(h, hd, s, sd, oa, i, z, z0, z1, z2, hidden, act_code, beta)
        if hidden:
            for j in range(ni):
                w = W[row + j]
                U[ia + j] += w * yi
                UD[0, ia + j] += T[0, row + j] * yi + w * y0
                UD[1, ia + j] += T[1, row + j] * yi + w * y1
                UD[2, ia + j] += T[2, row + j] * yi + w * y2


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _oja_sums(W, T, y, yd, U, UD, w0, ia, ni, no):
    """``U = W^T y``, ``UD_k = T_k^T y + W^T y'_k`` (the output layer, after its softmax)."""
    for j in range(ni):
        U[ia + j] = 0.0
        UD[0, ia + j] = 0.0
        UD[1, ia + j] = 0.0
        UD[2, ia + j] = 0.0
    for i in range(no):
        row = w0 + i * ni
        yi = y[i]
        y0, y1, y2 = yd[0, i], yd[1, i], yd[2, i]
        for j in range(ni):
            w = W[row + j]
            U[ia + j] += w * yi
            UD[0, ia + j] += T[0, row + j] * yi + w * y0
            UD[1, ia + j] += T[1, row + j] * yi + w * y1
            UD[2, ia + j] += T[2, row + j] * yi + w * y2


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _feedback_fa(B, e, ed, back, backd, w0, oa, ni, no):
    """``B^T e`` and ``B^T e'_k`` (fixed feedback)."""
    for j in range(ni):
        back[j] = 0.0
        backd[0, j] = 0.0
        backd[1, j] = 0.0
        backd[2, j] = 0.0
    for i in range(no):
        row = w0 + i * ni
        ei = e[oa + i]
        e0, e1, e2 = ed[0, oa + i], ed[1, oa + i], ed[2, oa + i]
        for j in range(ni):
            m = B[row + j]
            back[j] += m * ei
            backd[0, j] += m * e0
            backd[1, j] += m * e1
            backd[2, j] += m * e2


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _feedback_bp(W, T, e, ed, back, backd, w0, oa, ni, no):
    """``W^T e`` and ``(W^T e)'_k = T_k^T e + W^T e'_k`` (backprop)."""
    for j in range(ni):
        back[j] = 0.0
        backd[0, j] = 0.0
        backd[1, j] = 0.0
        backd[2, j] = 0.0
    for i in range(no):
        row = w0 + i * ni
        ei = e[oa + i]
        e0, e1, e2 = ed[0, oa + i], ed[1, oa + i], ed[2, oa + i]
        for j in range(ni):
            w = W[row + j]
            back[j] += w * ei
            backd[0, j] += T[0, row + j] * ei + w * e0
            backd[1, j] += T[1, row + j] * ei + w * e1
            backd[2, j] += T[2, row + j] * ei + w * e2


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _update_layer(W, T, e, ed, y, yd, v, u, a, b, toj, w0, oa, ni, no):
    """``W += e v^T + toj y u^T``; ``T_k += e'_k v^T + e a_k^T + toj y'_k u^T + y b_k^T``."""
    for i in range(no):
        row = w0 + i * ni
        ei = e[oa + i]
        yi = y[i]
        oy = toj * yi
        e0, e1, e2 = ed[0, oa + i], ed[1, oa + i], ed[2, oa + i]
        y0, y1, y2 = toj * yd[0, i], toj * yd[1, i], toj * yd[2, i]
        for j in range(ni):
            vj = v[j]
            uj = u[j]
            W[row + j] += ei * vj + oy * uj
            T[0, row + j] += e0 * vj + ei * a[0, j] + y0 * uj + yi * b[0, j]
            T[1, row + j] += e1 * vj + ei * a[1, j] + y1 * uj + yi * b[1, j]
            T[2, row + j] += e2 * vj + ei * a[2, j] + y2 * uj + yi * b[2, j]


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def _update_input_layer(
    W, T, e, ed, y, yd, v, u, a, b, toj, xn, h, hd, s, sd, U, UD, oa, ni, no, hidden, act_code, beta
):
    """The input layer's update at step ``t`` fused with its forward pass (and Oja sums)
    at step ``t + 1`` on the next input ``xn`` (the input has no tangent)."""
    for j in range(ni):
        U[j] = 0.0
        UD[0, j] = 0.0
        UD[1, j] = 0.0
        UD[2, j] = 0.0
    for i in range(no):
        row = i * ni
        ei = e[oa + i]
        yi = y[i]
        oy = toj * yi
        e0, e1, e2 = ed[0, oa + i], ed[1, oa + i], ed[2, oa + i]
        y0, y1, y2 = toj * yd[0, i], toj * yd[1, i], toj * yd[2, i]
        z = np.float32(0.0)
        z0 = np.float32(0.0)
        z1 = np.float32(0.0)
        z2 = np.float32(0.0)
        for j in range(ni):
            vj = v[j]
            uj = u[j]
            xj = xn[j]
            w = W[row + j] + ei * vj + oy * uj
            t0 = T[0, row + j] + e0 * vj + ei * a[0, j] + y0 * uj + yi * b[0, j]
            t1 = T[1, row + j] + e1 * vj + ei * a[1, j] + y1 * uj + yi * b[1, j]
            t2 = T[2, row + j] + e2 * vj + ei * a[2, j] + y2 * uj + yi * b[2, j]
            W[row + j] = w
            T[0, row + j] = t0
            T[1, row + j] = t1
            T[2, row + j] = t2
            z += w * xj
            z0 += t0 * xj
            z1 += t1 * xj
            z2 += t2 * xj
        ny, n0, n1, n2 = _finish_row(h, hd, s, sd, oa, i, z, z0, z1, z2, hidden, act_code, beta)
        if hidden:
            for j in range(ni):
                w = W[row + j]
                U[j] += w * ny
                UD[0, j] += T[0, row + j] * ny + w * n0
                UD[1, j] += T[1, row + j] * ny + w * n1
                UD[2, j] += T[2, row + j] * ny + w * n2


@nb.njit(fastmath=True, cache=True, error_model="numpy")
def episode(sizes, woff, aoff, W, T, B, xs, labels, th, act_code, beta, path, losses, hits):
    L = sizes.shape[0] - 1
    K = 3
    n_units = aoff[L + 1]
    h = np.zeros(n_units, np.float32)  # activities [x, h_1, ..., z_L]
    hd = np.zeros((K, n_units), np.float32)  # their tangents (0 for the input)
    s = np.ones(n_units, np.float32)  # g'(z) per unit (1 for input and output)
    sd = np.zeros(n_units, np.float32)  # dg'/dh per unit
    e = np.zeros(n_units, np.float32)  # errors [e_0, ..., e_L]
    ed = np.zeros((K, n_units), np.float32)
    U = np.zeros(n_units, np.float32)  # Oja's W_l^T y_l, indexed by layer l's inputs
    UD = np.zeros((K, n_units), np.float32)
    nmax = 0
    for l in range(L + 1):
        nmax = max(nmax, sizes[l])
    y = np.zeros(nmax, np.float32)
    yd = np.zeros((K, nmax), np.float32)
    u = np.zeros(nmax, np.float32)
    back = np.zeros(nmax, np.float32)
    backd = np.zeros((K, nmax), np.float32)
    v = np.zeros(nmax, np.float32)
    a = np.zeros((K, nmax), np.float32)
    b = np.zeros((K, nmax), np.float32)
    tpg, teh, toj = th[0], th[1], th[2]
    n_out = sizes[L]
    n0 = sizes[0]
    steps = xs.shape[0]
    for t in range(steps):
        for j in range(n0):
            h[j] = xs[t, j]
        # forward (the input layer's was done by the last step's fused update, but at t=0)
        for l in range(0 if t == 0 else 1, L):
            ni, no = sizes[l], sizes[l + 1]
            hidden = l < L - 1
            _forward_layer(
                W, T, h, hd, s, sd, U, UD, woff[l], aoff[l], aoff[l + 1], ni, no, hidden,
                act_code, beta,
            )  # fmt: skip
        # softmax output, loss, hit; e_L = p - onehot, e_L' = p (z' - p.z')
        oa = aoff[L]
        zmax = h[oa]
        arg = 0
        for i in range(1, n_out):
            if h[oa + i] > zmax:
                zmax = h[oa + i]
                arg = i
        tot = 0.0
        for i in range(n_out):
            y[i] = math.exp(h[oa + i] - zmax)
            tot += y[i]
        lab = labels[t]
        losses[t] = -(h[oa + lab] - zmax - math.log(tot))
        hits[t] = 1.0 if arg == lab else 0.0
        for i in range(n_out):
            y[i] /= tot
        for k in range(K):
            pz = 0.0
            for i in range(n_out):
                pz += y[i] * hd[k, oa + i]
            for i in range(n_out):
                ed[k, oa + i] = y[i] * (hd[k, oa + i] - pz)
        for i in range(n_out):
            e[oa + i] = y[i] - (1.0 if i == lab else 0.0)
        # backward over layers: errors, then this layer's update
        for l in range(L - 1, -1, -1):
            ni, no = sizes[l], sizes[l + 1]
            ia, oa, w0 = aoff[l], aoff[l + 1], woff[l]
            if l < L - 1:  # post activity of a hidden layer (the output's is p, in y)
                for i in range(no):
                    y[i] = h[oa + i]
                    for k in range(K):
                        yd[k, i] = hd[k, oa + i]
            else:
                for k in range(K):
                    for i in range(no):
                        yd[k, i] = ed[k, oa + i]
                _oja_sums(W, T, y, yd, U, UD, w0, ia, ni, no)
            if path == 1:
                _feedback_bp(W, T, e, ed, back, backd, w0, oa, ni, no)
            else:
                _feedback_fa(B, e, ed, back, backd, w0, oa, ni, no)
            # e_l = back * g'(h_l), e_l' = back' g'(h_l) + back g'(h_l)'; e_0 = back
            for j in range(ni):
                if l > 0:
                    e[ia + j] = back[j] * s[ia + j]
                    for k in range(K):
                        ed[k, ia + j] = (
                            backd[k, j] * s[ia + j] + back[j] * sd[ia + j] * hd[k, ia + j]
                        )
                else:
                    e[ia + j] = back[j]
                    for k in range(K):
                        ed[k, ia + j] = backd[k, j]
            # dW = e v^T + toj y u^T; dT_k = e' v^T + e a_k^T + y' (toj u)^T + y b_k^T
            for j in range(ni):
                xj = h[ia + j]
                ej = e[ia + j]
                uj = xj - U[ia + j]
                u[j] = uj
                v[j] = -(tpg * xj + teh * ej)
                for k in range(K):
                    udj = hd[k, ia + j] - UD[k, ia + j]
                    a[k, j] = -(tpg * hd[k, ia + j] + teh * ed[k, ia + j])
                    b[k, j] = toj * udj
                a[0, j] -= xj
                a[1, j] -= ej
                b[2, j] += uj
            if l == 0 and t + 1 < steps:
                _update_input_layer(
                    W, T, e, ed, y, yd, v, u, a, b, toj, xs[t + 1], h, hd, s, sd, U, UD,
                    oa, ni, no, L > 1, act_code, beta,
                )  # fmt: skip
            else:
                _update_layer(W, T, e, ed, y, yd, v, u, a, b, toj, w0, oa, ni, no)


@nb.njit(parallel=True, cache=True)
def batch(sizes, woff, aoff, W, T, B, xs, labels, th, act_code, beta, path, losses, hits):
    for n in nb.prange(W.shape[0]):
        episode(
            sizes,
            woff,
            aoff,
            W[n],
            T[n],
            B[n],
            xs[n],
            labels[n],
            th[n],
            act_code,
            beta,
            path,
            losses[n],
            hits[n],
        )
