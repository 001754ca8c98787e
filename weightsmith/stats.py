"""Streaming tensor statistics: mean/std (Chan et al. parallel update), min/max, NaN/Inf counts.

Values are taken in fixed pieces of PIECE values counted from the start of the stream, whatever
the sizes of the blocks they arrive in, so the result depends on the values alone: a tensor
streamed in 64 MB bands or in 64 kB bands gives the same bits.
"""

from __future__ import annotations

import math

import numpy as np

PIECE = 1 << 16  # values per piece: its float64 copy (512 kB) stays in the CPU cache


class RunningStats:
    """Statistics of finite values, updated one block at a time in float64.

    `n`, `mean`, `m2` (sum of squared deviations from the mean), `min`, `max`, `nan` and `inf`
    read the statistics of everything given so far.
    """

    def __init__(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._nan = 0
        self._inf = 0
        self._buf = np.empty(PIECE, np.float64)  # the piece being filled, then its deviations
        self._fill = 0  # values of an unfinished piece at the start of _buf

    def update(self, block: np.ndarray) -> None:
        flat = np.asarray(block).ravel()
        start = 0
        if self._fill:  # complete the piece that the previous block started
            start = min(PIECE - self._fill, flat.size)
            self._buf[self._fill : self._fill + start] = flat[:start]
            self._fill += start
            if self._fill < PIECE:
                return
            self._fill = 0
            self._update(self._buf)
        whole = start + (flat.size - start) // PIECE * PIECE
        for s in range(start, whole, PIECE):
            self._update(flat[s : s + PIECE])
        rest = flat.size - whole
        if rest:
            self._buf[:rest] = flat[whole:]
            self._fill = rest

    def _flush(self) -> None:
        if self._fill:
            fill, self._fill = self._fill, 0
            self._update(self._buf[:fill])

    def _update(self, piece: np.ndarray) -> None:
        lo, hi = piece.min(), piece.max()  # NaN propagates: both finite means every value is
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = np.isfinite(piece)
            nan = int(np.isnan(piece).sum())
            self._nan += nan
            self._inf += piece.size - int(finite.sum()) - nan
            piece = piece[finite]
            if piece.size == 0:
                return
            lo, hi = piece.min(), piece.max()
        # Chan, Golub & LeVeque (1979): merge (n, mean, M2) of two sets.
        n_b = piece.size
        x = self._buf[:n_b]  # (n_b,) float64 (a flushed piece is copied onto itself: harmless)
        np.copyto(x, piece)
        mean_b = float(x.sum()) / n_b
        x -= mean_b
        np.square(x, out=x)
        m2_b = float(x.sum())
        delta = mean_b - self._mean
        total = self._n + n_b
        self._mean += delta * n_b / total
        self._m2 += m2_b + delta * delta * self._n * n_b / total
        self._n = total
        self._min = min(self._min, float(lo))
        self._max = max(self._max, float(hi))

    def _read(name: str):  # noqa: N805 - a property factory used in the class body
        def get(self):
            self._flush()
            return getattr(self, name)

        return property(get)

    n = _read("_n")
    mean = _read("_mean")
    m2 = _read("_m2")
    min = _read("_min")
    max = _read("_max")
    nan = _read("_nan")
    inf = _read("_inf")
    del _read

    def as_dict(self) -> dict:
        empty = self.n == 0
        return {
            "mean": None if empty else self.mean,
            "std": None if empty else math.sqrt(self.m2 / self.n),
            "min": None if empty else self.min,
            "max": None if empty else self.max,
            "abs_max": None if empty else max(abs(self.min), abs(self.max)),
            "nan": self.nan,
            "inf": self.inf,
        }
