"""The tables of docs/spec.md, generated from the schema's fields and sweep.config.names.METRICS
(`python -m sweep.config.reference` rewrites them; tests/test_spec.py compares)."""

from pathlib import Path

from pydantic.fields import FieldInfo

from sweep.config.explain import YAML_WORDS, choices, fields, kind_of, nullable, value_range
from sweep.config.names import METRICS, PARAMS, tune_metrics
from sweep.config.schema import SweepConfig, TrainConfig


def _default(field: FieldInfo) -> str:
    """A field's default as YAML writes it."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, float):
        return f"{value:g}"
    return YAML_WORDS[value] if value is None or isinstance(value, bool) else str(value)


def _takes(field: FieldInfo) -> str:
    """What a field takes, in words, from its type and constraints (or its own words, where the check is ours)."""
    kind = kind_of(field)
    if (field.json_schema_extra or {}).get("takes"):
        text = field.json_schema_extra["takes"]
    elif kind is bool:
        text = "true \\| false"
    elif choices(field):
        text = " \\| ".join(f"`{c}`" for c in choices(field))
    else:
        bounds, upper = value_range(field)
        text = f"integer {bounds}" if kind is int else f"number {'in ' if upper else ''}{bounds}"
    return f"null or {text}" if nullable(field) else text


def reference_markdown() -> str:
    """The table of every search-space setting: path, default, what it takes, what it means."""
    rows = ["| setting | default | takes | meaning |", "|---|---|---|---|"]
    for path, field in fields(SweepConfig):
        section, _, name = path.rpartition(".")
        default, paths = _default(field), f"`{path}`"
        if section == "finetune":
            continue  # base and finetune share their fields, in one row; only two defaults differ
        if section == "base":
            other = _default(TrainConfig.model_fields[name])
            paths += f", `finetune.{name}`"
            default += f" (base), {other} (finetune)" if other != default else ""
        rows.append(f"| {paths} | {default} | {_takes(field)} | {field.description or ''} |")
    keys = ", ".join(f"`{k}`" for k in PARAMS)
    return "\n".join(rows) + (
        "\n\n`space` values: a fixed value, `{grid: [...]}`, `{choice: [...]}`, `{uniform: [a, b]}`, "
        "`{loguniform: [a, b]}`, `{randint: [a, b]}` (both ends included). Keys: the shorthands " + keys +
        ", or any dotted path such as `finetune.lr`. Sweeping `model` or `dataset` with whole sections as items "
        "(`{grid: [small_cnn, {name: resnet20, weights: r20.th}]}`) compares architectures or tasks.\n")


def metrics_markdown() -> str:
    """The table of sweep.config.names.METRICS."""
    rows = ["| metric | meaning | better | unit | recorded | selectable |", "|---|---|---|---|---|---|"]
    tune = tune_metrics()
    for name, info in METRICS.items():
        better = "higher" if info.direction == "max" else "lower"
        selectable = "yes" if name in tune else "`--by` only" if info.selectable else "no"
        rows.append(f"| `{name}` | {info.meaning} | {better} | {info.unit} | {info.when} | {selectable} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # rewrite the tables between the marker comments of docs/spec.md (or the path given)
    import sys

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/spec.md")
    text = path.read_text(encoding="utf-8")
    for name, table in (("schema", reference_markdown()), ("metrics", metrics_markdown())):
        begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
        head, rest = text.split(begin)
        text = head + begin + table + end + rest.split(end, 1)[1]
    path.write_text(text, encoding="utf-8")
