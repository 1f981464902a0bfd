"""Small linear-algebra pieces shared by the solvers, written against the Array API (see
:mod:`lorazip.backend`), so torch (CPU/CUDA), NumPy and CuPy run the same code.

The solvers never form a ``d x d`` matrix: operators are applied to thin blocks of vectors.
"""

from __future__ import annotations

from ..backend import diagonal, finfo_tiny, mT, namespace

WEIGHTINGS = ("relative", "absolute")


def adapter_weights(norms2, weighting: str):
    """Per-adapter weights ``w_i``: ``1/||M_i||^2`` (relative) or 1 (absolute); 0 for zero deltas."""
    xp = namespace(norms2)
    zero = xp.zeros_like(norms2)
    if weighting == "relative":
        return xp.where(norms2 > 0, 1.0 / xp.maximum(norms2, xp.full_like(norms2, finfo_tiny(norms2))), zero)
    if weighting == "absolute":
        return xp.where(norms2 > 0, xp.ones_like(norms2), zero)
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def factor_norms2(B, A):
    """``||B_i A_i||_F^2 = tr((B_i^T B_i)(A_i A_i^T))`` for stacked factors, shape (n,)."""
    xp = namespace(B, A)
    return xp.sum((mT(B) @ B) * (A @ mT(A)), axis=(1, 2))


def orth(X):
    """Orthonormal basis of the columns of ``X`` (thin QR, signs fixed for determinism)."""
    xp = namespace(X)
    Q, R = xp.linalg.qr(X, mode="reduced")
    sign = xp.sign(diagonal(R))
    sign = xp.where(sign == 0, xp.ones_like(sign), sign)
    return Q * xp.expand_dims(sign, axis=-2)


def top_eigvecs(T, r: int):
    """Top-``r`` eigenpairs of the symmetric ``T``: ``(W, eigenvalues)``, descending, each
    eigenvector's sign fixed (largest-magnitude entry positive) so runs are reproducible."""
    xp = namespace(T)
    T = 0.5 * (T + mT(T))
    evals, evecs = xp.linalg.eigh(T)
    order = xp.argsort(evals, descending=True, stable=True)[:r]
    W = xp.take(evecs, order, axis=1)
    idx = xp.argmax(xp.abs(W), axis=0)
    pick = xp.take_along_axis(W, xp.expand_dims(idx, axis=0), axis=0)[0] if hasattr(xp, "take_along_axis") \
        else xp.stack([W[int(i), j] for j, i in enumerate(idx)])
    W = W * xp.where(pick < 0, -xp.ones_like(pick), xp.ones_like(pick))
    return W, xp.take(evals, order)


def subspace_change(U_old, U) -> float:
    """``||U - U_old U_old^T U||_F / ||U||_F``: 0 when the spans agree (the paper's stopping rule)."""
    xp = namespace(U)
    num = float(xp.linalg.vector_norm(U - U_old @ (mT(U_old) @ U)))
    den = float(xp.linalg.vector_norm(U))
    return num / max(den, finfo_tiny(U))
