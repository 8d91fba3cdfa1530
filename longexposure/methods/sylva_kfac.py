"""K-FAC factors for Sylva's preprocessing: the (r, kappa) hierarchical approximation and the exact baseline.

A K-FAC factor of one linear layer is F = (1/N) sum_z z z^T over N data vectors z (the layer's inputs
for A, its output gradients for G). Both classes here share one interface:

    update_(z)              # z: (c, dim), c new data vectors
    matmul(x)               # F @ x for x: (dim, n)
    inverse_diagonal(damp)  # diag((F + lambda I)^-1), lambda = damp * mean(diag F)
    dense(), nbytes()

`HierarchicalFactor` is Sylva's (r, kappa) approximation (paper Sec. 4.2, Fig. 2a(ii)): F is halved
kappa times; every off-diagonal block B12 at level k (size dim/2^k) is kept as a rank-r SVD
U diag(S) V^T, and the 2^kappa diagonal blocks of the finest partition are exact. F is symmetric, so
B21 = B12^T = V diag(S) U^T is the same SVD read transposed and is not stored twice.

Online update (paper Sec. 4.3, Alg. 3; Brand 2006): new data adds P Q^T to each off-diagonal block
(P, Q: the rows of z^T that fall in the block's row and column ranges). It is absorbed without
materialising the block: project P and Q on the current bases (eqs. 9-10), orthonormalise the
residuals, re-diagonalise the small (k + c) core (eqs. 11-12), rotate the extended bases (eq. 13) and
keep the top r. The paper states it for one vector (rank 1); c vectors at once is the same algebra with
a (k + c)-sized core. Starting from an empty basis, this *is* the initial SVD (Alg. 2), exactly.

Recursive block inversion (paper eqs. 5-8): bottom-up, the inverse of a level's block is
blockdiag(children inverses) - L K L^T with L = blockdiag(B11^-1 U, B22^-1 V) and an r-sized kernel K.
We write K = C (I + (W^T D^-1 W) C)^-1 with C = [[0, S], [S, 0]], the Woodbury form that never
inverts S (singular values may be zero). The inverse keeps the hierarchy's storage: nothing m x m.

`ExactFactor` is the K-FAC pruner's baseline: the dense dim x dim matrix.
"""

from __future__ import annotations

import math

import torch


def _eye_like(n: int, ref: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, device=ref.device, dtype=ref.dtype)


def brand_update(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best-effort rank-`rank` SVD of U diag(S) V^T + P Q^T, batched over blocks, without forming it.

    Args:
        U, V: (nb, h, k) current bases (orthonormal columns; k may be 0).
        S: (nb, k) current singular values.
        P, Q: (nb, h, c) the new data's left and right factors.
    Returns:
        (U', S', V') with k' = min(rank, k + c) columns.
    """
    k = U.shape[-1]
    # Projection (eqs. 9-10), with a second Gram-Schmidt pass for orthogonality in fp32.
    M = U.transpose(1, 2) @ P
    Pp = P - U @ M
    M2 = U.transpose(1, 2) @ Pp
    Pp, M = Pp - U @ M2, M + M2
    N = V.transpose(1, 2) @ Q
    Qp = Q - V @ N
    N2 = V.transpose(1, 2) @ Qp
    Qp, N = Qp - V @ N2, N + N2
    Pa, Ra = torch.linalg.qr(Pp)
    Qb, Rb = torch.linalg.qr(Qp)
    Pa, Ra = _drop_null_directions(Pa, Ra, P)
    Qb, Rb = _drop_null_directions(Qb, Rb, Q)
    # Re-diagonalisation (eqs. 11-12) of the small core.
    left = torch.cat([M, Ra], dim=1)  # (nb, k + c', c)
    right = torch.cat([N, Rb], dim=1)
    core = left @ right.transpose(1, 2)
    core[:, :k, :k] += torch.diag_embed(S)
    Uc, Sc, Vch = torch.linalg.svd(core)
    keep = min(rank, Sc.shape[-1])
    # Rotation of the extended subspaces (eq. 13), keeping the best rank-r part.
    U_new = torch.cat([U, Pa], dim=2) @ Uc[:, :, :keep]
    V_new = torch.cat([V, Qb], dim=2) @ Vch[:, :keep, :].transpose(1, 2)
    return U_new, Sc[:, :keep].contiguous(), V_new


def _drop_null_directions(Qm: torch.Tensor, R: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the QR directions that carry no residual (data already inside the basis)."""
    scale = data.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None]
    diag = R.diagonal(dim1=1, dim2=2).abs()
    alive = (diag > 1e-6 * scale).to(Qm.dtype)
    return Qm * alive[:, None, :], R * alive[:, :, None]


class ExactFactor:
    """The dense K-FAC factor (K-FAC pruner baseline): dim x dim fp32."""

    kind = "exact"

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.dim = dim
        self.sum = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.count = 0

    def update_(self, z: torch.Tensor) -> None:
        z = z.reshape(-1, self.dim).to(self.sum.dtype)
        self.sum.addmm_(z.t(), z)
        self.count += z.shape[0]

    def _scale(self) -> float:
        return 1.0 / max(self.count, 1)

    def dense(self) -> torch.Tensor:
        return self.sum * self._scale()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return (self.sum @ x.to(self.sum.dtype)) * self._scale()

    def inverse_diagonal(self, damping: float) -> torch.Tensor:
        f = self.dense()
        lam = damping * f.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.inv(f + lam * _eye_like(self.dim, f)).diagonal().clone()

    def nbytes(self) -> int:
        return self.sum.numel() * self.sum.element_size()


class HierarchicalFactor:
    """Sylva's (r, kappa) hierarchical approximation of a K-FAC factor (see the module docstring).

    Args:
        dim: the factor's dimension (layer inputs for A, outputs for G).
        rank: r, the rank kept for every off-diagonal block.
        levels: kappa, how many times the matrix is halved (reduced so leaves keep >= 1 row).
    The dimension is zero-padded to a multiple of 2^kappa; padded rows never receive data.
    """

    kind = "hierarchical"

    def __init__(
        self,
        dim: int,
        rank: int = 32,
        levels: int = 4,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if rank < 1 or levels < 0:
            raise ValueError(f"need rank >= 1 and levels >= 0, got rank={rank}, levels={levels}")
        self.dim = dim
        self.rank = rank
        self.levels = min(levels, max(0, int(math.floor(math.log2(max(dim, 1))))))
        self.padded = math.ceil(dim / 2**self.levels) * 2**self.levels
        leaf = self.padded >> self.levels
        self.diag = torch.zeros(2**self.levels, leaf, leaf, device=device, dtype=dtype)
        # Level k = 1..kappa: 2^(k-1) off-diagonal blocks of size padded / 2^k.
        self.U: list[torch.Tensor] = []
        self.S: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        for k in range(1, self.levels + 1):
            nb, h = 2 ** (k - 1), self.padded >> k
            self.U.append(torch.zeros(nb, h, 0, device=device, dtype=dtype))
            self.S.append(torch.zeros(nb, 0, device=device, dtype=dtype))
            self.V.append(torch.zeros(nb, h, 0, device=device, dtype=dtype))
        self.count = 0

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad the first dimension (dim) to the padded size."""
        if self.padded == self.dim:
            return x
        return torch.cat([x, x.new_zeros(self.padded - self.dim, *x.shape[1:])], dim=0)

    def update_(self, z: torch.Tensor) -> None:
        """Absorb c new vectors z: (c, dim): exact leaves += z z^T; every off-diagonal block by Brand's update."""
        z = z.reshape(-1, self.dim).to(self.diag.dtype)
        c = z.shape[0]
        zt = self._pad(z.t())  # (padded, c)
        for k in range(1, self.levels + 1):
            nb, h = 2 ** (k - 1), self.padded >> k
            blocks = zt.view(nb, 2, h, c)
            lvl = k - 1
            self.U[lvl], self.S[lvl], self.V[lvl] = brand_update(
                self.U[lvl], self.S[lvl], self.V[lvl], blocks[:, 0], blocks[:, 1], min(self.rank, h)
            )
        leaves = zt.view(2**self.levels, -1, c)
        self.diag.baddbmm_(leaves, leaves.transpose(1, 2))
        self.count += c

    def _scale(self) -> float:
        return 1.0 / max(self.count, 1)

    def dense(self) -> torch.Tensor:
        """Materialise the approximation (tests and small layers only)."""
        out = torch.block_diag(*self.diag.unbind(0))
        for k in range(1, self.levels + 1):
            nb, h = 2 ** (k - 1), self.padded >> k
            U, S, V = self.U[k - 1], self.S[k - 1], self.V[k - 1]
            for j in range(nb):
                b12 = (U[j] * S[j]) @ V[j].t()
                r0 = j * 2 * h
                out[r0 : r0 + h, r0 + h : r0 + 2 * h] = b12
                out[r0 + h : r0 + 2 * h, r0 : r0 + h] = b12.t()
        return out[: self.dim, : self.dim] * self._scale()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """F @ x for x: (dim, n), through the hierarchy (O(dim (leaf + r kappa) n))."""
        n = x.shape[1]
        xp = self._pad(x.to(self.diag.dtype))
        out = (self.diag @ xp.view(2**self.levels, -1, n)).view(self.padded, n)
        for k in range(1, self.levels + 1):
            nb, h = 2 ** (k - 1), self.padded >> k
            U, S, V = self.U[k - 1], self.S[k - 1], self.V[k - 1]
            xb = xp.view(nb, 2, h, n)
            ob = out.view(nb, 2, h, n)
            ob[:, 0] += U @ (S[:, :, None] * (V.transpose(1, 2) @ xb[:, 1]))
            ob[:, 1] += V @ (S[:, :, None] * (U.transpose(1, 2) @ xb[:, 0]))
        return out[: self.dim] * self._scale()

    def inverse(self, damping: float) -> HierarchicalInverse:
        return HierarchicalInverse(self, damping)

    def inverse_diagonal(self, damping: float) -> torch.Tensor:
        return self.inverse(damping).diagonal()

    def nbytes(self) -> int:
        tensors = [self.diag, *self.U, *self.S, *self.V]
        return sum(t.numel() * t.element_size() for t in tensors)


class HierarchicalInverse:
    """(F + lambda I)^-1 of a hierarchical factor by recursive block inversion (eqs. 5-8), same storage.

    Level k's correction belongs to the 2^(k-1) blocks of level k-1: their inverse is
    blockdiag(child inverses) - L K L^T, L = blockdiag(L1, L2), L1 = B11^-1 U, L2 = B22^-1 V.
    """

    def __init__(self, factor: HierarchicalFactor, damping: float):
        self.f = factor
        s = factor._scale()
        leaf_diag = factor.diag.diagonal(dim1=1, dim2=2).reshape(-1)[: factor.dim]
        lam = damping * (leaf_diag.mean() * s).clamp_min(1e-12)
        eye = _eye_like(factor.diag.shape[-1], factor.diag)
        self.leaf_inv = torch.linalg.inv(factor.diag * s + lam * eye)
        self.L1: list[torch.Tensor | None] = [None] * factor.levels
        self.L2: list[torch.Tensor | None] = [None] * factor.levels
        self.K: list[torch.Tensor | None] = [None] * factor.levels
        for k in range(factor.levels, 0, -1):  # bottom-up: level k's children are inverted already
            U, S, V = factor.U[k - 1], factor.S[k - 1] * s, factor.V[k - 1]
            nb, h, r = U.shape
            if r == 0:
                continue
            children = torch.stack([U, V], dim=1).reshape(2 * nb, h, r)
            L = self._apply(k, children).view(nb, 2, h, r)
            L1, L2 = L[:, 0], L[:, 1]
            x1, x2 = U.transpose(1, 2) @ L1, V.transpose(1, 2) @ L2
            X = torch.zeros(nb, 2 * r, 2 * r, device=U.device, dtype=U.dtype)
            X[:, :r, :r], X[:, r:, r:] = x1, x2
            C = torch.zeros_like(X)
            C[:, :r, r:] = torch.diag_embed(S)
            C[:, r:, :r] = torch.diag_embed(S)
            kernel = C @ torch.linalg.inv(_eye_like(2 * r, X) + X @ C)
            self.L1[k - 1], self.L2[k - 1], self.K[k - 1] = L1.contiguous(), L2.contiguous(), kernel

    def _apply(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Apply the inverse of every level-`level` block: x (2^level, h_level, p) -> same shape."""
        f = self.f
        if level == f.levels:
            return self.leaf_inv @ x
        nb, h, p = x.shape
        y = self._apply(level + 1, x.reshape(2 * nb, h // 2, p)).view(nb, 2, h // 2, p)
        K = self.K[level]
        if K is not None:
            L1, L2 = self.L1[level], self.L2[level]
            r = L1.shape[-1]
            xs = x.view(nb, 2, h // 2, p)
            t = torch.cat([L1.transpose(1, 2) @ xs[:, 0], L2.transpose(1, 2) @ xs[:, 1]], dim=1)
            w = K @ t
            y = torch.stack([y[:, 0] - L1 @ w[:, :r], y[:, 1] - L2 @ w[:, r:]], dim=1)
        return y.reshape(nb, h, p)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(F + lambda I)^-1 @ x for x: (dim, n)."""
        xp = self.f._pad(x.to(self.leaf_inv.dtype))
        return self._apply(0, xp.unsqueeze(0)).squeeze(0)[: self.f.dim]

    def diagonal(self) -> torch.Tensor:
        """diag((F + lambda I)^-1), bottom-up: children's diagonals minus diag(L K L^T)."""
        d = self.leaf_inv.diagonal(dim1=1, dim2=2)  # (2^kappa, leaf)
        for k in range(self.f.levels, 0, -1):
            d = d.reshape(2 ** (k - 1), -1)
            K = self.K[k - 1]
            if K is None:
                continue
            L1, L2 = self.L1[k - 1], self.L2[k - 1]
            r = L1.shape[-1]
            top = ((L1 @ K[:, :r, :r]) * L1).sum(-1)
            bottom = ((L2 @ K[:, r:, r:]) * L2).sum(-1)
            d = d - torch.cat([top, bottom], dim=1)
        return d.reshape(-1)[: self.f.dim].clone()


def make_factor(kind: str, dim: int, *, rank: int, levels: int, device, dtype=torch.float32):
    """`hierarchical` (Sylva) or `exact` (K-FAC pruner); an unknown kind is an error listing both."""
    if kind == "hierarchical":
        return HierarchicalFactor(dim, rank, levels, device, dtype)
    if kind == "exact":
        return ExactFactor(dim, device, dtype)
    raise ValueError(f"unknown K-FAC factor kind {kind!r}; valid: 'hierarchical', 'exact'")
