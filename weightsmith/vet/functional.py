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
state folder (`cache/probe/`), keyed by the original, the examples, the member and the probe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from weightsmith.vet.registry import Context


def js_divergence(p_log, q_log) -> float:
    """Mean over positions of the Jensen-Shannon divergence (nats) of two (positions, V) log-softmaxes."""
    return _js(Distribution.of(p_log), Distribution.of(q_log))


class Distribution:
    """Next-token distributions (positions, V) as probabilities, with their mean entropy, float64.

    JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2, so one log per pair once H(p), H(q) are known.
    """

    def __init__(self, probs: np.ndarray, entropy: float):
        self.probs, self.entropy = probs, entropy

    @classmethod
    def of(cls, log_probs) -> Distribution:
        lp = np.asarray(log_probs, dtype=np.float64)
        p = np.exp(lp)
        return cls(p, float(-(p * lp).sum(axis=-1).mean()))


def _js(p: Distribution, q: Distribution) -> float:
    m = 0.5 * (p.probs + q.probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_m = -np.where(m > 0, m * np.log(m), 0.0).sum(axis=-1).mean()
    return max(0.0, float(h_m - 0.5 * (p.entropy + q.entropy)))


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
            return np.load(path)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    values = np.ascontiguousarray(compute(), dtype=np.float32)
    tmp = path.with_name(f"{key}.partial.npy")
    np.save(tmp, values)
    tmp.replace(path)
    return values
