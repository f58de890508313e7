"""The schema of a trial and of a sweep: one pydantic model per section, the single source of every setting's type,
default, constraint and meaning (docs/design.md, "The config layer"; docs/spec.md is generated from the fields).

    cfg = trial_config(config)          # a resolved trial dict (from Ray Tune, numpy scalars allowed) -> TrialConfig
    cfg.prune.strategy, cfg.finetune.lr # typed access; SpecError lists every problem, one line each
"""

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo

from sweep.config.explain import NULL_TEXT, as_real, error_lines, locate, null_text, python_value, show, unknown_name
from sweep.config.names import LEGACY_METRICS, METRICS, selectable_metrics, tune_metrics
from sweep.config.rules import View, rules
from sweep.errors import InputError
from sweep.zoo.plugin import looks_like_path


class SpecError(InputError):
    """Every problem found in a spec; str() is one line per problem: '<field path>: <what is wrong>; <how to fix>'."""

    def __init__(self, errors: "list[str] | str"):
        lines = [errors] if isinstance(errors, str) else list(errors)
        self.errors = [" ".join(line.splitlines()) for line in lines]
        super().__init__("\n".join(self.errors))


# --- our checks (each raises ValueError('<what>; <fix>'), which pydantic reports as a value_error) ----------------

# 3.0 (a YAML float, or a grid of them) is the whole number 3; 3.5 stays a float, which strict int refuses
Whole = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]


def _registered(names, what: str) -> PlainValidator:
    # Registries are read when a name is checked, not at import time: validating needs only the names, and the
    # registries live in modules that import torch.
    def check(value):
        known = names()
        if value not in known:
            raise ValueError(unknown_name(value, known, what))
        return str(value)
    return PlainValidator(check)


def _strategy_names() -> list:
    from sweep.pruning import STRATEGIES
    return list(STRATEGIES)


def _model_names() -> list:
    from sweep.zoo.models import model_names
    return list(model_names())


def _dataset_names() -> list:
    from sweep.zoo.data import dataset_names
    return list(dataset_names())


def _weights(value):
    if not isinstance(value, str):
        raise ValueError(f"{show(value)} is not text; "  # noqa: TRY004
                         "give a torchvision weights name such as DEFAULT, a checkpoint path, or null")
    if value in NULL_TEXT:
        raise ValueError(null_text(value))
    if not looks_like_path(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"file {str(value)!r} does not exist; give an existing checkpoint file, "
                         "a torchvision weights name such as DEFAULT, or null")
    return str(path.resolve())  # absolute, because Ray runs each trial in its own working directory


def _check(ok: Callable[[Any], Any], problem: str, then: Callable[[Any], Any] = lambda v: v) -> PlainValidator:
    """A check of ours: a value that `ok` refuses is reported as '<value> <problem>'; `then` converts one it takes."""
    def check(value):
        if not ok(value):
            raise ValueError(f"{show(value)} {problem}")
        return then(value)
    return PlainValidator(check)


_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
Factory = Annotated[str, _check(lambda v: isinstance(v, str) and _IMPORT_PATH.fullmatch(v),
                                "is not an import path; write package.module:function, such as mypkg.nets:build")]
SafeName = Annotated[str, _check(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v),
                                 "is not a safe name (it becomes an MLflow experiment and a folder); use letters, "
                                 "digits, - _ . such as my_sweep")]
# whether a folder must exist depends on the dataset: see rules
Folder = Annotated[str, _check(lambda v: isinstance(v, str) and v not in NULL_TEXT, "is not a folder path; write a "
                               "path such as data/cifar10, or null", lambda v: str(Path(v).expanduser().resolve()))]
ModuleNames = Annotated[list, _check(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                                     "is not a list of module names; write e.g. [fc, features.0]", list)]


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, bool, int, float))


def _kwargs(value):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{show(value)} is not a mapping of argument names to values; write e.g. kwargs: {{width: 2}}")
    if not _plain(value):
        raise ValueError(f"{show(value)} holds something other than text, numbers, true/false, null, lists and "
                         "mappings; quote it or pass it another way")
    return dict(value)


def _ratios(value):
    if not isinstance(value, dict):
        raise ValueError(f"{show(value)} is not a mapping; write e.g. ratios: {{layer4.*: 0.7, fc: 0}}")  # noqa: TRY004
    out, problems = {}, []
    for key, ratio in value.items():
        if not isinstance(key, str):
            problems.append(f"{show(key)} is not a module name; write module names or patterns such as layer4.*")
            continue
        try:
            out[key] = as_real(python_value(ratio))
        except ValueError:
            problems.append(f"{show(ratio)} for {show(key)} is not a number; write a fraction such as 0.5")
            continue
        if not 0 <= out[key] < 1:
            problems.append(f"{show(ratio)} for {show(key)} is outside [0, 1); use a fraction such as 0.5")
    if problems:
        raise ValueError("\n".join(problems))
    return out


def _min_channels(value):
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if number and float(value).is_integer() and value >= 1:
        return int(value)
    if not (number and 0 < value < 1):
        raise ValueError(f"{show(value)} is neither a whole number >= 1 nor a fraction in (0, 1); "
                         "use e.g. 1 (channels per layer) or 0.1 (of each layer)")
    return float(value)


def _gpus(number: float) -> float:
    if number > 1 and not number.is_integer():
        raise ValueError(f"{number:g} GPUs cannot be scheduled (only fractions of one GPU are shared); "
                         "use a fraction up to 1 such as 0.25, or a whole number")
    return number


def _metric(value):
    info, old = (METRICS.get(value), LEGACY_METRICS.get(value)) if isinstance(value, str) else (None, None)
    why = "test metrics are never used for selection; use val_accuracy"
    if info is None:
        raise ValueError(f"{show(value)} is the old name of {old}, a test metric: {why}" if old else
                         unknown_name(value, selectable_metrics(), "metric"))
    if not info.selectable:
        raise ValueError(f"{show(value)} is not selectable: {why}")
    if value not in tune_metrics():
        raise ValueError(f"{show(value)} is recorded when a trial ends, so no scheduler or search can read it; pick "
                         f"the winner by it with `sweep report NAME --register MODEL --by {value}`, and use a metric "
                         f"Tune reads, such as val_accuracy or flops_reduction")
    return value


def _strategies(value):
    if not isinstance(value, list):
        raise ValueError(f"{show(value)} is not a list of strategies; write e.g. references: [l1, random]")  # noqa: TRY004
    known, problems = _strategy_names(), []
    for i, name in enumerate(value):
        if name not in known:
            problems.append(unknown_name(name, known, "strategy"))
        elif name in value[:i]:
            problems.append(f"{show(name)} is listed twice; remove the repeat")
    if problems:
        raise ValueError("\n".join(problems))
    return list(value)


# --- the models -------------------------------------------------------------------------------------------------

def _f(default: Any, text: str, *, example: Any = None, what: str | None = None, takes: str | None = None,
       fix: str | None = None, bounds: str | None = None, **constraints: Any) -> Any:
    """A field: its default, its meaning in docs/spec.md and its constraints; for messages and the table, the
    example a fix suggests (else the default), the name its choices go by (`what`), what it takes where the check is
    ours, and a range or a fix worded otherwise than the constraints read."""
    extra = {k: v for k, v in (("takes", takes), ("fix", fix), ("bounds", bounds)) if v is not None} or None
    if isinstance(default, (list, dict)) or (isinstance(default, type) and issubclass(default, BaseModel)):
        factory = default if isinstance(default, type) else type(default)
        return Field(default_factory=factory, description=text, json_schema_extra=extra)
    return Field(default, description=text, title=what, examples=None if example is None else [example],
                 json_schema_extra=extra, **constraints)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_values(cls, data: Any) -> Any:
        if data is None:
            return {}  # a YAML section with every line commented out
        return {k: python_value(v) for k, v in data.items()} if isinstance(data, dict) else data

    @classmethod
    def from_dict(cls, data: dict, where: str = ""):
        """Validate a dict (numpy scalars allowed); SpecError lists every problem as '<where.field>: ...'."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise SpecError(error_lines(error, where, model=cls)[0]) from None


class ModelConfig(Section):
    name: Annotated[str, _registered(_model_names, "model")] | None = _f(
        None, "our zoo (`small_cnn`, `resnet20/32/56/110`, `vgg16_bn_cifar`) or any torchvision classifier; the "
              "head is replaced for the dataset's classes", takes="a name from `sweep models`")
    weights: Annotated[str, PlainValidator(_weights)] | None = _f(
        None, "`null` (random init), a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`) or a local checkpoint "
              "(`.pt/.pth/.th`, loaded with `weights_only=True`)",
        takes="torchvision weights name (`DEFAULT`) or checkpoint path")
    factory: Factory | None = _f(None, "a plug-in instead of `name`: a function returning the `nn.Module`, imported "
                                       "when the trial runs", takes="`package.module:function`")
    kwargs: Annotated[dict, PlainValidator(_kwargs)] = _f({}, "keyword arguments for the model", takes="mapping")


class DatasetConfig(Section):
    name: Annotated[str, _registered(_dataset_names, "dataset")] | None = _f(
        None, "`digits` (offline), `mnist`, `fashion_mnist`, `cifar10`, `cifar100`, `flowers102`, `oxford_pets`, "
              "`imagefolder`", takes="a name from `sweep.zoo.data.dataset_names()`")
    root: Folder | None = _f(
        None, "where the data lives (null: `$SWEEP_DATA`, then `./data`); must exist unless `download`", takes="folder")
    download: bool = _f(False, "download the data when it is missing")
    val_fraction: float = _f(0.1, "share of the training data held out for validation (what selection reads); with "
                                  "validation from test, share of the test split", gt=0, lt=1)
    val_source: Literal["auto", "train", "test"] = _f(
        "auto", "`train`: validation held out of train (or the dataset's own); `test`: carved from test, disjoint "
                "from the images `test_accuracy` reads (for weights trained on this dataset's training images); "
                "`auto`: `test` when the weights declare this dataset (`trained_on`), else `train`",
        what="validation source")
    image_size: Whole | None = _f(None, "resize the model input (null: native)", example=32, ge=1)
    limit: Whole | None = _f(None, "keep at most this many training examples, drawn per class (smoke runs)",
                             example=1000, ge=1)
    test_limit: Whole | None = _f(None, "keep at most this many test examples", example=1000, ge=1)
    factory: Factory | None = _f(None, "a plug-in instead of `name`: a function returning the splits, imported when "
                                       "the trial runs", takes="`package.module:function`")
    kwargs: Annotated[dict, PlainValidator(_kwargs)] = _f({}, "keyword arguments for the dataset", takes="mapping")


class TrainConfig(Section):
    """One training run's settings: the `finetune` section (and, with other defaults, `base`)."""

    epochs: Whole = _f(3, "epochs (0: none)", ge=0)
    lr: float = _f(0.01, "peak learning rate", gt=0)
    batch_size: Whole = _f(64, "batch size", ge=1)
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "optimizer")
    momentum: float = _f(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _f(5e-4, "on weights only, not on BN scales or biases", ge=0)
    warmup_epochs: float = _f(0.0, "linear warm-up, then the schedule below, per step", example=0.5, ge=0)
    lr_schedule: Literal["cosine", "constant"] = _f(
        "cosine", "`cosine`: decay to 0 at the last step; `constant`: hold `lr` (Li et al. 2017 retrain so)",
        what="learning-rate schedule")
    label_smoothing: float = _f(0.0, "label smoothing", example=0.1, ge=0, lt=1)
    amp: bool = _f(True, "bf16 autocast (GPU only)")
    channels_last: bool = _f(True, "channels-last memory layout (GPU only)")


class BaseTrainConfig(TrainConfig):
    """The `base` section: training of the shared base network; only two defaults differ from `finetune`."""

    epochs: Whole = _f(5, "epochs (0: none)", ge=0)
    lr: float = _f(0.05, "peak learning rate", gt=0)


class PruneConfig(Section):
    # `none`: the control arm, and the scratch arm under local scope, whose result no criterion decides (config.arms)
    strategy: Annotated[str, _registered(lambda: [*_strategy_names(), "none"], "strategy")] = _f(
        "l1", "how filters are ranked (`none`: what the `control` arm, and the `scratch` arm under local scope, are "
              "recorded with: no criterion decides them)", takes="a name from `sweep strategies`, or `none`")
    ratio: float = _f(0.5, "share of channels (or FLOPs) to remove", ge=0, lt=1, bounds="(0, 1)",
                      fix="use a fraction such as 0.5", takes="fraction in (0, 1); 0 only with `ratios`")
    ratios: Annotated[dict, PlainValidator(_ratios)] = _f(
        {}, "per-module ratios by name or shell pattern (`layer4.*`), overriding `ratio`; needs scope `local` and "
            "target `channels`", takes="mapping of module name or pattern to a fraction in [0, 1)")
    scope: Literal["local", "global"] = _f(
        "local", "`local`: each layer loses `ratio`; `global`: channels ranked across layers")
    target: Literal["channels", "flops"] = _f(
        "channels", "what `ratio` counts; `flops`: remove until FLOPs fall by `ratio`")
    schedule: Literal["oneshot", "iterative"] = _f(
        "oneshot", "`iterative`: `steps` rounds with one fine-tune epoch between them")
    steps: Whole = _f(1, "pruning rounds (>= 2 with `iterative`)", example=3, ge=1)
    arm: Literal["finetune", "scratch", "control"] = _f(
        "finetune", "`finetune` the pruned network; `scratch`: re-initialise the pruned architecture and train "
                    "it from scratch (Liu et al. 2019), once per ratio under local scope; `control`: fine-tune the "
                    "unpruned base with the same recipe (one trial per seed and recipe, strategy `none`)")
    scratch_epochs: Whole | None = _f(None, "epochs of the `scratch` arm (null: `base.epochs`)", example=30, ge=1)
    min_channels: Annotated[int | float, PlainValidator(_min_channels)] = _f(
        1, "channels every layer keeps: a count or a fraction", takes="integer >= 1, or a fraction in (0, 1)")
    round_to: Whole = _f(1, "round kept widths to a multiple (8 for tensor cores)", example=8, ge=1)
    ignore: ModuleNames = _f(
        [], "modules never pruned (names or shell patterns such as `layer*.conv2`)",
        takes="list of module names or shell patterns")
    calibration_batches: Whole = _f(4, "batches scored by `taylor` and `apoz`", ge=1)
    oracle_batches: Whole = _f(2, "training batches `oracle` measures each unit's loss change on: (units + 1) x "
                                  "this many forward passes per pruning step", ge=1)


class MeasureConfig(Section):
    batch_size: Whole = _f(1, "batch size of the latency measurement", ge=1)
    warmup: Whole = _f(5, "untimed forward passes first", ge=0)
    runs: Whole = _f(30, "timed forward passes; latency is their median", ge=1)
    threads: Whole = _f(1, "CPU threads latency is measured with (pinned)", ge=1)


class TrialConfig(Section):
    """One trial's settings: what `spec.trial`, `spec.grid_configs()` and Ray Tune's configs hold, as a dict."""

    name: SafeName | None = _f(None, "the sweep: MLflow experiment and folder name")
    seed: Whole = _f(0, "seeds data splits, init, shuffling and pruning", ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "`auto`: cuda when available")
    model: ModelConfig = _f(ModelConfig, "the network")
    dataset: DatasetConfig = _f(DatasetConfig, "the data")
    base: BaseTrainConfig = _f(BaseTrainConfig, "training of the shared base network")
    prune: PruneConfig = _f(PruneConfig, "pruning")
    finetune: TrainConfig = _f(TrainConfig, "fine-tune after pruning")
    measure: MeasureConfig = _f(MeasureConfig, "latency measurement")

    @model_validator(mode="after")
    def _across_fields(self, info: ValidationInfo):
        if not (info.context or {}).get("spec"):  # a sweep checks these over every value its space can give
            problems = rules(View(self.model_dump()))
            if problems:
                raise ValueError("\n".join(problems))
        return self


def trial_config(config: dict) -> TrialConfig:
    """A resolved trial dict (spec.grid_configs(), or a Ray Tune config) as a typed TrialConfig; SpecError if bad."""
    return TrialConfig.from_dict(config)


class SearchConfig(Section):
    algorithm: Literal["grid", "random", "optuna"] = _f(
        "grid", "`grid`: every combination once; `random`, `optuna`: `num_samples` draws", what="search algorithm")
    num_samples: Whole | None = _f(None, "trials drawn by `random` and `optuna`", example=20, ge=1)


class SchedulerConfig(Section):
    name: Literal["fifo", "asha"] = _f("fifo", "`asha` stops weak trials early", what="scheduler")
    grace_period: Whole = _f(1, "asha: epochs before a trial may be stopped", ge=1)
    reduction_factor: float = _f(2.0, "asha: keeps 1/factor of the trials", ge=2, fix="use 2 or more, such as 3")
    max_t: Whole | None = _f(None, "asha: the last epoch a trial may be stopped at (null, and at most: the most "
                                   "epochs a trial trains, less one)", example=10, ge=1)


class ResourcesConfig(Section):
    cpu: float = _f(1.0, "CPUs per trial", gt=0)
    gpu: Annotated[float, AfterValidator(_gpus)] = _f(0.0, "GPUs per trial; fractions share a card (`0.25`)",
                                                      example=1, ge=0,
                                                      takes="number >= 0: a fraction up to 1, or whole")
    memory: float | None = _f(None, "GiB of memory per trial; Ray schedules by it", example=4, gt=0)


# What a verdict may compare: accuracies, because the equivalence margin is in accuracy points. Test metrics are
# allowed here (a verdict is not a selection); selection still reads only the spec's `metric`.
REPORT_METRICS = ("test_accuracy", "test_top5", "pruned_test_accuracy", "val_accuracy", "pruned_val_accuracy")


class ReportConfig(Section):
    """The `report` section: the comparisons a sweep declares before it runs, and how its verdicts are decided."""

    references: Annotated[list, PlainValidator(_strategies)] = _f(
        [], "strategies every other one is compared with (`[]`: all pairs)",
        takes="list of names from `sweep strategies`")
    family: Literal["references", "all_pairs"] | None = _f(
        None, "the comparisons corrected together: `references` (each strategy against each reference) or "
              "`all_pairs` (null: `references` when there are references, else `all_pairs`)")
    alpha: float = _f(0.05, "the family's error rate", gt=0, lt=0.5)
    correction: Literal["holm", "bh", "none"] = _f(
        "holm", "`holm` (family-wise), `bh` (Benjamini-Hochberg, false discovery rate) or `none` (warned)")
    margin: float = _f(1.0, "equivalence margin in accuracy points: a difference shown to lie within ±margin is "
                            "`equivalent`", gt=0, le=100)
    metric: Literal[REPORT_METRICS] = _f("test_accuracy", "the accuracy verdicts compare", what="report metric")

    def resolved_family(self) -> str:
        return self.family or ("references" if self.references else "all_pairs")


def report_rules(report: ReportConfig, where: str = "report.") -> list[str]:
    """Problems across the report section's fields; `where` prefixes the field names (a flag's `--` at report time)."""
    if report.family == "references" and not report.references:
        return [f"{where}family: 'references' compares with the references, and none are listed; list them, such "
                f"as references: [random], or use family: all_pairs"]
    return []


class SweepConfig(TrialConfig):
    """A search-space file: the trial's fixed settings, the space and how the sweep runs."""

    name: SafeName = _f(..., "the sweep: MLflow experiment and folder name", takes="letters, digits, `-` `_` `.`")
    space: Any = _f(None, "what varies between trials (below)", takes="see below")
    search: SearchConfig = _f(SearchConfig, "the search algorithm")
    scheduler: SchedulerConfig = _f(SchedulerConfig, "the trial scheduler")
    resources: ResourcesConfig = _f(ResourcesConfig, "per trial")
    metric: Annotated[str, PlainValidator(_metric)] = _f(
        "val_accuracy", "what the scheduler, the search and `best` read",
        takes="a metric Tune reads each epoch (table below)")
    mode: Literal["max", "min"] | None = _f(None, "`max` or `min` (null: the metric's direction)")
    max_failures: Whole = _f(2, "retries per trial, each from its last checkpoint", ge=0)
    checkpoint_every_s: float = _f(
        10.0, "a trial checkpoints (and writes its epochs to MLflow) each time this many seconds of epochs have "
              "passed, so a retry redoes at most that much; 0: every epoch", ge=0)
    max_concurrent: Whole | None = _f(None, "trials at once (null: as resources allow)", example=2, ge=1)
    max_trials: Whole = _f(10000, "refuse a space with more trials than this", ge=1)
    report: ReportConfig = _f(ReportConfig, "the comparisons `sweep report` makes, declared before the runs")


def check_at(path: str) -> "FieldInfo | type | None":
    """The field of a trial path, the model class of a section path, or None when there is no such path."""
    return locate(TrialConfig, path.split("."))


@functools.cache
def field_adapter(path: str) -> TypeAdapter:
    """A validator of one value of the field at a trial path (a swept item), as strict as the models."""
    field = check_at(path)
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return TypeAdapter(kind, config=Section.model_config)
