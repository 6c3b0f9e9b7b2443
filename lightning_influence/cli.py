"""The ``lightning-influence`` command: report on results, compare checkpoints, score new queries.

User errors (missing or corrupted files, bad import paths, mismatched results) are printed as one
line ``lightning-influence: error: ...`` with exit status 1; usage errors exit with status 2, as
argparse does. Heavy modules (torch models, plots, the engine) are imported by the commands that
need them, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

PROG = "lightning-influence"

_EPILOG = """\
examples:
  lightning-influence report lightning_logs/version_0/influence
  lightning-influence report runs/influence/step=500 --top-k 5 --html report.html
  lightning-influence compare runs/influence/step=100 runs/influence/step=500
  lightning-influence compare A B --json --k 5 20 > comparison.json
  lightning-influence score --checkpoint last.ckpt --model mypkg.models:Classifier \\
      --train-data mypkg.data:train_set --query-data mypkg.data:new_queries \\
      --factors runs/influence/step=500/factors --task classification --out new_scores
  lightning-influence plan llama --world-size 8 --shard-factors --shard-statistics --query-rank 32

A result is a directory written by InfluenceResult.save (meta.json + tensors.safetensors); a run
directory holds one result per checkpoint as step=<N>/ subdirectories.
"""

class CommandError(Exception):
    """A user error: reported as one line on stderr with exit status 1, never a traceback."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 on user errors, 2 on usage errors.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2): keep main() a plain function
        return exit_.code if isinstance(exit_.code, int) else 0
    from lightning_influence._io import FormatError

    try:
        return args.run(args)
    except (CommandError, FormatError, OSError, ValueError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands (``report``, ``compare``, ``score``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, compare and compute EK-FAC influence results of Lightning runs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report",
        help="summarise one result or a whole run directory (optionally as an HTML file)",
        description="Terminal summary of influence results: the most influential training examples "
        "per query, the power-law tail fit, layer shares and, for a run, the trajectory over checkpoints.",
        epilog="examples:\n  lightning-influence report runs/influence\n"
        "  lightning-influence report runs/influence/step=500 --html report.html --top-k 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("path", type=Path, metavar="PATH", help="a result directory or a run directory")
    report.add_argument("--html", type=Path, metavar="OUT", help="also write a self-contained HTML report")
    report.add_argument("--top-k", type=_positive_int, default=10, metavar="K",
                        help="training examples listed per query and direction (default: 10)")
    report.add_argument("--train-data", metavar="MODULE:CALLABLE",
                        help="training dataset, shown in the HTML tables (a callable returning a Dataset)")
    report.add_argument("--query-data", metavar="MODULE:CALLABLE",
                        help="query dataset, shown in the HTML report above each query")
    report.add_argument("--allow-different-runs", action="store_true",
                        help="report results of different training runs together (refused by default)")
    report.set_defaults(run=_cmd_report)

    compare = commands.add_parser(
        "compare",
        help="compare two results (e.g. two checkpoints of a run)",
        description="Per-query rank correlations, top-k overlap, tail and layer shifts between two "
        "results over the same queries and training examples.",
        epilog="examples:\n  lightning-influence compare runs/influence/step=100 runs/influence/step=500\n"
        "  lightning-influence compare A B --json --k 5 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("a", type=Path, metavar="A", help="the first result directory (e.g. the earlier checkpoint)")
    compare.add_argument("b", type=Path, metavar="B", help="the second result directory")
    compare.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    compare.add_argument("--k", type=_positive_int, nargs="+", default=[1, 5, 10, 50], metavar="K",
                         help="top-k sizes for the overlap measures (default: 1 5 10 50)")
    compare.add_argument("--changes", type=_positive_int, default=10, metavar="N",
                         help="top-k size whose entering/leaving examples are listed (default: 10)")
    compare.add_argument("--allow-different-runs", action="store_true",
                         help="compare results of different training runs (refused by default)")
    compare.set_defaults(run=_cmd_compare)

    score = commands.add_parser(
        "score",
        help="score new queries against a saved checkpoint and its saved factors",
        description="Load a model from a checkpoint and the EK-FAC factors saved with a result, then "
        "score a query dataset against a training dataset. Objects are named by import path "
        "'package.module:Name' (or 'path/to/file.py:Name'); the current directory is importable.",
        epilog="example:\n  lightning-influence score --checkpoint last.ckpt --model mypkg.models:Classifier \\\n"
        "      --train-data mypkg.data:train_set --query-data mypkg.data:new_queries \\\n"
        "      --factors runs/influence/step=500/factors --task classification --out new_scores\n\n"
        "A LightningModule class is restored with Class.load_from_checkpoint; a plain nn.Module class\n"
        "is built without arguments and given the checkpoint's state_dict (a 'model.' prefix is stripped).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="model checkpoint file")
    score.add_argument("--model", required=True, metavar="MODULE:CLASS",
                       help="the model class (a LightningModule or an nn.Module constructible without arguments)")
    score.add_argument("--train-data", required=True, metavar="MODULE:CALLABLE",
                       help="a callable returning the training Dataset to score")
    score.add_argument("--query-data", required=True, metavar="MODULE:CALLABLE",
                       help="a callable returning the query Dataset")
    score.add_argument("--factors", type=Path, required=True, metavar="DIR",
                       help="saved factors directory, or a result directory holding them in factors/")
    score.add_argument("--task", required=True, metavar="TASK",
                       help="classification, regression, causal_lm, or MODULE:TaskClass")
    score.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="where to save the result: a new or empty directory, or an earlier result "
                            "with --overwrite")
    score.add_argument("--overwrite", action="store_true", help="replace a result saved at --out before")
    score.add_argument("--damping", type=_damping, default=None, metavar="F",
                       help="absolute damping, a finite number >= 0 (default: the per-layer heuristic, "
                            "0.1 x mean eigenvalue)")
    score.add_argument("--per-layer", action="store_true", help="also keep per-layer scores")
    score.add_argument("--per-token", action="store_true", help="also keep dense per-token scores")
    score.add_argument("--query-rank", type=_positive_int, default=None, metavar="R",
                       help="compress each query gradient to rank R (default: full rank)")
    score.add_argument("--top-k", type=_positive_int, default=10, metavar="K",
                       help="per query, the most positive / negative examples kept with per-token scores (default: 10)")
    score.add_argument("--self-influence", action="store_true", help="also compute each training example's self-influence")
    score.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="batch size (default: 32)")
    score.add_argument("--device", default="cpu", help="device to score on, e.g. cuda:0 (default: cpu)")
    score.set_defaults(run=_cmd_score)
    _add_plan_command(commands)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _damping(text: str) -> float:
    """A damping the scores can use (see ``check_damping``), refused while parsing the arguments."""
    from lightning_influence.engine.factors import check_damping

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    try:
        return check_damping(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# -- report ------------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    from lightning_influence._format import format_number
    from lightning_influence.analysis.compare import RunAnalysis
    from lightning_influence.results import load_results

    results = load_results(args.path)
    analysis = RunAnalysis(k=args.top_k, allow_different_runs=args.allow_different_runs).extend(results)
    latest, summary = analysis.result, analysis.summary
    out = sys.stdout
    steps = ", ".join(_step_label(r) for r in results)
    out.write(f"Influence report: {args.path}\n")
    out.write(f"{len(results)} checkpoint(s), steps: {steps}\n")
    described = [f"{latest.num_queries} queries x {latest.num_train} training examples",
                 f"{len(latest.layer_names)} layers"]
    described += [f"{key} {latest.meta[key]}" for key in ("strategy", "fisher", "damping")
                  if _is_scalar(latest.meta.get(key)) and latest.meta.get(key) is not None]
    epoch = f", epoch {latest.epoch}" if latest.epoch is not None else ""
    out.write(f"Latest: {_when(latest)}{epoch}: {', '.join(described)}\n")

    _section(out, f"Most influential training examples ({_when(latest)})")
    top = latest.top_k(args.top_k)
    bottom = latest.top_k(args.top_k, largest=False)
    for q in range(latest.num_queries):
        out.write(f"query {int(latest.query_ids[q])}\n")
        rows = [
            [rank + 1, int(top.indices[q, rank]), format_number(top.values[q, rank]),
             int(bottom.indices[q, rank]), format_number(bottom.values[q, rank])]
            for rank in range(top.indices.shape[1])
        ]
        out.write(_indent(format_table(["rank", "top id", "score", "bottom id", "score"], rows)))

    _section(out, "Tail fit (power law on positive scores, tested against log-normal and exponential tails)")
    rows = [[int(latest.query_ids[q])] + ([format_number(v) for v in (f.alpha, f.sigma, f.xmin, f.ks, f.n_tail)]
                                          + [f.label] if f is not None else ["-"] * 6)
            for q, f in enumerate(summary.tail_fits)]
    out.write(format_table(["query", "alpha", "+/- s.e.", "xmin", "KS", "n tail", "tail verdict"], rows))
    scalars = {k: v for k, v in summary.scalars.items() if not k.startswith("layer_share/")}
    out.write(format_table(["statistic", "value"], [[k, format_number(v)] for k, v in scalars.items()]))

    _section(out, "Layer shares (mean over queries)")
    if summary.layer_shares is None or not summary.layer_names:
        out.write("no per-layer scores in this result (compute with per_layer=True)\n")
    else:
        means = [float(x) for x in summary.layer_shares.nanmean(0)]
        rows = [[name, format_number(share), "#" * round(40 * share) if math.isfinite(share) else ""]
                for name, share in zip(summary.layer_names, means)]
        out.write(format_table(["layer", "share", ""], rows))

    traj = analysis.trajectory
    if traj is not None:
        _section(out, "Trajectory over checkpoints")
        columns = [k for k, v in traj.items() if all(_is_scalar(x) for x in v)]
        rows = [[format_number(traj[c][i]) for c in columns] for i in range(len(results))]
        out.write(format_table(columns, rows))

    if args.html is not None:
        from lightning_influence.reporting.html import write_html_report

        train = _load_dataset(args.train_data) if args.train_data else None
        query = _load_dataset(args.query_data) if args.query_data else None
        path = write_html_report(results, args.html, train_dataset=train, query_dataset=query, top_k=args.top_k,
                                 allow_different_runs=args.allow_different_runs)
        out.write(f"\nHTML report written to {path}\n")
    return 0


def _step_label(result: Any) -> str:
    """How a result is named in reports: its training step, or for a result scored offline (no
    step) the checkpoint it was scored from."""
    if result.step is not None:
        return str(result.step)
    checkpoint = result.meta.get("checkpoint") or result.meta.get("checkpoint_path")
    return f"offline ({Path(str(checkpoint)).name})" if checkpoint else "offline"


def _when(result: Any) -> str:
    """``step N``, or for a result scored offline its checkpoint (see :func:`_step_label`)."""
    return f"step {result.step}" if result.step is not None else _step_label(result)


def _section(out, title: str) -> None:
    out.write(f"\n== {title} ==\n")


# -- compare -----------------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    from lightning_influence._io import json_ready
    from lightning_influence.analysis.compare import compare

    a, b = _load_single(args.a), _load_single(args.b)
    comparison = compare(a, b, ks=tuple(args.k), top_k_changes=args.changes,
                         allow_different_runs=args.allow_different_runs)
    if args.json:
        payload = {"a": str(args.a), "b": str(args.b), **comparison.to_dict()}
        json.dump(json_ready(payload), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"A: {args.a} ({_when(a)})\nB: {args.b} ({_when(b)})\n")
        sys.stdout.write(comparison.format_table().rstrip("\n") + "\n")
    return 0


def _load_single(path: Path):
    from lightning_influence.results import load_results

    results = load_results(path)
    if len(results) != 1:
        steps = ", ".join(str(r.path.name) for r in results)
        raise CommandError(f"{path} is a run directory with {len(results)} results ({steps}); pass one of them")
    return results[0]


# -- score -------------------------------------------------------------------------------------


def _cmd_score(args: argparse.Namespace) -> int:
    import lightning_influence as li
    from lightning_influence._io import check_replaceable
    from lightning_influence.results import factors_path, saved_run_id
    from lightning_influence.checkpoint.session import InfluenceSession

    for path, what in ((args.checkpoint, "checkpoint"), (args.factors, "factors directory")):
        if not path.exists():
            raise CommandError(f"{path}: no such {what}")
    check_replaceable(args.out, overwrite=args.overwrite)  # before the work, not after it
    device = _check_device(args.device)
    model = _load_model(args.model, args.checkpoint).to(device)
    task = _load_task(args.task)
    train = _load_dataset(args.train_data)
    query = _load_dataset(args.query_data)
    factors_dir = factors_path(args.factors)
    factors = li.load_factors(factors_dir, device=device)
    try:
        # The run the factors were fitted in (factors saved before run ids: the result holding them).
        run_id = factors.meta.get("run_id") or saved_run_id(factors_dir.parent)
        session = InfluenceSession(
            task, train, query,
            curvature=li.CurvatureConfig(strategy=factors.strategy, fisher=factors.meta.get("fisher"),
                                         damping=args.damping),
            scoring=li.ScoringConfig(query_rank=args.query_rank, top_k=args.top_k, batch_size=args.batch_size),
            show_progress=sys.stderr.isatty(), run_id=run_id)
        result = session.score(model, factors, per_layer=args.per_layer, per_token=args.per_token,
                               self_influence=args.self_influence,
                               meta={"checkpoint": str(args.checkpoint), "factors": str(factors_dir),
                                     "model": args.model})
    except Exception as err:  # noqa: BLE001 - raised by the user's model, task or data: one line, not a traceback
        raise CommandError(f"scoring failed ({type(err).__name__}: {err}); check that --task {args.task} suits "
                           f"the model's outputs and the datasets' examples") from err
    path = result.save(args.out, overwrite=args.overwrite)
    print(f"scored {result.num_queries} queries against {result.num_train} training examples; "
          f"result saved to {path}")
    return 0


def _check_device(name: str) -> Any:
    """The ``--device`` as a ``torch.device``, refused up front when this machine lacks it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CommandError(f"--device {name!r} is not a device name such as cpu or cuda:0 ({err})") from None
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise CommandError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= available:
            raise CommandError(f"--device {name}: this machine has {available} CUDA device(s) "
                               f"(cuda:0 to cuda:{available - 1})")
    return device


def import_object(spec: str) -> Any:
    """The object named by ``"package.module:Name"`` or ``"path/to/file.py:Name"``.

    The current directory is importable, as with ``python -m``. Raises ``CommandError`` with a
    one-line explanation when the module or the name cannot be found.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"{spec!r}: expected an import path 'package.module:Name' or 'file.py:Name'")
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name))
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise CommandError(f"cannot import {module_name!r} from {spec!r}: {err}") from err
        except Exception as err:  # noqa: BLE001 - the user's module failed while running (SyntaxError, ...)
            raise CommandError(f"importing {module_name!r} failed ({type(err).__name__}: {err})") from err
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise CommandError(f"{module_name!r} has no attribute {attr!r}; it defines {names}") from None
    return obj


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise CommandError(f"{path}: no such Python file")
    name = f"_lightning_influence_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failed while running (SyntaxError, ...)
        del sys.modules[name]
        raise CommandError(f"importing {path} failed ({type(err).__name__}: {err})") from err
    return module


def _load_task(name: str) -> Any:
    from lightning_influence.config import BUILTIN_TASKS

    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]()
    if ":" not in name:
        raise CommandError(f"unknown task {name!r}; use one of {sorted(BUILTIN_TASKS)} or 'module:TaskClass'")
    task = import_object(name)
    if not isinstance(task, type):
        return task
    try:
        return task()
    except Exception as err:  # noqa: BLE001 - the user's constructor
        raise CommandError(f"cannot build the task {name} without arguments ({type(err).__name__}: {err}); "
                           "name a Task instance 'module:task_object' instead") from err


def _load_dataset(spec: str) -> Any:
    """Call the named factory (or take the named object) and check that it is a dataset."""
    obj = import_object(spec)
    if callable(obj) and not hasattr(obj, "__getitem__") and not hasattr(obj, "__iter__"):
        try:
            obj = obj()
        except Exception as err:  # noqa: BLE001 - the user's factory failed
            raise CommandError(f"calling {spec!r} failed ({type(err).__name__}: {err})") from err
    # Strings, tuples and mappings index like datasets but are not: (x, y) would be two "examples".
    if isinstance(obj, (str, bytes, tuple, Mapping)) or not (hasattr(obj, "__getitem__") or hasattr(obj, "__iter__")):
        raise CommandError(f"{spec!r} gave a {type(obj).__name__}, not a Dataset or DataLoader "
                           "(for tensors x, y return torch.utils.data.TensorDataset(x, y))")
    return obj


def _load_model(spec: str, checkpoint: Path) -> Any:
    """Restore a model: ``load_from_checkpoint`` for LightningModules, else ``state_dict`` loading."""
    import torch

    cls = import_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise CommandError(f"{spec!r} is not an nn.Module or LightningModule class")
    model = None if hasattr(cls, "load_from_checkpoint") else _construct(spec, cls)
    try:
        if model is None:
            model = cls.load_from_checkpoint(checkpoint, map_location="cpu")
        else:
            model.load_state_dict(_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)))
    except CommandError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupted or mismatched checkpoint raises many kinds of errors
        raise CommandError(f"cannot restore {spec} from {checkpoint} ({type(err).__name__}: {err})") from err
    return model.eval()


def _construct(spec: str, cls: type) -> Any:
    """An instance of a plain ``nn.Module`` class, built without arguments to receive a state dict."""
    try:
        return cls()
    except Exception as err:  # noqa: BLE001 - the user's constructor
        raise CommandError(f"cannot build {spec} without arguments ({type(err).__name__}: {err}); pass a "
                           "LightningModule (restored with load_from_checkpoint) or an nn.Module whose "
                           "constructor needs no arguments") from err


def _state_dict(checkpoint: Any) -> Dict[str, Any]:
    """The weights inside a Lightning checkpoint or a bare state dict, without a ``model.`` prefix."""
    if not isinstance(checkpoint, dict):
        raise CommandError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "model."
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


# -- text tables -------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells: List[List[str]] = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_looks_numeric(row[i]) for row in cells[1:]) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(padded).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text in ("", "-")
    return True


def _indent(text: str, prefix: str = "  ") -> str:
    return "".join(prefix + line + "\n" for line in text.splitlines())


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


# -- plan --------------------------------------------------------------------------------------


def _add_plan_command(commands: Any) -> None:
    """``plan``: per-process memory from a configuration; unset options take the callback's defaults."""
    plan = commands.add_parser(
        "plan",
        help="plan the per-process memory of statistics, factors, queries and scores (no weights, no run)",
        description="Build the model from its configuration on the meta device (no weight memory) and print "
        "the bytes each process would hold. Options left out take the callback's defaults.",
        epilog="examples:\n  lightning-influence plan gpt2 --pool-size 100000\n"
        "  lightning-influence plan path/to/config.json --world-size 16 --shard-factors --query-rank 32\n"
        "  lightning-influence plan llama --set num_hidden_layers=80 --set hidden_size=8192 --world-size 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("config", metavar="CONFIG",
                      help="a Hugging Face config.json (or its directory), or a model type such as gpt2 or llama")
    plan.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                      help="change a configuration value (VALUE read as JSON, else as text); repeatable")
    plan.add_argument("--world-size", type=_positive_int, default=1, metavar="W", help="processes (default: 1)")
    plan.add_argument("--strategy", metavar="NAME", help="ekfac, kfac, diagonal or identity")
    plan.add_argument("--shard-factors", action="store_true", default=None, help="each layer's factors on one process")
    plan.add_argument("--shard-statistics", action="store_true", default=None,
                      help="with --shard-factors, the training-time statistics too")
    for flag, metavar, what in (("--num-queries", "Q", "queries"), ("--query-rank", "R", "rank of the queries"),
                                ("--batch-size", "B", "batch size of the scoring pass"),
                                ("--pool-size", "N", "training examples scored"),
                                ("--keep-top-scores", "M", "scores kept per query and sign")):
        plan.add_argument(flag, type=_positive_int, metavar=metavar, help=what)
    plan.add_argument("--covariance-dtype", metavar="DTYPE", help="float32 or float64")
    plan.add_argument("--eigenbasis-dtype", metavar="DTYPE", help="float64, float32 or bfloat16")
    plan.add_argument("--layers", nargs="+", metavar="PATTERN", help="module names or glob patterns to track")
    plan.add_argument("--exclude", nargs="+", metavar="PATTERN", help="module names or glob patterns to leave out")
    plan.set_defaults(run=_cmd_plan)


def _override(text: str) -> tuple:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cmd_plan(args: argparse.Namespace) -> int:
    from lightning_influence.engine.memory_plan import load_config, plan_memory

    config = load_config(args.config)
    unknown = [key for key, _ in args.overrides if not hasattr(config, key)]
    if unknown:
        raise CommandError(f"--set {unknown[0]}: {type(config).__name__} has no such setting")
    config.update(dict(args.overrides))
    settings = {name: getattr(args, name) for name in (
        "strategy", "shard_factors", "shard_statistics", "num_queries", "query_rank", "batch_size", "pool_size",
        "keep_top_scores", "covariance_dtype", "eigenbasis_dtype", "layers", "exclude") if getattr(args, name) is not None}
    print(plan_memory(config, world_size=args.world_size, **settings))
    return 0
