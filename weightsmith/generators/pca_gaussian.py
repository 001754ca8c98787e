"""Zoo baseline `pca-gaussian`: a Gaussian in the top principal components of the checkpoints.

With K checkpoints flattened to X (K, D), centered Xc = X - mean:
1. Gram trick (Turk & Pentland 1991): D can be huge, so take the eigendecomposition of the
   (K, K) matrix G = Xc Xc^T = U diag(lambda) U^T instead of the (D, D) covariance.
2. Principal directions v_i = Xc^T u_i / sqrt(lambda_i) (unit vectors in R^D), with sample
   variance lambda_i / (K - 1); keep the top q = min(components, K - 1) with lambda_i > 0.
3. Sample x = mean + scale * sum_i z_i sqrt(var_i) v_i, z ~ N(0, I_q): with scale 1 the
   Gaussian with the zoo's covariance restricted to those directions (exactly the zoo's
   covariance when q = K - 1); a report sweeps the scale to meet candidates at their novelty.
   z is the tensor's own draw (keyed by its name; a joint stack shares one z), and the sum
   runs coefficient by coefficient, so a chunk is exactly that run of the whole sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State, Streams

_BLOCK = 1 << 20  # columns of X per block: K x 1M float64 temporaries at most
_RTOL = 1e-12  # eigenvalues below this fraction of the largest are rounding noise, dropped


class PcaGaussianConfig(GeneratorConfig):
    """How many principal components to keep, and how far along them to go."""

    components: int = Field(16, ge=1)  # q, capped at K - 1 (the rank of the centered zoo)
    scale: float = Field(1.0, ge=0.0)  # multiplies every component's std (1: the zoo's spread)


class PcaGaussian(Generator):
    """Gaussian over the top principal components of a zoo."""

    name = "pca-gaussian"
    Config = PcaGaussianConfig
    min_checkpoints = 2

    def deterministic(self, config: GeneratorConfig | Mapping[str, Any] | None, k: int) -> bool:
        return self.config(config).scale == 0.0

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, PcaGaussianConfig)
        flat = examples.flat()  # (K, D)
        k, d = flat.shape
        mean = flat.mean(axis=0, dtype=np.float64)  # (D,)
        # 1. G = Xc Xc^T, accumulated over column blocks in float64
        gram = np.zeros((k, k), dtype=np.float64)
        for c in range(0, d, _BLOCK):
            xc = flat[:, c : c + _BLOCK] - mean[c : c + _BLOCK]  # (K, block)
            gram += xc @ xc.T
        lam, u = np.linalg.eigh(gram)  # ascending
        order = np.argsort(lam)[::-1]
        lam, u = lam[order], u[:, order]
        q = min(config.components, k - 1)
        keep = lam[:q] > _RTOL * max(lam[0], 0.0)
        lam, u = lam[:q][keep], u[:, :q][:, keep]  # (q,), (K, q)
        # 2. v_i = Xc^T u_i / sqrt(lambda_i), block by block
        components = np.empty((lam.size, d), dtype=np.float32)  # (q, D)
        for c in range(0, d, _BLOCK):
            xc = flat[:, c : c + _BLOCK] - mean[c : c + _BLOCK]  # (K, block)
            components[:, c : c + _BLOCK] = (u.T @ xc) / np.sqrt(lam)[:, None]
        variances = lam / (k - 1)
        info = {
            "components": int(lam.size),
            "explained": float(lam.sum() / max(gram.trace(), 1e-300)),
        }
        return {
            "mean": mean.astype(np.float32),
            "components": components,
            "variances": variances,
        }, info

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        assert isinstance(config, PcaGaussianConfig)
        self._require_shape(state, spec)
        a = state.arrays
        # 3. z ~ N(0, I_q), scaled by the per-component std
        z = streams.tensor(state.tensor).standard_normal(a["variances"].shape[0])  # (q,)
        coeffs = (config.scale * z * np.sqrt(a["variances"])).astype(np.float32)  # (q,)
        x = a["mean"][spec.region].copy()  # (region,)
        for c, v in zip(coeffs, a["components"], strict=True):  # fixed order: chunks match the whole
            x += c * v[spec.region]
        return x.reshape(spec.out_shape)
