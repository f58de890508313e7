"""`sweep` command line (`sweep --help`; README.md's table of commands): parse, call, print. Bad input is one
`error: ...` line on stderr and exit code 2.

Exit codes: 0 done, 1 a trial failed or something failed while running (first line on screen, traceback in a log
file), 2 bad input found before anything ran, 130 interrupted.
Modules are imported inside the commands: listing names or validating a spec should not pay for starting Ray.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sweep.config.names import METRICS
from sweep.errors import InputError

USER_ERROR = 2
FAILED = 1  # some trial failed after its retries, or something failed while running
INTERRUPTED = 130  # the shell's code for Ctrl-C


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], kind: str, bad: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, refusing text that is not `kind` and values that fail `ok` (`bad`)."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(bad.format(text=text, value=value))
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a whole number; give one such as 2",
                         "{value} is less than 1; give 1 or more")
_positive_float = _checked(float, lambda v: v > 0, "a number; give one such as 15",
                           "{text} is not above 0; give a number of seconds such as 15")
_fraction = _checked(float, lambda v: 0 < v < 1, "a number; give a fraction such as 0.5",
                     "{value:g} is outside (0, 1); give a fraction such as 0.5")
_tolerance = _checked(float, lambda v: 0 <= v < 1, "a number; give a fraction such as 0.01",
                      "{value:g} is outside [0, 1); give a fraction such as 0.01 (one point)")


def _names(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


def _min_channels(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value  # 2 channels, or a fraction such as 0.1


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error.msg}); write an object such as "
                                         "'{\"width\": 8}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write one such as '{{\"width\": 8}}'")
    return value


def _o(*flags: str, **settings: Any) -> tuple[tuple[str, ...], dict]:
    return flags, settings


_TRACKING = _o("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
_SPACE = _o("space", metavar="SPACE.yaml", help="its model, dataset, base and prune settings")
_ANALYSIS = [  # sensitivity's and criteria's
    _o("--batches", type=_positive_int, metavar="N",
       help="held-out batches to measure on (default: the whole validation split)"),
    _o("--experiment", help="MLflow experiment (default: <spec name>.<command>)"),
    _o("--address", help="Ray cluster to join: 'auto' or ray://HOST:PORT (default: local Ray)"), _TRACKING,
    _o("--storage", help="folder holding the spec's shared base models (default ./sweep_results)"),
    _o("--out", default="reports", metavar="DIR", help="output folder (default: reports)")]
# Each command: its help and its options.
_PARSER = {
    "run": ("run a sweep on Ray Tune (only the trials not finished yet)", [
        _o("space", metavar="SPACE.yaml"),
        _o("--address", help="Ray cluster to join: HEAD:6379, 'auto' or ray://HEAD:10001 (default: a local Ray)"),
        _o("--connect-timeout", type=_positive_float, default=15.0, metavar="SECONDS",
           help="give up on an --address that does not answer after this long (default 15)"), _TRACKING,
        _o("--storage", help="Tune state, checkpoints and base models: a folder (default ./sweep_results; on a cluster "
                             "one every node mounts) or object storage such as s3://BUCKET/sweeps"),
        _o("--resume", action="store_true", help="restore the interrupted sweep from --storage"),
        _o("--force", action="store_true", help="rerun trials that already finished"),
        _o("--max-concurrent", type=_positive_int, metavar="N", help="at most N trials at once"),
        _o("--quiet", action="store_true", help="no progress line"),
        _o("--verbose", action="store_true", help="Ray Tune's table of every trial instead of one line")]),
    "validate": ("check search spaces; print every problem", [_o("spaces", nargs="+", metavar="SPACE.yaml")]),
    "report": ("tables and plots of a sweep's finished trials", [
        _o("name", metavar="NAME", help="the sweep name (MLflow experiment)"), _TRACKING,
        _o("--storage", help="the sweep's folder, as given to `sweep run` (default ./sweep_results)"),
        _o("--out", metavar="DIR", help="output folder (default: <storage>/reports, where `sweep run` writes it)"),
        # Which comparisons, and how they are corrected, is the spec's `report:` block, declared before the runs;
        # each of these flags overrides it after the runs, and the report labels what it changed "post hoc".
        _o("--reference", type=_names, metavar="STRATEGY[,...]", help="compare every strategy with these, seed by "
           "seed (post hoc; default: the spec's report.references, else all pairs)"),
        _o("--family", help="references | all_pairs: the comparisons corrected together (post hoc)"),
        _o("--alpha", type=float, help="the family's error rate (post hoc; default 0.05)"),
        _o("--correction", help="holm | bh | none (post hoc; default holm)"),
        _o("--margin", type=float, metavar="POINTS",
           help="equivalence margin in accuracy points (post hoc; default 1)"),
        _o("--plan", type=_positive_float, metavar="DELTA",
           help="also say how many seeds each comparison needs to detect DELTA accuracy points"),
        _o("--runs-csv", metavar="RUNS.csv", help="report from a runs.csv written by an earlier report instead of "
           "MLflow (no plot of layers, nothing logged); NAME is then only the title"),
        _o("--register", metavar="MODEL_NAME",
           help="register the best trial's pruned network in the MLflow Model Registry under this name"),
        _o("--by", default="val_accuracy", metavar="METRIC",
           help="what --register picks the best trial by (default val_accuracy; never a test metric)"),
        _o("--launch", metavar="PARENT_RUN_ID",
           help="--register chooses among this launch's trials only (its parent run id)"),
        _o("--where", metavar="PARAM=VALUE,...",
           help="--register chooses among the trials with these params only, e.g. strategy=l1,ratio=0.5")]),
    "trial": ("run one trial here, without Ray (the first config of the space)", [
        _o("space", metavar="CONFIG.yaml"), _TRACKING,
        _o("--storage", help="folder holding the shared base models (default ./sweep_results)"),
        _o("--force", action="store_true", help="run even if this config already has a FINISHED run; the new run "
           "supersedes it (tag sweep.superseded_by, kept but left out of reports)")]),
    "prune": ("prune one model and show what was removed (no training)", [
        _o("--model", help="a name from `sweep models`"),
        _o("--factory", metavar="PKG.MODULE:FUNCTION",
           help="your own network: a function called with num_classes, in_channels and --kwargs"),
        _o("--spec", metavar="SPACE.yaml", help="the model block of a search space (and, unless given below, its "
           "dataset's classes, channels and size)"),
        _o("--kwargs", type=_json_mapping, metavar="JSON",
           help="keyword arguments for --factory, such as '{\"width\": 8}'"),
        _o("--weights", help="torchvision weights name (such as DEFAULT) or checkpoint path"),
        _o("--num-classes", type=_positive_int, help="(default 10, or the --spec dataset's)"),
        _o("--in-channels", type=_positive_int, help="(default 3, or the --spec dataset's)"),
        _o("--input-size", type=_positive_int, help="input height and width (default 32, or the --spec dataset's)"),
        _o("--strategy", default="l1", help="a name from `sweep strategies` (default l1)"),
        _o("--ratio", type=_fraction, default=0.5, help="fraction of channels or FLOPs to remove"),
        _o("--scope", default="local", help="local (each layer) or global (ranked across layers)"),
        _o("--target", default="channels", help="what --ratio counts: channels or flops"),
        _o("--steps", type=_positive_int, default=1),
        _o("--min-channels", type=_min_channels, default=1, help="per layer: a count or a fraction"),
        _o("--round-to", type=_positive_int, default=1), _o("--seed", type=int, default=0),
        _o("--out", metavar="PRUNED.pt", help="save the pruned model (plan + state_dict)")]),
    "sensitivity": ("prune each layer group alone at several ratios (no fine-tune): accuracy per layer and ratio, "
                    "and a suggested prune block", [
        _SPACE, _o("--ratios", type=lambda text: [_fraction(part) for part in text.split(",") if part.strip()],
                   metavar="R,R,...",
                   help="fractions of each group's filters (default 0.1,0.2,...,0.9)"),
        _o("--strategy", help="which filters go (default: the spec's prune.strategy)"),
        _o("--tolerance", type=_tolerance, default=0.01,
           help="accuracy drop the suggested block tolerates, a fraction (default 0.01)"), *_ANALYSIS]),
    "criteria": ("rank correlation of each strategy's filter scores with the oracle (the loss change when each filter "
                 "is removed), per layer", [
        _SPACE, _o("--strategies", type=_names, metavar="S,S,...",
                   help="strategies to judge (default: all but oracle)"),
        _o("--layers", type=lambda text: _positive_int(text) if text.strip().isdigit() else _names(text),
           metavar="N|NAME,...",
           help="how many layer groups (evenly spread), or their names (default: all)"), *_ANALYSIS]),
    "models": ("list model names and whether the pruner handles each",
               [_o("--names", action="store_true", help="names only, one a line (no pruner check)")]),
    "strategies": ("list pruning strategies", []),
}
NETWORK = ("--model", "--factory", "--spec")  # sweep prune's network: exactly one of them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description="Ray-distributed CNN pruning sweeps, tracked in MLflow.",
                                     allow_abbrev=False)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, options) in _PARSER.items():
        command = commands.add_parser(name, parents=[common], help=text)  # every command takes --debug
        network = command.add_mutually_exclusive_group(required=True) if name == "prune" else command
        for flags, settings in options:
            (network if flags[0] in NETWORK else command).add_argument(*flags, **settings)
    return parser


# --- commands -------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from sweep.config.spec import load_spec
    from sweep.driver.launch import run_sweep

    spec = load_spec(args.space)
    outcome = run_sweep(spec, address=args.address, tracking_uri=args.tracking_uri, storage=args.storage,
                        resume=args.resume, force=args.force, max_concurrent=args.max_concurrent,
                        verbose=0 if args.quiet else 2 if args.verbose else 1, connect_timeout=args.connect_timeout)
    if outcome.parent_run_id is not None:
        _print_ui_links(spec.name, args.tracking_uri)
    return INTERRUPTED if outcome.interrupted else FAILED if outcome.failed else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from sweep.config.spec import SpecError, load_spec
    from sweep.driver.preflight import preflight

    status = 0
    for path in args.spaces:
        try:
            spec = load_spec(path)
            preflight(spec)
        except SpecError as error:
            _print_errors(error.errors, path)
            status = USER_ERROR
            continue
        print(f"ok: {path} ({spec.num_trials()} trials)")  # counted, not built
    return status


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.driver.session import reports_dir
    from sweep.report.summary import write_report

    if args.runs_csv and args.register:
        raise InputError("--register: registers a run of the MLflow store, and --runs-csv reads no store; leave one "
                         "of them out")
    if (args.launch or args.where) and not args.register:
        raise InputError(f"{'--launch' if args.launch else '--where'}: chooses what --register ranks; add "
                         "--register MODEL_NAME, or leave it out")
    if args.register:  # refuse a test metric, an unknown group or unlike validation splits before writing anything
        from sweep.store.registry import candidates, parse_where, register_best  # torch: only when registering

        candidates(args.name, args.by, args.tracking_uri, args.launch, parse_where(args.where))
    out_dir = args.out or reports_dir(args.storage)  # where `sweep run` writes it: one report folder
    paths = write_report(args.name, args.tracking_uri, out_dir=out_dir, reference=args.reference, family=args.family,
                         alpha=args.alpha, correction=args.correction, margin=args.margin, plan=args.plan,
                         runs_csv=args.runs_csv)
    _print_paths(paths)
    if not args.runs_csv:  # a runs.csv names no store to open
        _print_ui_links(args.name, args.tracking_uri)
    if args.register:
        version = register_best(args.name, args.register, by=args.by, tracking_uri=args.tracking_uri,
                                launch=args.launch, where=parse_where(args.where))
        print(f"registered: {version.name} version {version.version} (run {version.run_id}, best {args.by}); "
              f"load it with mlflow.pyfunc.load_model('models:/{version.name}/{version.version}')")
    return 0


def _print_ui_links(name: str, tracking_uri: str | None) -> None:
    from sweep.store.client import resolve_tracking_uri
    from sweep.store.store import Store
    from sweep.store.view import how_to_open

    uri = resolve_tracking_uri(tracking_uri)
    experiment_id = Store(uri).experiment_id(name)
    if experiment_id is not None:
        print("\n".join(how_to_open(uri, experiment_id)))


def trial_threads(resources: dict, environ: dict | None = None) -> int:
    """The torch threads a trial gets under `sweep run`: Ray sets OMP_NUM_THREADS to the trial's whole CPUs (at least
    1) unless the user set it (ray._private.utils.set_omp_num_threads_if_unset). Without it torch takes every core,
    and a trial run alone competes with itself and everything else on the machine."""
    given = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(1, math.floor(resources.get("cpu", 1)))


def epoch_line(metrics: dict, seconds: float) -> str | None:
    """One line per fine-tune epoch as it ends (None for the other reports: the final one, a skipped config)."""
    if "epoch" not in metrics or "trial_status" in metrics:
        return None
    shown = [f"{name} {_number(metrics[name])}" for name, info in METRICS.items()
             if info.when == "epoch" and name != "epoch" and name in metrics
             and not (isinstance(metrics[name], float) and math.isnan(metrics[name]))]
    return f"epoch {_number(metrics['epoch'])}: {', '.join(shown)} ({seconds:.1f} s)\n"


def cmd_trial(args: argparse.Namespace) -> int:
    import torch

    from sweep.config.spec import load_spec
    from sweep.driver.launch import run_one, single_config

    spec = load_spec(args.space)
    _, count = single_config(spec)
    if count > 1:
        print(f"note: the space holds {count} trials; running the first (use `sweep run` for all)", file=sys.stderr)
    threads = trial_threads(spec.resources)
    torch.set_num_threads(threads)
    print(f"note: {threads} torch thread{'s' * (threads > 1)}, as a trial gets under `sweep run` (resources.cpu, or "
          "$OMP_NUM_THREADS); the base network trains first (once: later trials reuse it), then each fine-tune epoch "
          "prints a line", file=sys.stderr)
    started = time.monotonic()

    def on_report(metrics: dict, checkpoint: str | None) -> None:
        print(epoch_line(metrics, time.monotonic() - started) or "", end="", flush=True)  # a pipe must see it now

    metrics = run_one(spec, tracking_uri=args.tracking_uri, storage=args.storage, on_report=on_report,
                      force=args.force)
    if metrics.get("skipped"):
        print("this config already has a FINISHED run (--force runs it again); its recorded metrics:")
    width = max(map(len, metrics), default=0)
    for name, value in metrics.items():
        if name != "skipped":
            print(f"{name:<{width}}  {_number(value)}")
    return 0


_FLAGS = {"model.name": "--model", "model.factory": "--factory", "model.kwargs": "--kwargs",
          "model.weights": "--weights"}


def _flag(field: str) -> str:
    """A model field as the flag that sets it: model.weights -> --weights, model.kwargs.name -> --kwargs.name, and
    'model.factory:' (the field given a value) -> --factory."""
    section = ".".join(field.split(".")[:2]).removesuffix(":")
    return _FLAGS[section] + field[len(section):].removesuffix(":") if section in _FLAGS else field


def _prune_network(args: argparse.Namespace) -> tuple[dict, tuple[int, int, int], Any]:
    """The model block to build (name, weights, factory, kwargs), the (classes, channels, side) it is built for where
    the flags leave them out, and the data to score channels on: a --spec's own model and dataset (its splits), or 10
    classes of 3x32x32 images (None: no data)."""
    if args.kwargs and not args.factory:
        raise InputError("--kwargs: only a --factory takes keyword arguments; remove --kwargs or give --factory")
    if not args.spec:
        block = {"name": args.model, "weights": args.weights, "factory": args.factory, "kwargs": args.kwargs}
        return block, (10, 3, 32), None
    from sweep.config.spec import load_spec
    from sweep.zoo.data import DataError, load_dataset

    spec = load_spec(args.spec)
    swept = sorted(p for p in spec.space if p.split(".")[0] in ("model", "dataset"))
    if swept:
        raise InputError(f"--spec: {args.spec} sweeps {', '.join(swept)}; give one network with --model or "
                         "--factory instead")
    block = {**spec.trial["model"], **({"weights": args.weights} if args.weights else {})}
    if args.num_classes and args.in_channels and args.input_size:
        return block, (args.num_classes, args.in_channels, args.input_size), None
    data = spec.trial["dataset"]
    try:
        splits = load_dataset(data["name"], root=data["root"], image_size=data["image_size"], limit=data["limit"],
                              factory=data["factory"], kwargs=data["kwargs"])
    except DataError as error:
        raise InputError(f"--spec: its dataset does not load here ({error}); give --num-classes, --in-channels "
                         "and --input-size instead") from None
    return block, (splits.num_classes, splits.in_channels, splits.image_size), splits


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from sweep.pruning import NEEDS_CALIBRATION, PruningError, prune, save_pruned
    from sweep.worker.measure import count_flops, count_params
    from sweep.zoo.batching import batches
    from sweep.zoo.models import ModelError, build_model

    block, shape, splits = _prune_network(args)
    if splits is not None and (args.num_classes, args.in_channels, args.input_size) != (None, None, None):
        splits = None  # the flags build the network for other inputs than the spec's data
    args.num_classes, args.in_channels, args.input_size = (given or found for given, found in zip(
        (args.num_classes, args.in_channels, args.input_size), shape))
    try:
        model = build_model(block["name"], args.num_classes, block["weights"], args.in_channels,
                            factory=block["factory"], kwargs=block["kwargs"]).eval()
    except ModelError as error:  # its fields are a spec's: name this command's flags instead, unless --spec
        raise InputError(str(error) if args.spec else error.named(_flag)) from None
    example = torch.randn(1, args.in_channels, args.input_size, args.input_size)
    calibration = None
    if args.strategy in NEEDS_CALIBRATION and splits is not None:  # the spec's training images, as a trial scores
        calibration = list(itertools.islice(batches(splits.train, 32, True, seed=args.seed), 2))
    elif args.strategy in NEEDS_CALIBRATION:
        # No dataset here: score on random inputs so the command still shows the mechanics. Sweeps use real data.
        print(f"note: {args.strategy} scores channels with data; using random inputs (run `sweep trial` for "
              "scores from a dataset, or --spec SPACE.yaml)", file=sys.stderr)
        g = torch.Generator().manual_seed(args.seed)
        shape = (8, args.in_channels, args.input_size, args.input_size)
        calibration = [(torch.randn(shape, generator=g), torch.randint(args.num_classes, (8,), generator=g))
                       for _ in range(2)]
    try:  # here the pruner's arguments and the model are the user's input
        result = prune(model, example, strategy=args.strategy, ratio=args.ratio, scope=args.scope,
                       target=args.target, calibration=calibration, min_channels=args.min_channels,
                       round_to=args.round_to, steps=args.steps, seed=args.seed)
    except PruningError as exc:
        try:  # the network itself fails at this size: name the flag that sets it, with the network's own error
            with torch.no_grad():
                model(example)
        except Exception as error:
            why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            side, network = args.input_size, args.model or args.factory or block["name"] or block["factory"]
            raise InputError(f"--input-size: {network} does not run at {side}x{side} ({why}); pass the size it "
                             "expects, e.g. --input-size 224") from None
        raise InputError(str(exc)) from None

    rows = result.plan.channel_counts(model)
    width = max([len("layer"), *(len(r[0]) for r in rows)])
    print(f"{'layer':<{width}}  {'type':<6}  {'before':>6}  {'after':>6}")
    for name, kind, before, after in rows:
        print(f"{name:<{width}}  {kind:<6}  {before:>6}  {after:>6}")
    pruned = result.model.eval()
    for what, count in (("FLOPs", count_flops), ("params", lambda m, x: count_params(m))):
        before, after = count(model, example), count(pruned, example)
        print(f"{what}: {before:,} -> {after:,} (-{100 * (1 - after / before):.1f}%)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_pruned(args.out, pruned, result.plan)
        print(f"saved: {args.out}")
    return 0


def _print_paths(paths: dict) -> None:
    print(Path(paths["summary"]).read_text(encoding="utf-8"))
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sweep.analysis.sensitivity import run_sensitivity
    from sweep.config.spec import load_spec

    outcome = run_sensitivity(load_spec(args.space), ratios=args.ratios, strategy=args.strategy,
                              tolerance=args.tolerance, tracking_uri=args.tracking_uri, storage=args.storage,
                              address=args.address, out_dir=args.out, max_batches=args.batches,
                              experiment=args.experiment, spec_path=args.space)
    _print_paths(outcome.paths)
    print(f"{len(outcome.table)} prunes in {outcome.seconds:.1f} s; MLflow experiment {outcome.experiment}")
    return 0


def cmd_criteria(args: argparse.Namespace) -> int:
    from sweep.analysis.criteria_rank import run_criteria
    from sweep.config.spec import load_spec

    outcome = run_criteria(load_spec(args.space), strategies=args.strategies, layers=args.layers,
                           tracking_uri=args.tracking_uri, storage=args.storage, address=args.address,
                           out_dir=args.out, max_batches=args.batches, experiment=args.experiment,
                           spec_path=args.space)
    _print_paths(outcome.paths)
    print(f"{len(outcome.units)} filters removed one at a time in {outcome.seconds:.1f} s; "
          f"MLflow experiment {outcome.experiment}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sweep.zoo.models import model_names

    if args.names:
        print("\n".join(model_names()))
        return 0
    from sweep.zoo.model_check import pruner_support

    rows = pruner_support()
    width = max(len(name) for name, _, _ in rows)
    print(f"{'model':<{width}}  pruner")
    for name, ok, reason in rows:
        print(f"{name:<{width}}  {'yes' if ok else 'no'}" + (f" ({reason})" if reason else ""))
    handled = sum(ok for _, ok, _ in rows)
    print(f"\n{handled} of {len(rows)} models can be pruned (traced for the pruner at 3x224x224, 32x32 for the CIFAR "
          "zoo; one per family).\nYour own network: model: {factory: 'my_module:build'} in the spec.")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from sweep.pruning import STRATEGIES

    print("\n".join(STRATEGIES))
    return 0


COMMANDS = {
    "run": cmd_run, "validate": cmd_validate, "report": cmd_report, "trial": cmd_trial, "prune": cmd_prune,
    "models": cmd_models, "strategies": cmd_strategies, "sensitivity": cmd_sensitivity, "criteria": cmd_criteria,
}


# --- output and errors ---------------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _print_errors(lines: Sequence[str], source: str | None = None) -> None:
    for line in lines:
        # Problems inside a file name their field; say which file too, unless the line already starts with it.
        where = f"{source}: " if source and not line.startswith(str(source)) else ""
        print(f"error: {where}{' '.join(str(line).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error, which argparse already printed as one line (2)
        return int(done.code or 0)
    from sweep.config.spec import SpecError

    try:
        if args.command in ("run", "trial", "prune"):  # before anything imports torchvision
            from sweep.zoo.torch_pair import torch_pair_problem

            if problem := torch_pair_problem():  # a mismatch is bad input found before anything ran
                raise InputError(problem)
        return COMMANDS[args.command](args)
    except SpecError as error:
        _print_errors(error.errors, getattr(args, "space", None))
        return USER_ERROR
    except InputError as error:  # ModelError, DataError, ReportError: one line naming the field, nothing ran
        _print_errors([str(error) or type(error).__name__])
        return USER_ERROR
    except BrokenPipeError:  # output piped into `head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python docs: no error at exit flush
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # not bad input: a failure while running, or a bug. Keep its traceback.
        if args.debug:
            raise
        lines = [line for line in str(error).splitlines() if line.strip()] or [""]
        # Ray wraps a remote error's whole traceback in its message: its last line says what went wrong.
        first = " ".join(lines[-1 if lines[0].startswith("Traceback") else 0].split())
        handle, log = tempfile.mkstemp(prefix=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(handle, "w", encoding="utf-8") as file:  # the screen gets one line, the file the details
            traceback.print_exception(error, file=file)
        print(f"error: {type(error).__name__}: {first} (traceback in {log}; --debug prints it here)", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
