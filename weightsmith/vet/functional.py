"""Functional novelty: does a sample compute anything its nearest training example does not?

On a fixed probe (the first `probe_tokens` predicted tokens of the held-out text, 4,096 by
default, in the quality pass's windows), the functional novelty of an entry is

    min over members k of  mean over probe positions of  JS(p_entry, p_k)

in nats (0 <= JS <= log 2), where p is a model's next-token distribution and the members are
the training examples (a zoo's checkpoints, else the original alone). With at most
`all_members` (32) examples every one is compared; with more, only the `nearest` (16) nearest by
group weight distance (`weight_stats.group_distances`), so the value is an upper bound.

A member is a model too: the original with the member's replaced tensors put in, as the
assembler builds candidates. Its probe outputs are computed once and cached on disk under the
state folder (`cache/probe/`), keyed by the original, the examples, the member and the probe:
probe x vocabulary float32 values each (4 MiB for bytes, 0.8 GB for a 50k vocabulary, where a
smaller `probe_tokens` may be wanted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from weightsmith.vet.registry import Context


def js_divergence(p_log, q_log) -> float:
    """Mean over positions of the Jensen-Shannon divergence (nats) of two (positions, V) log-softmaxes."""
    return _js(Distribution.of(p_log), Distribution.of(q_log))


IN_MEMORY = 1 << 23  # probe positions x vocabulary up to which probabilities are kept in float64 (64 MiB)
_ROWS = 256  # positions per chunk otherwise


class Distribution:
    """Next-token distributions (positions, V) with their mean entropy, float64 arithmetic.

    JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2, so one log per pair once H(p), H(q) are known.
    Small probes (<= IN_MEMORY values: byte-level vocabularies) keep their float64 probabilities;
    larger ones (a 50k vocabulary) keep only the float32 log-probabilities, and pairs are computed
    in chunks of positions, so memory stays bounded whatever the vocabulary.
    """

    def __init__(self, log_probs: np.ndarray, probs: np.ndarray | None, entropy: float):
        self.log_probs, self.probs, self.entropy = log_probs, probs, entropy

    @classmethod
    def of(cls, log_probs, in_memory: int = IN_MEMORY) -> Distribution:
        lp = np.asarray(log_probs)
        if lp.size <= in_memory:
            lp64 = lp.astype(np.float64)
            p = np.exp(lp64)
            return cls(lp, p, float(-(p * lp64).sum(axis=-1).mean()))
        total = 0.0
        for a in range(0, len(lp), _ROWS):
            chunk = lp[a : a + _ROWS].astype(np.float64)
            total += float(-(np.exp(chunk) * chunk).sum())
        return cls(lp, None, total / len(lp))

    def rows(self, a: int, b: int) -> np.ndarray:
        return self.probs[a:b] if self.probs is not None else np.exp(self.log_probs[a:b].astype(np.float64))


def _js(p: Distribution, q: Distribution) -> float:
    n = len(p.log_probs)
    step = n if p.probs is not None and q.probs is not None else _ROWS
    h_m = 0.0
    for a in range(0, n, step):
        m = 0.5 * (p.rows(a, a + step) + q.rows(a, a + step))
        with np.errstate(divide="ignore", invalid="ignore"):
            h_m += float(-np.where(m > 0, m * np.log(m), 0.0).sum())
    return max(0.0, h_m / n - 0.5 * (p.entropy + q.entropy))


def members_to_compare(distances: np.ndarray, all_members: int, nearest: int) -> tuple[list[int], bool]:
    """(member indices, upper bound?): every member up to `all_members`, else the `nearest`."""
    k = len(distances)
    if k <= all_members:
        return list(range(k)), False
    order = np.argsort(distances, kind="stable")
    return [int(i) for i in order[:nearest]], True


def functional_novelty(
    probe_log,
    context: Context,
    members: list[int],
    member_probe: Callable[[int], Distribution],
) -> float:
    """min over `members` of the mean JS divergence between the entry's probe outputs and theirs."""
    p = Distribution.of(probe_log)
    return min(_js(p, member_probe(k)) for k in members)


def probe_key(context: Context, k: int, probe_ids: list[int], window: int) -> str:
    """The disk-cache key of member k's probe outputs."""
    h = hashlib.sha256(context.fingerprint().encode())
    h.update(f"{k}:{window}:".encode())
    h.update(np.asarray(probe_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def cached_probe(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Member probe outputs from the disk cache, computed and stored on a miss."""
    from weightsmith.state import cache_dir

    folder = cache_dir() / "probe"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")  # read as needed: 0.8 GB for 4,096 x 50k tokens
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    values = np.ascontiguousarray(compute(), dtype=np.float32)
    tmp = path.with_name(f"{key}.partial.npy")
    np.save(tmp, values)
    tmp.replace(path)
    return values
