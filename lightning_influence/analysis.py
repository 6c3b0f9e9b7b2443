"""What an influence score distribution looks like: tail, concentration, layers and tokens.

Pure functions over tensors (or numpy arrays): no I/O, no logging, no Lightning, no W&B. They
reproduce the analyses of Grosse et al. (2023): power-law fits to the top of each query's positive
influences (Clauset, Shalizi & Newman 2009, "CSN" below), the share of positive influence held by
the top examples, the distribution of influence over layers (``|s_l| / sum_l |s_l|``) and the
tokenwise L2/L1 ratio that flags likely-spurious sequences.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from lightning_influence._io import json_ready

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]
Groups = Union[int, Sequence[Sequence[int]]]

SPURIOUS_L2_L1 = 2.0 / 3.0  # the paper's threshold on the tokenwise L2/L1 ratio
_KS_CHUNK_ELEMENTS = 1 << 18  # bounds the [candidates, values] matrix of the xmin scan
# Significance of the tail tests (Clauset, Shalizi & Newman 2009 use 0.1 for both): a bootstrap
# p-value above it keeps the power law plausible, a likelihood-ratio p-value below it makes the sign
# of the ratio count.
PLAUSIBLE_P = 0.1


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _to_tensor(values: ArrayLike) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    return torch.as_tensor(np.asarray(values))


# -- power-law tail ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power-law fit ``p(x) ~ x^-alpha`` for ``x >= xmin`` (CSN 2009).

    Attributes:
        alpha: maximum-likelihood exponent ``1 + n_tail / sum(log(x / xmin))``.
        xmin: start of the tail, chosen by minimising the Kolmogorov-Smirnov distance (or given).
        ks: Kolmogorov-Smirnov distance between the tail and the fitted law.
        n_tail: number of values ``>= xmin``.
        n: number of positive, finite values given.
        sigma: standard error of ``alpha``: ``(alpha - 1) / sqrt(n_tail)``.
        p_value: bootstrap goodness-of-fit p-value (CSN section 4.1), if requested; the power law
            is plausible when it exceeds 0.1.
        lognormal_R, exponential_R: log-likelihood ratio (summed over the tail) of the power law
            against a log-normal / exponential tail; positive favours the power law.
        lognormal_p, exponential_p: Vuong's significance of the sign of the ratio.
    """

    alpha: float
    xmin: float
    ks: float
    n_tail: int
    n: int
    sigma: float
    p_value: Optional[float] = None
    lognormal_R: Optional[float] = None
    lognormal_p: Optional[float] = None
    exponential_R: Optional[float] = None
    exponential_p: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """All fields as a JSON-ready dict (non-finite numbers become ``None``), with the verdict."""
        return json_ready({**dataclasses.asdict(self), "plausible": self.plausible, "label": self.label})

    @property
    def favoured_alternative(self) -> Optional[str]:
        """``"lognormal"`` or ``"exponential"`` if that tail fits significantly better than the power
        law (log-likelihood ratio below zero with Vuong's p below 0.1, CSN section 5), the more
        significant one if both do; ``None`` if neither does or none was compared."""
        beaten = [(p, name) for name, ratio, p in (("lognormal", self.lognormal_R, self.lognormal_p),
                                                   ("exponential", self.exponential_R, self.exponential_p))
                  if ratio is not None and p is not None and ratio < 0 and p < PLAUSIBLE_P]
        return min(beaten)[1] if beaten else None

    @property
    def plausible(self) -> Optional[bool]:
        """Whether the power law is a plausible description of the tail: no alternative is favoured
        and, with a bootstrap, the goodness-of-fit p-value exceeds 0.1. ``None`` when nothing was
        tested (``compare_alternatives=False`` and no bootstrap): the fit alone proves nothing."""
        tested = self.lognormal_R is not None or self.exponential_R is not None or self.p_value is not None
        if not tested:
            return None
        return self.favoured_alternative is None and (self.p_value is None or self.p_value > PLAUSIBLE_P)

    @property
    def label(self) -> str:
        """What to call this tail in a report: a power law only where the tests allow it."""
        if self.plausible is None:
            return "power-law fit, not tested against other tails"
        if self.plausible:
            return "power law plausible"
        if self.favoured_alternative is not None:
            return f"heavy tail, power law not supported ({self.favoured_alternative} favoured)"
        return f"heavy tail, power law not supported (goodness-of-fit p = {self.p_value:.2f})"


def _ks_distances(log_x: np.ndarray, starts: np.ndarray, log_xmins: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance of each candidate tail ``x[start:]`` (sorted) to its power law (``xmin``, ``alpha``).

    With ``m`` tail values, the empirical survival function just before the ``j``-th is
    ``(m - j) / m`` and just after it ``(m - j - 1) / m``; with ``d`` the first minus the fitted
    survival ``(x / xmin)^(1 - alpha)``, the KS distance is ``max(max d, 1/m - min d)`` (this also
    holds with ties, whose extremes are the true jumps). Candidates are processed in chunks whose
    columns start at the chunk's smallest start, so the scan costs about the sum of tail lengths.
    """
    n = len(log_x)
    order = np.argsort(starts)
    out = np.empty(len(starts))
    remaining = (n - np.arange(n)).astype(np.float64)  # values at or above each position
    per_chunk = max(1, _KS_CHUNK_ELEMENTS // n)
    for lo in range(0, len(order), per_chunk):
        chunk = order[lo : lo + per_chunk]
        first = int(starts[chunk].min())
        s = starts[chunk, None]
        m = (n - s).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # positions below xmin are masked out
            survival = np.exp((1.0 - alphas[chunk, None]) * (log_x[None, first:] - log_xmins[chunk, None]))
            d = remaining[None, first:] / m - survival
        d = np.where(np.arange(first, n)[None, :] >= s, d, 0.5 / m)  # 0.5/m never exceeds the KS
        out[chunk] = np.maximum(d.max(axis=1), 1.0 / m[:, 0] - d.min(axis=1))
    return out


def _tail_alphas(log_x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """MLE exponent for every candidate start, from suffix sums of ``log x`` (inf if degenerate)."""
    suffix = np.cumsum(log_x[::-1])[::-1]
    n_tail = len(log_x) - starts
    denominator = suffix[starts] - n_tail * log_x[starts]
    with np.errstate(divide="ignore"):
        return np.where(denominator > 0, 1.0 + n_tail / np.maximum(denominator, 0.0), np.inf)


def _search_xmin(x: np.ndarray, log_x: np.ndarray, min_tail: int, max_candidates: int) -> int:
    """Index into sorted ``x`` of the KS-optimal ``xmin``.

    Candidates are the distinct values (except the largest) that leave at least ``min_tail``
    values in the tail. Above ``max_candidates`` of them, a quantile grid is scanned first and the
    bracket around its best point is scanned again, more finely, until the bracket is exhausted.
    """
    unique = np.unique(x)[:-1]
    starts = np.searchsorted(x, unique, side="left")
    alphas = _tail_alphas(log_x, starts)
    keep = (len(x) - starts >= min_tail) & np.isfinite(alphas)
    starts, alphas = starts[keep], alphas[keep]
    if len(starts) == 0:
        raise ValueError(
            f"no candidate xmin leaves {min_tail} distinct-enough values in the tail "
            f"({len(x)} positive values, {len(unique) + 1} distinct)"
        )
    lo, hi = 0, len(starts)
    max_candidates = max(int(max_candidates), 3)
    while True:
        if hi - lo <= max_candidates:
            grid = np.arange(lo, hi)
        else:
            grid = np.unique(np.linspace(lo, hi - 1, max_candidates).round().astype(np.int64))
        distances = _ks_distances(log_x, starts[grid], log_x[starts[grid]], alphas[grid])
        best = int(np.argmin(distances))
        if hi - lo <= max_candidates:
            return int(starts[grid[best]])
        lo = int(grid[max(best - 1, 0)])
        hi = int(grid[min(best + 1, len(grid) - 1)]) + 1


def _log_ndtr_and_mills(t: float) -> tuple:
    """``log Phi(t)`` and ``phi(t) / Phi(t)`` for the standard normal, stable far into the left tail."""
    if t > -30.0:
        log_cdf = math.log(0.5 * math.erfc(-t / math.sqrt(2.0)))
        return log_cdf, math.exp(-0.5 * t * t - 0.5 * math.log(2 * math.pi) - log_cdf)
    series = 1.0 - t**-2 + 3.0 * t**-4 - 15.0 * t**-6  # asymptotic expansion of Mills' ratio
    return -0.5 * t * t - 0.5 * math.log(2 * math.pi) - math.log(-t) + math.log(series), -t / series


def _fit_lognormal_tail(log_tail: np.ndarray, log_xmin: float, max_iter: int = 100) -> np.ndarray:
    """Pointwise log-likelihoods of the maximum-likelihood log-normal truncated at ``xmin``.

    The likelihood depends on the data only through the mean and mean square of ``log x``, so a
    damped Newton method on ``(mu, log sigma)`` costs nothing per iteration, whatever the tail size.
    """
    m1, m2 = float(log_tail.mean()), float((log_tail**2).mean())

    def objective(mu: float, s: float) -> float:  # mean negative log-likelihood, up to constants
        try:
            sigma = math.exp(s)
            return s + (m2 - 2 * mu * m1 + mu * mu) / (2 * sigma * sigma) + _log_ndtr_and_mills((mu - log_xmin) / sigma)[0]
        except (OverflowError, ValueError, ZeroDivisionError):  # a trial step far out of range
            return math.inf

    mu, s = m1, math.log(max(math.sqrt(max(m2 - m1 * m1, 0.0)), 1e-3))
    for _ in range(max_iter):
        sigma = math.exp(s)
        t = (mu - log_xmin) / sigma
        mills = _log_ndtr_and_mills(t)[1]
        dmills = -mills * (t + mills)
        spread = (m2 - 2 * mu * m1 + mu * mu) / sigma**2
        grad = ((mu - m1) / sigma**2 + mills / sigma, 1.0 - spread - mills * t)
        if math.hypot(*grad) < 1e-10:
            break
        h_mm = (1.0 + dmills) / sigma**2
        h_ms = -2 * (mu - m1) / sigma**2 - (t * dmills + mills) / sigma
        h_ss = 2 * spread + t * t * dmills + mills * t
        det = h_mm * h_ss - h_ms * h_ms
        if h_mm > 0 and det > 0:  # Newton step where the Hessian is positive definite
            step = ((h_ss * grad[0] - h_ms * grad[1]) / det, (h_mm * grad[1] - h_ms * grad[0]) / det)
        else:
            step = grad
        current, scale = objective(mu, s), 1.0
        while scale > 1e-10 and not objective(mu - scale * step[0], s - scale * step[1]) < current:
            scale /= 2
        if scale <= 1e-10:
            break
        mu, s = mu - scale * step[0], s - scale * step[1]
    sigma = math.exp(s)
    z = (log_tail - mu) / sigma
    log_mass = _log_ndtr_and_mills((mu - log_xmin) / sigma)[0]
    return -log_tail - s - 0.5 * math.log(2 * math.pi) - 0.5 * z**2 - log_mass


def _vuong(ll_first: np.ndarray, ll_second: np.ndarray) -> tuple:
    """Log-likelihood ratio and Vuong's two-sided p-value for non-nested models."""
    diff = ll_first - ll_second
    ratio = float(diff.sum())
    spread = float(diff.std())
    if not math.isfinite(ratio):
        return None, None
    if spread == 0.0:
        return ratio, 1.0 if ratio == 0.0 else 0.0
    return ratio, math.erfc(abs(ratio) / (math.sqrt(2 * len(diff)) * spread))


def _compare_alternatives(tail: np.ndarray, xmin: float, alpha: float) -> Dict[str, Optional[float]]:
    log_tail = np.log(tail)
    ll_power = math.log(alpha - 1.0) - math.log(xmin) - alpha * (log_tail - math.log(xmin))
    found: Dict[str, Optional[float]] = {}
    excess = tail - xmin
    if excess.mean() > 0:
        rate = 1.0 / excess.mean()
        found["exponential_R"], found["exponential_p"] = _vuong(ll_power, math.log(rate) - rate * excess)
    found["lognormal_R"], found["lognormal_p"] = _vuong(ll_power, _fit_lognormal_tail(log_tail, math.log(xmin)))
    return found


def _fit_sorted(x: np.ndarray, xmin: Optional[float], min_tail: int, max_candidates: int) -> tuple:
    """(alpha, xmin, ks, start index) for sorted positive ``x``."""
    log_x = np.log(x)
    if xmin is None:
        start = _search_xmin(x, log_x, min_tail, max_candidates)
    else:
        if not xmin > 0:
            raise ValueError(f"xmin must be positive, got {xmin}")
        start = int(np.searchsorted(x, xmin, side="left"))
        if len(x) - start < min_tail:
            raise ValueError(f"only {len(x) - start} values are >= xmin={xmin}; need at least min_tail={min_tail}")
    starts = np.array([start])
    log_xmin = math.log(xmin) if xmin is not None else log_x[start]
    n_tail = len(x) - start
    denominator = float(log_x[start:].sum() - n_tail * log_xmin)
    if denominator <= 0:
        raise ValueError(f"all {n_tail} tail values equal xmin: the exponent is undefined")
    alpha = 1.0 + n_tail / denominator
    ks = float(_ks_distances(log_x, starts, np.array([log_xmin]), np.array([alpha]))[0])
    return alpha, float(x[start] if xmin is None else xmin), ks, start


def fit_power_law(
    values: ArrayLike,
    xmin: Optional[float] = None,
    *,
    bootstrap: int = 0,
    compare_alternatives: bool = True,
    min_tail: int = 10,
    max_xmin_candidates: int = 200,
    seed: int = 0,
) -> PowerLawFit:
    """Fit a continuous power law to the upper tail of ``values`` (Clauset, Shalizi & Newman 2009).

    Args:
        values: 1-D scores. Non-positive and non-finite values are dropped: pass positive influence
            scores (as the paper does) or absolute values.
        xmin: start of the tail; by default the value minimising the KS distance.
        bootstrap: number of semi-parametric bootstrap samples for the goodness-of-fit p-value
            (CSN section 4.1; 0 skips it, CSN use about 2500 for two-digit accuracy).
        compare_alternatives: also compute likelihood-ratio tests against log-normal and
            exponential tails above the same ``xmin``.
        min_tail: fewest values a tail may hold.
        max_xmin_candidates: most candidate ``xmin`` scanned at once; larger candidate sets are
            searched coarse-to-fine, so the result stays close to the exhaustive search.
        seed: seed of the bootstrap's private random generator.

    Returns:
        The fit as a :class:`PowerLawFit`.

    Raises:
        ValueError: if fewer than ``min_tail`` positive finite values remain, or the tail is
            degenerate (all values equal).
    """
    raw = _to_numpy(values)
    if raw.ndim != 1:
        raise ValueError(f"fit_power_law expects 1-D values, got shape {raw.shape}; use fit_query_tails for [Q, N]")
    x = np.sort(raw[np.isfinite(raw) & (raw > 0)])
    if len(x) < min_tail:
        raise ValueError(
            f"need at least min_tail={min_tail} positive finite values for a power-law fit, got {len(x)} "
            f"(of {len(raw)} values)"
        )
    alpha, found_xmin, ks, start = _fit_sorted(x, xmin, min_tail, max_xmin_candidates)
    n_tail = len(x) - start
    extra: Dict[str, Optional[float]] = {}
    if compare_alternatives:
        extra.update(_compare_alternatives(x[start:], found_xmin, alpha))
    if bootstrap > 0:
        extra["p_value"] = _bootstrap_p_value(
            x, start, alpha, found_xmin, ks, xmin, bootstrap, min_tail, max_xmin_candidates, seed
        )
    return PowerLawFit(
        alpha=alpha,
        xmin=found_xmin,
        ks=ks,
        n_tail=n_tail,
        n=len(x),
        sigma=(alpha - 1.0) / math.sqrt(n_tail),
        **extra,
    )


def _bootstrap_p_value(
    x: np.ndarray,
    start: int,
    alpha: float,
    found_xmin: float,
    ks: float,
    given_xmin: Optional[float],
    repetitions: int,
    min_tail: int,
    max_candidates: int,
    seed: int,
) -> Optional[float]:
    """Fraction of synthetic data sets, drawn from the fitted model, that fit worse than the data.

    Each synthetic set keeps the data's size: values below ``xmin`` are resampled from the data,
    values above it drawn from the fitted power law, in the data's proportion; it is then refitted
    exactly as the data were (including the ``xmin`` search).
    """
    rng = np.random.default_rng(seed)
    body = x[:start]
    n = len(x)
    worse = fitted = 0
    for _ in range(repetitions):
        n_power = rng.binomial(n, (n - start) / n) if len(body) else n
        synthetic = np.concatenate(
            [
                found_xmin * (1.0 - rng.random(n_power)) ** (-1.0 / (alpha - 1.0)),
                rng.choice(body, n - n_power) if n_power < n else np.empty(0),
            ]
        )
        try:
            synthetic_ks = _fit_sorted(np.sort(synthetic), given_xmin, min_tail, max_candidates)[2]
        except ValueError:
            continue
        fitted += 1
        worse += synthetic_ks >= ks
    return worse / fitted if fitted else None


def fit_query_tails(scores: ArrayLike, *, use: str = "positive", **kwargs: Any) -> List[Optional[PowerLawFit]]:
    """Per-query power-law fits of a ``[Q, N]`` score matrix.

    Args:
        scores: ``[Q, N]`` influence scores.
        use: ``"positive"`` fits each query's positive scores (as the paper does); ``"abs"`` fits
            absolute values.
        **kwargs: passed to :func:`fit_power_law`.

    Returns:
        One fit per query, ``None`` where a query has too few usable values.
    """
    if use not in ("positive", "abs"):
        raise ValueError(f"use must be 'positive' or 'abs', got {use!r}")
    matrix = _to_numpy(scores)
    if matrix.ndim != 2:
        raise ValueError(f"scores must be [Q, N], got shape {matrix.shape}")
    if use == "abs":
        matrix = np.abs(matrix)
    fits: List[Optional[PowerLawFit]] = []
    for row in matrix:
        try:
            fits.append(fit_power_law(row, **kwargs))
        except ValueError:
            fits.append(None)
    return fits


# -- concentration -------------------------------------------------------------------------------


def _concentration_1d(values: np.ndarray) -> Dict[str, float]:
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return {"top1pct_share": math.nan, "top10pct_share": math.nan, "gini": math.nan, "positive_fraction": math.nan}
    positive = np.sort(np.clip(values, 0.0, None))[::-1]
    total = positive.sum()
    found = {"positive_fraction": float((values > 0).mean())}
    for percent in (1, 10):
        k = max(1, n * percent // 100)
        found[f"top{percent}pct_share"] = float(positive[:k].sum() / total) if total > 0 else math.nan
    ascending = positive[::-1]
    weights = 2 * np.arange(1, n + 1) - n - 1
    found["gini"] = float((weights * ascending).sum() / (n * total)) if total > 0 else math.nan
    return found


def concentration(values: ArrayLike) -> Dict[str, float]:
    """How concentrated the positive influence is on a few training examples.

    Args:
        values: ``[N]`` scores of one query, or ``[Q, N]`` (then every number is the mean over
            queries, ignoring queries where it is undefined).

    Returns:
        ``top1pct_share`` / ``top10pct_share``: share of the total positive influence held by the
        top 1% / 10% of examples (at least one example); ``gini``: Gini coefficient of the positive
        part ``max(s, 0)`` over all examples; ``positive_fraction``: fraction of scores above zero.
        Shares and Gini are NaN when there is no positive influence; non-finite scores are ignored.
    """
    array = _to_numpy(values)
    if array.ndim == 1:
        return _concentration_1d(array)
    if array.ndim != 2:
        raise ValueError(f"values must be [N] or [Q, N], got shape {array.shape}")
    rows = [_concentration_1d(row) for row in array]
    found = {}
    for key in rows[0] if rows else ("top1pct_share", "top10pct_share", "gini", "positive_fraction"):
        column = np.array([row[key] for row in rows], dtype=np.float64)
        column = column[np.isfinite(column)]
        found[key] = float(column.mean()) if len(column) else math.nan
    return found


# -- layers --------------------------------------------------------------------------------------


def _layer_groups(num_layers: int, groups: Optional[Groups]) -> List[List[int]]:
    if groups is None:
        return [[layer] for layer in range(num_layers)]
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups must be a positive number of depth blocks, got {groups}")
        # never an empty block: a model with fewer layers than blocks gets one block per layer
        return [block.tolist() for block in np.array_split(np.arange(num_layers), min(groups, num_layers))]
    blocks = [[int(layer) for layer in block] for block in groups]
    bad = sorted({layer for block in blocks for layer in block if not 0 <= layer < num_layers})
    if bad or any(not block for block in blocks):
        raise ValueError(f"layer groups must be non-empty lists of indices in [0, {num_layers}); got {blocks}")
    return blocks


def layer_shares(layer_scores: ArrayLike, *, top_k: Optional[int] = None, groups: Optional[Groups] = None) -> torch.Tensor:
    """Each layer's share of every query's influence: ``sum_n |s_l[q,n]| / sum_l sum_n |s_l[q,n]|``.

    Args:
        layer_scores: ``[L, Q, N]`` per-layer scores (they sum over layers to the total score).
        top_k: only count each query's ``top_k`` training examples by total score (the paper's
            layer x top-sequences view); by default all examples.
        groups: an int ``G`` splits the layers into ``G`` contiguous depth blocks (the paper uses 9;
            at most one block per layer), or a list of lists of layer indices.

    Returns:
        ``[Q, L]`` (or ``[Q, G]``) float64 shares whose rows sum to 1; NaN rows for queries
        without any influence.
    """
    scores = _to_tensor(layer_scores).double()
    if scores.dim() != 3:
        raise ValueError(f"layer_scores must be [L, Q, N], got shape {tuple(scores.shape)}")
    magnitude = scores.abs().masked_fill(scores.isnan(), 0.0)  # NaN: an example whose scores are not finite
    if top_k is not None:
        k = min(int(top_k), scores.shape[2])
        totals = scores.sum(0)
        top = totals.masked_fill(totals.isnan(), -math.inf).topk(k, dim=1).indices  # [Q, k], never a NaN example
        magnitude = magnitude.gather(2, top.unsqueeze(0).expand(scores.shape[0], -1, -1))
    per_layer = magnitude.sum(2).T  # [Q, L]
    return shares_from_sums(per_layer, groups)


def result_layer_shares(result: Any, top_k: Optional[int] = None) -> Optional[torch.Tensor]:
    """:func:`layer_shares` ``[Q, L]`` of a result, from its ``layer_scores``, or from what a result
    of the callback keeps instead (``layer_abs_sums`` for all examples, ``top_layer_scores`` for the
    top ``k`` it kept per query); ``None`` when the result holds neither for this ``top_k``."""
    if result.layer_scores is not None:
        return layer_shares(result.layer_scores, top_k=top_k)
    if top_k is None:
        sums = result.get("layer_abs_sums")
        return None if sums is None else shares_from_sums(sums.double().T, None)
    top = result.get("top_layer_scores")
    if top is None or top.shape[2] < min(int(top_k), result.num_train):
        return None
    return shares_from_sums(top[:, :, :top_k].double().abs().nan_to_num(0.0).sum(2).T, None)


def shares_from_sums(per_layer: torch.Tensor, groups: Optional[Groups]) -> torch.Tensor:
    """Normalise ``[Q, L]`` sums of absolute scores into (grouped) shares."""
    blocks = _layer_groups(per_layer.shape[1], groups)
    grouped = torch.stack([per_layer[:, block].sum(1) for block in blocks], dim=1)
    total = grouped.sum(1, keepdim=True)
    return torch.where(total > 0, grouped / total, torch.full_like(grouped, math.nan))


def group_layer_names(layer_names: Sequence[str], groups: Optional[Groups]) -> List[str]:
    """Labels for the columns of grouped :func:`layer_shares`: ``"first..last"`` per depth block."""
    names = list(layer_names)
    labels = []
    for block in _layer_groups(len(names), groups):
        if len(block) == 1:
            labels.append(names[block[0]])
        elif block == list(range(block[0], block[-1] + 1)):
            labels.append(f"{names[block[0]]}..{names[block[-1]]}")
        else:
            labels.append("+".join(names[i] for i in block))
    return labels


# -- tokens --------------------------------------------------------------------------------------


def token_distribution(token_scores: ArrayLike, token_mask: Optional[ArrayLike] = None) -> Dict[str, torch.Tensor]:
    """How each sequence's influence spreads over its tokens.

    Args:
        token_scores: ``[..., T]`` per-token scores (e.g. ``[Q, N, T]``).
        token_mask: boolean mask of valid tokens, broadcastable to ``token_scores``
            (e.g. ``[N, T]``); by default every token is valid.

    Returns:
        ``l2_l1_ratio`` ``[...]``: ``||s||_2 / ||s||_1`` over valid tokens (1 when one token carries
        everything, ``1/sqrt(T)`` when spread evenly; NaN without influence); ``spurious``
        ``[...]`` bool: ratio above 2/3, the paper's flag for sequences whose influence comes from
        a token or two, often spuriously; ``top_token`` ``[...]``: position of the largest
        ``|s|`` (-1 when no token is valid).
    """
    scores = _to_tensor(token_scores).double()
    if token_mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    else:
        mask = _to_tensor(token_mask).bool().expand_as(scores)
    magnitude = torch.where(mask, scores.abs(), torch.zeros_like(scores))
    l1 = magnitude.sum(-1)
    l2 = magnitude.pow(2).sum(-1).sqrt()
    ratio = torch.where(l1 > 0, l2 / l1, torch.full_like(l1, math.nan))
    top = torch.where(mask, magnitude, torch.full_like(magnitude, -1.0)).argmax(-1)
    return {
        "l2_l1_ratio": ratio,
        "spurious": ratio > SPURIOUS_L2_L1,
        "top_token": torch.where(mask.any(-1), top, torch.full_like(top, -1)),
    }


# -- one-call summary ----------------------------------------------------------------------------


@dataclass
class InfluenceSummary:
    """The headline numbers of one influence result, ready for dashboards.

    Attributes:
        scalars: flat names without a namespace (sinks add ``influence/``): ``tail_alpha``,
            ``tail_xmin``, ``tail_ks``, ``tail_n`` (medians over queries of the per-query fits of
            positive scores), ``tail_plausible_fraction`` (the share of fitted queries whose tail is a
            plausible power law: :attr:`PowerLawFit.plausible`), ``tail_alpha_abs``, ``tail_p_value``
            (with bootstrap), ``top1pct_share``, ``top10pct_share``, ``gini``, ``positive_fraction``,
            ``score_abs_mean``, ``score_std``, ``spurious_fraction`` (with token scores),
            ``tail_partial_fraction`` (a result with ``keep_top_scores``: the share of queries
            whose positive scores were not all kept, so that their tail fit may differ from a dense one),
            ``layer_share/<layer>`` (mean over queries, with layer scores). Undefined numbers are
            left out.
        tail_fits: per-query fits of the positive scores (``None`` where impossible).
        layer_shares: ``[Q, L]`` layer shares, if the result has layer scores.
        layer_names: names of the columns of ``layer_shares``.
    """

    scalars: Dict[str, float]
    tail_fits: List[Optional[PowerLawFit]]
    layer_shares: Optional[torch.Tensor]
    layer_names: List[str]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (non-finite numbers become ``None``)."""
        return json_ready(
            {
                "scalars": self.scalars,
                "tail_fits": [fit.to_dict() if fit is not None else None for fit in self.tail_fits],
                "layer_shares": self.layer_shares,
                "layer_names": self.layer_names,
            }
        )


def _median(values: Sequence[Optional[float]]) -> float:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(present)) if present else math.nan


def _token_scores_of(result: Any) -> Optional[tuple]:
    """Dense token scores if the result has them, else those kept for the top-k examples."""
    if result.token_scores is not None:
        return result.token_scores, result.token_mask
    top = result.get("top_token_scores")
    if top is not None:
        return top, result.get("top_token_mask")
    return None


def summarize(result: Any, *, bootstrap: int = 0, top_k_layers: Optional[int] = None) -> InfluenceSummary:
    """Headline numbers of an :class:`~lightning_influence.results.InfluenceResult`.

    Never raises on degenerate scores (all zero, too few positives, NaN): the numbers that cannot
    be computed are left out of ``scalars``.

    Args:
        result: the result to summarise.
        bootstrap: bootstrap samples per query for the tail fit's p-value (0: none).
        top_k_layers: compute layer shares over each query's top-k examples only.
    """
    from lightning_influence import sketch as score_sketch  # sketch.py builds on this module

    kept = score_sketch.ScoreSketch.of(result) if result.scores is None else None
    if kept is not None:
        fits = score_sketch.tail_fits(kept, "positive", bootstrap=bootstrap)
        abs_fits = score_sketch.tail_fits(kept, "abs", compare_alternatives=False)
    else:
        scores = result.scores.double()
        fits = fit_query_tails(scores, use="positive", bootstrap=bootstrap)
        abs_fits = fit_query_tails(scores, use="abs", compare_alternatives=False)
    verdicts = [f.plausible for f in fits if f and f.plausible is not None]
    scalars: Dict[str, float] = {
        "tail_alpha": _median([f.alpha for f in fits if f]),
        "tail_plausible_fraction": float(np.mean(verdicts)) if verdicts else math.nan,  # beside alpha
        "tail_xmin": _median([f.xmin for f in fits if f]),
        "tail_ks": _median([f.ks for f in fits if f]),
        "tail_n": _median([f.n_tail for f in fits if f]),
        "tail_alpha_abs": _median([f.alpha for f in abs_fits if f]),
    }
    if bootstrap > 0:
        scalars["tail_p_value"] = _median([f.p_value for f in fits if f and f.p_value is not None])
    if kept is not None:
        scalars.update(score_sketch.concentration(kept))
        scalars.update(score_sketch.score_spread(kept))
        scalars["tail_partial_fraction"] = float(np.mean(score_sketch.tail_partial(kept)))
    else:
        scalars.update(concentration(scores))
        finite = scores[torch.isfinite(scores)]
        scalars["score_abs_mean"] = float(finite.abs().mean()) if finite.numel() else math.nan
        scalars["score_std"] = float(finite.std()) if finite.numel() > 1 else math.nan
    tokens = _token_scores_of(result)
    if tokens is not None:
        ratio = token_distribution(*tokens)["l2_l1_ratio"]
        defined = ratio[torch.isfinite(ratio)]
        scalars["spurious_fraction"] = float((defined > SPURIOUS_L2_L1).double().mean()) if defined.numel() else math.nan
    staleness = (result.meta.get("curvature") or {}).get("staleness")
    if staleness is not None:  # of the training-time covariances, before any refresh
        scalars["curvature_staleness"] = float(staleness)
    shares = result_layer_shares(result, top_k_layers)
    if shares is not None:
        mean_shares = shares.nanmean(0)
        for name, share in zip(result.layer_names, mean_shares.tolist()):
            scalars[f"layer_share/{name}"] = share
    return InfluenceSummary(
        scalars={key: float(value) for key, value in scalars.items() if math.isfinite(value)},
        tail_fits=fits,
        layer_shares=shares,
        layer_names=list(result.layer_names) if shares is not None else [],
    )
