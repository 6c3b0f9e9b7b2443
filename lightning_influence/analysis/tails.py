"""Power-law fits to the top of each query's positive influences (Clauset, Shalizi & Newman 2009,
"CSN" below), as Grosse et al. (2023) fit them. Pure functions: no I/O, no logging."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from lightning_influence._io import json_ready
from lightning_influence.analysis.arrays import ArrayLike, as_numpy

_KS_CHUNK_ELEMENTS = 1 << 18  # bounds the [candidates, values] matrix of the xmin scan
# Significance of the tail tests (Clauset, Shalizi & Newman 2009 use 0.1 for both): a bootstrap
# p-value above it keeps the power law plausible, a likelihood-ratio p-value below it makes the sign
# of the ratio count.
PLAUSIBLE_P = 0.1


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
    raw = as_numpy(values)
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
    matrix = as_numpy(scores)
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


def plausible_fraction(fits: List[Optional[PowerLawFit]]) -> Optional[float]:
    """The share of fitted queries whose tail is a plausible power law (``None``: no verdict):
    the one definition of ``tail_plausible_fraction``, shown beside every median exponent."""
    verdicts = [fit.plausible for fit in fits if fit is not None and fit.plausible is not None]
    return float(np.mean(verdicts)) if verdicts else None
