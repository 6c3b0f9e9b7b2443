"""Reference cases: "behaviour unchanged" checks for refactorings.

The references saved next to this file (``<case>.safetensors`` + ``<case>.json``) were produced from
``main`` at commit 32d3f44, before the renovation (modules moved into subpackages, settings
regrouped, curvature approximations turned into classes, loops unified). ``tests/test_references.py``
recomputes every case with the functions below and demands the same numbers, ids and facts.

Regenerate (``python -m tests.references.make_references``) ONLY when a change is MEANT to change
numbers (a fix, a new default), and say so — which case, which numbers, why — in the commit message.
A refactoring that needs new references is not a refactoring.

Rules that keep these cases useful across the renovation:

- Only public names: ``import lightning_influence as li`` (``li.fit_factors``, ``li.compute_influence``,
  ``li.compute_self_influence``, ``li.InfluenceCallback``, ``li.load_results``, ``li.load_factors``,
  the tasks) and public attributes of what they return (``Factors.layers``/``strategy``/``layer_names``,
  ``InfluenceResult.get``/``meta``/``step``, ``InfluenceCallback.statistics``).
- Every setting keyword argument lives in the ``*_SETTINGS`` dicts below: when settings move into
  groups, change those dicts (one spot), never the numbers.
- Cases are seeded, CPU, float64 models where the helpers offer them, and run on one thread
  (:func:`one_thread`) so that sums do not depend on the machine's core count.
- Eigenvectors are sign-ambiguous, so factors are recorded through sign-invariant quantities only:
  eigenvalues, and the dense curvature block each layer's factors stand for
  (``(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` for EK-FAC, the covariances ``Q diag(eig) Qᵀ`` for K-FAC).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

import lightning_influence as li

Case = Tuple[Dict[str, torch.Tensor], Dict[str, Any]]  # (tensors, JSON-able facts)

# -- settings: the only place naming setting keyword arguments ------------------------------------------
# Offline API: the factor fits (name -> fit_factors kwargs; "true" is fit_factors' default Fisher,
# "exact" exact Gauss-Newton, offline only), then the scorings (name, fit, compute_influence kwargs).
OFFLINE_FITS: Dict[str, Dict[str, Any]] = {
    "ekfac_true": dict(strategy="ekfac", fisher="true", batch_size=16, seed=0),
    "ekfac_empirical": dict(strategy="ekfac", fisher="empirical", batch_size=16),
    "ekfac_exact": dict(strategy="ekfac", fisher="exact", batch_size=16),
    "kfac_true": dict(strategy="kfac", fisher="true", batch_size=16, seed=0),
    "kfac_empirical": dict(strategy="kfac", fisher="empirical", batch_size=16),
    "diagonal_true": dict(strategy="diagonal", fisher="true", batch_size=16, seed=0),
    "diagonal_empirical": dict(strategy="diagonal", fisher="empirical", batch_size=16),
    "identity": dict(strategy="identity", batch_size=16),
}
OFFLINE_SCORINGS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("ekfac_true", "ekfac_true", dict(per_layer=True)),
    ("ekfac_empirical", "ekfac_empirical", dict()),
    ("ekfac_exact", "ekfac_exact", dict()),
    ("ekfac_rank2", "ekfac_true", dict(per_layer=True, query_rank=2)),
    ("ekfac_rank2_exact_truncation", "ekfac_true", dict(query_rank=2, query_truncation="exact")),
    ("ekfac_damping", "ekfac_true", dict(damping=0.01)),
    ("kfac_true", "kfac_true", dict(per_layer=True)),
    ("kfac_empirical", "kfac_empirical", dict()),
    ("diagonal_true", "diagonal_true", dict(per_layer=True)),
    ("diagonal_empirical", "diagonal_empirical", dict()),
    ("identity", "identity", dict(per_layer=True)),
]
OFFLINE_SELF_INFLUENCE = "ekfac_true"  # li.compute_self_influence with this fit
REGRESSION_SETTINGS = (dict(strategy="ekfac", fisher="exact", batch_size=16), dict(per_layer=True))

CALLBACK_SETTINGS: Dict[str, Any] = dict(  # li.InfluenceCallback; curvature.refresh etc. at their defaults
    num_queries=4, on_error="raise", curvature=dict(collect_every_n_steps=2), report=dict(mode="off", show_progress=False),
)
CALLBACK_EPOCHS = 2
CALLBACK_TRAINER = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_checkpointing=False, accelerator="cpu", devices=1, deterministic=True)

CAUSAL_LM_SETTINGS = (dict(strategy="ekfac", fisher="true", batch_size=8, seed=0), dict(per_token=True, per_layer=True))

# Result fields recorded when present (InfluenceResult.get), and the callback result meta that must
# not change: no timings, paths, run ids, config hashes, dates or versions.
RESULT_FIELDS = ("scores", "train_ids", "query_ids", "layer_scores", "layer_abs_sums", "token_scores", "token_mask",
                 "self_scores", "top_ids", "bottom_ids", "top_token_scores", "bottom_token_scores",
                 "top_token_mask", "bottom_token_mask", "top_layer_scores", "bottom_layer_scores")
CALLBACK_META_KEYS = ("n_pool", "n_query", "n_train", "strategy", "fisher", "reasons", "damping", "curvature",
                      "monitors", "steps_collected", "steps_collected_total", "steps_skipped", "tokens_seen",
                      "window", "nonfinite_train_ids", "nonfinite_query_ids", "query_rank", "keep_top_scores",
                      "world_size")
FACTOR_META_KEYS = ("fisher", "layers", "curvature", "tokens_seen", "nonfinite_examples")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- recording helpers --------------------------------------------------------------------------------------
def _dense_block(factors: "li.Factors", name: str) -> Dict[str, torch.Tensor]:
    """Sign-invariant record of one layer's factors (see the module docstring)."""
    parts = factors.layers[name]
    if factors.strategy == "ekfac":
        basis = torch.kron(parts["q_s"].double(), parts["q_a"].double())
        eigenvalues = parts["eigenvalues"].double()
        return {"eigenvalues": eigenvalues, "curvature": basis @ torch.diag(eigenvalues.flatten()) @ basis.T}
    if factors.strategy == "kfac":
        return {"eig_a": parts["eig_a"], "eig_s": parts["eig_s"],
                "cov_a": parts["q_a"] @ torch.diag(parts["eig_a"]) @ parts["q_a"].T,
                "cov_s": parts["q_s"] @ torch.diag(parts["eig_s"]) @ parts["q_s"].T}
    return {key: value for key, value in parts.items()}  # diagonal: eigenvalues; identity: nothing


def factor_tensors(factors: "li.Factors", prefix: str) -> Dict[str, torch.Tensor]:
    return {f"{prefix}/factors/{name}/{key}": value for name in factors.layer_names
            for key, value in _dense_block(factors, name).items()}


def factor_facts(factors: "li.Factors") -> Dict[str, Any]:
    return {"strategy": factors.strategy, "layer_names": list(factors.layer_names),
            "meta": {key: factors.meta[key] for key in FACTOR_META_KEYS if key in factors.meta}}


def result_tensors(result: "li.InfluenceResult", prefix: str) -> Dict[str, torch.Tensor]:
    out = {}
    for field in RESULT_FIELDS:
        value = result.get(field)
        if value is not None:
            out[f"{prefix}/{field}"] = value
    return out


# -- case a: the offline API on a tiny MLP ---------------------------------------------------------------
def offline_mlp() -> Case:
    """``li.fit_factors`` + ``li.compute_influence`` for every strategy and Fisher, per-layer and
    rank-r queries, ``li.compute_self_influence``; plus a regression model with the exact Fisher."""
    from tests.tiny_models import classification_data, mlp, regression_data

    tensors: Dict[str, torch.Tensor] = {}
    facts: Dict[str, Any] = {}
    with one_thread():
        torch.manual_seed(0)
        model = mlp(d_in=4, hidden=6, d_out=3)  # float64
        train = classification_data(n=40, d_in=4, classes=3, seed=0)
        queries = classification_data(n=5, d_in=4, classes=3, seed=1)
        task = li.ClassificationTask()
        fitted = {name: li.fit_factors(model, task, train, **kwargs) for name, kwargs in OFFLINE_FITS.items()}
        for name, factors in fitted.items():
            tensors.update(factor_tensors(factors, f"fit={name}"))
            facts[f"fit={name}"] = factor_facts(factors)
        for name, fit, score_kwargs in OFFLINE_SCORINGS:
            result = li.compute_influence(model, task, train, queries, factors=fitted[fit], **score_kwargs)
            tensors.update(result_tensors(result, name))
            facts[name] = {"layer_names": list(result.layer_names), "damping": result.meta.get("damping")}
        tensors[f"fit={OFFLINE_SELF_INFLUENCE}/self_influence"] = li.compute_self_influence(
            model, task, train, fitted[OFFLINE_SELF_INFLUENCE])

        torch.manual_seed(1)
        regressor = mlp(d_in=4, hidden=5, d_out=3)
        rtrain, rqueries = regression_data(n=24, seed=2), regression_data(n=3, seed=3)
        fit_kwargs, score_kwargs = REGRESSION_SETTINGS
        factors = li.fit_factors(regressor, li.RegressionTask(), rtrain, **fit_kwargs)
        result = li.compute_influence(regressor, li.RegressionTask(), rtrain, rqueries, factors=factors, **score_kwargs)
        tensors.update(result_tensors(result, "regression"))
        tensors.update(factor_tensors(factors, "regression"))
        facts["regression"] = {"layer_names": list(result.layer_names), "factors": factor_facts(factors),
                               "damping": result.meta.get("damping")}
    return tensors, facts


# -- case b (+ d): the Lightning callback for two epochs --------------------------------------------------
def callback_run() -> Case:
    """``li.InfluenceCallback`` (default curvature settings) on the tiny blob classifier for two
    epochs: every result as saved on disk (``li.load_results``), its saved factors
    (``li.load_factors``), and the callback's covariance statistics after every training step."""
    import pytorch_lightning as pl

    from tests.callback_models import make_datamodule_class, make_module_class, planted_data

    class StatisticsProbe(pl.Callback):  # after the influence callback: sees each step's committed sums
        def __init__(self, influence) -> None:
            self.influence, self.snapshots = influence, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            statistics = self.influence.statistics
            self.snapshots.append({key: value.clone() for key, value in statistics.state_dict().items()})

    tensors: Dict[str, torch.Tensor] = {}
    facts: Dict[str, Any] = {}
    with one_thread(), tempfile.TemporaryDirectory(prefix="li-refs-") as tmp:
        pl.seed_everything(0, verbose=False)
        train, val, planted = planted_data()
        model = make_module_class(pl)(hidden=8)
        data = make_datamodule_class(pl)(train, val)
        output_dir = Path(tmp) / "influence"
        influence = li.InfluenceCallback(task=li.ClassificationTask(), output_dir=str(output_dir), **CALLBACK_SETTINGS)
        probe = StatisticsProbe(influence)
        trainer = pl.Trainer(callbacks=[influence, probe], max_epochs=CALLBACK_EPOCHS, default_root_dir=tmp,
                             **CALLBACK_TRAINER)
        trainer.fit(model, data)

        results = li.load_results(output_dir)
        facts["planted"] = planted
        facts["steps"] = [r.step for r in results]
        facts["in_memory_steps"] = [r.step for r in influence.results]
        facts["steps_skipped"] = influence.steps_skipped
        facts["results"] = []
        for result in results:
            prefix = f"step={result.step}"
            tensors.update(result_tensors(result, prefix))
            factors = li.load_factors(Path(result.path) / "factors")
            tensors.update(factor_tensors(factors, prefix))
            facts["results"].append({
                "step": result.step, "epoch": result.epoch, "layer_names": list(result.layer_names),
                "meta": {key: result.meta[key] for key in CALLBACK_META_KEYS if key in result.meta},
                "factors": factor_facts(factors),
            })
        for step, snapshot in enumerate(probe.snapshots, 1):
            for key, value in snapshot.items():
                tensors[f"statistics/step={step}/{key}"] = value
        tensors["final_weights"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return tensors, facts


# -- case c: a tiny GPT-2 with the causal-LM task, per-token scores -------------------------------------
def causal_lm() -> Case:
    """A 2-block GPT-2 (``transformers.GPT2Config``, nothing downloaded) with ``li.CausalLMTask``:
    EK-FAC with the true Fisher on padded token sequences, ``per_token=True``."""
    from tests.hf_models import loader, tiny_gpt2, token_examples

    tensors: Dict[str, torch.Tensor] = {}
    with one_thread():
        model = tiny_gpt2(seed=0).eval()
        train, queries = token_examples(10, seed=0, min_len=7), token_examples(3, seed=1, min_len=7)
        task = li.CausalLMTask()
        fit_kwargs, score_kwargs = CAUSAL_LM_SETTINGS
        factors = li.fit_factors(model, task, loader(train, batch_size=fit_kwargs.get("batch_size", 8)), **fit_kwargs)
        result = li.compute_influence(model, task, loader(train, batch_size=4), loader(queries, batch_size=4),
                                      factors=factors, **score_kwargs)
        tensors.update(result_tensors(result, "gpt2"))
        for name in factors.layer_names:  # GPT-2's EK-FAC eigenvalues are large (200 KB): their marginals
            eigenvalues = factors.layers[name]["eigenvalues"].double()
            tensors[f"gpt2/factors/{name}/eigenvalues_out"] = eigenvalues.sum(1)
            tensors[f"gpt2/factors/{name}/eigenvalues_in"] = eigenvalues.sum(0)
        facts = {"layer_names": list(result.layer_names), "factors": factor_facts(factors),
                 "damping": result.meta.get("damping")}
    return tensors, facts


CASES: Dict[str, Callable[[], Case]] = {"offline_mlp": offline_mlp, "callback": callback_run, "causal_lm": causal_lm}
REFERENCE_DIR = Path(__file__).resolve().parent


def json_safe(value: Any) -> Any:
    """Facts as JSON will give them back (tuples become lists, keys strings, tensors lists)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    return value
