"""Shifting a learned delete gate's bias so that it deletes its target share.

A learned gate ranks positions; most of its values lie near the threshold k / 2, so where the
last training steps left the bias decides the rate at inference (BENCHMARKS.md: Chinese 34-75%
at target 0.5). Shifting the bias to the target quantile of the gate's margins on training
batches fixes the rate and leaves the ranking as it is.
"""

from collections.abc import Callable, Iterable

import jax
import numpy as np

from hiermodel.sharding import to_host


def margins(gates, valid, k: float) -> np.ndarray:
    """Each valid position's score plus bias, -logit(G / k), from its gate value G in (k, 0];
    +inf where G is 0 (a position that must stay)."""
    share = np.asarray(gates, np.float64)[np.asarray(valid, bool)] / k
    with np.errstate(divide="ignore"):
        return np.log1p(-share) - np.log(share)


def bias_change(margins_N: np.ndarray, target: float) -> float:
    """What to add to the gate's bias so that a `target` share of these positions (those that may
    go) is deleted: minus the margin of the first position kept."""
    ordered = np.sort(margins_N)
    finite = ordered[np.isfinite(ordered)]
    return -float(min(ordered[min(round(target * ordered.size), ordered.size - 1)], finite[-1] + 1e-6))


def deleted_share(margins_N: np.ndarray, change: float = 0.0) -> float:
    """Share deleted (score plus bias below 0), with `change` added to the bias."""
    return float(np.mean(margins_N + change < 0))


def shift_gate_bias(params, change: float):
    """params with `change` added to every delete gate's bias, each leaf keeping its sharding."""

    found = []

    def shift(path, leaf):
        if [getattr(k, "key", None) for k in path][-2:] != ["gate", "b"]:
            return leaf
        found.append(path)
        return jax.device_put(leaf + change, leaf.sharding)

    shifted = jax.tree_util.tree_map_with_path(shift, params)
    if not found:
        raise ValueError("no delete gate bias (['gate']['b']) among the parameters")
    return shifted


def gate_margins(score_fn: Callable, params, batches: Iterable, k: float) -> np.ndarray:
    """The margins of every gated position of `batches` (global batches), from a soft score_fn."""
    found = []
    for batch in batches:
        scores = score_fn(params, batch)
        found.append(margins(to_host(scores["gates"]), to_host(scores["gated"]), k))
    return np.concatenate(found)
