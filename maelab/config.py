"""The configuration machinery: dataclass sections -> command-line flags, YAML presets, overrides.

The sections themselves live next to the commands that use them (:mod:`maelab.commands`).

Precedence: dataclass defaults < ``--config file.yaml`` < explicit ``--flag value``. Field names are
unique across sections, so a YAML file may be flat (``epochs: 10``) or sectioned (``optim: {epochs:
10}``), and every field is one ``--flag``. Help texts live next to the fields, in ``metadata``.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Any

import yaml

from maelab.errors import MaelabError, SameOnEveryRank

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (and ``choices=``) next to it: one ``--flag`` of the CLI."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def redefault(section: type, name: str, default: Any) -> Any:
    """``name`` of ``section`` with another default and the same help: a recipe's own number."""
    original = {f.name: f for f in fields(section)}[name]
    return option(default, original.metadata["help"], **{k: v for k, v in original.metadata.items() if k != "help"})


def command_config(name: str, module: str, **sections: type) -> type:
    """A command's config: one field per section (each a dataclass of options, built from its defaults),
    e.g. ``command_config("KnnConfig", __name__, model=EncoderConfig, data=ClassDataConfig, ...)``."""
    cls = dataclasses.make_dataclass(name, [(k, t, field(default_factory=t)) for k, t in sections.items()])
    cls.__module__ = module
    return cls


def _leaf_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Field name -> (section name or None, field) for a config made of sections or flat fields."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            for sub in fields(hints[f.name]):
                out[sub.name] = (f.name, sub)
        else:
            out[f.name] = (None, f)
    return out


def _field_type(cls: type, section: str | None, name: str) -> Any:
    owner = typing.get_type_hints(cls)[section] if section else cls
    return typing.get_type_hints(owner)[name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def is_switch(cls: type, flag: str) -> bool:
    """Whether ``--flag`` of config ``cls`` is an on/off switch (``--flag`` / ``--no-flag``)."""
    leaf = _leaf_fields(cls).get(flag.strip("-").replace("-", "_"))
    return leaf is not None and _unwrap_optional(_field_type(cls, leaf[0], leaf[1].name))[0] is bool


def _coerce(value: Any, tp: Any, name: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise MaelabError(f"{name} needs a value")
    try:
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            seq = value if isinstance(value, (list, tuple)) else [value]
            return [_scalar(v, item) for v in seq]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return _scalar(value, inner)
    except _NotANumber:
        many = isinstance(value, (list, tuple))
        shown = " ".join(str(v) for v in value) if many else str(value)
        raise MaelabError(f"{name} must be {'numbers' if many else 'a number'}, got {shown}") from None
    except (TypeError, ValueError):
        if typing.get_origin(inner) is list:  # `list` alone would not say of what
            what = f"a list of {typing.get_args(inner)[0].__name__}"
        else:
            what = getattr(inner, "__name__", inner)
        raise MaelabError(f"{name}: cannot read {value!r} as {what}") from None


def _scalar(value: Any, tp: type) -> Any:
    """``value`` as a number or string of type ``tp``. Python would read ``true`` as the number 1 (a YAML
    ``batch_size: true`` ran with batch 1) and ``[a, b]`` as the string "['a', 'b']": both are refused."""
    number = tp in (int, float)
    if isinstance(value, (list, tuple, dict)) or (number and isinstance(value, bool)) \
            or (tp is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    out = tp(value)
    if tp is float and out != out:  # NaN passes every range check ("> 0" and "<= 1" alike are False for it
        raise _NotANumber(value)  # only where written as "not x > 0"): a kNN at T=nan scored at chance
    return out


class _NotANumber(ValueError):
    """A float setting given as NaN."""


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per config field (defaults suppressed so only explicit flags override)."""
    parser.add_argument("--config", metavar="YAML", help="YAML preset (a path, or a name in configs/)")
    for name, (section, f) in _leaf_fields(cls).items():
        tp, _ = _unwrap_optional(_field_type(cls, section, name))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{f.metadata.get('help', '')} [default: {default}]"
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, nargs="+", metavar=name.upper(), **kw)
        else:
            parser.add_argument(flag, metavar=name.upper(), **kw)


def resolve_preset(path_or_name: str) -> Path:
    p = Path(path_or_name)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{path_or_name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    if p.expanduser().is_dir():  # (after the presets: a run folder named like one, --out recipe_quick, is no config)
        raise MaelabError(f"config {path_or_name} is a folder: give a YAML file, or a preset's name")
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise MaelabError(f"config {path_or_name!r} not found (presets: {', '.join(names) or 'none'})")


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one without a
    word, so the line a user edited could be the one that is ignored."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                break  # the safe loader's own error names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as e:  # its first line ("while parsing a flow mapping") says neither where nor what
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(str(x) for x in (e.problem, e.context) if x) or str(e).splitlines()[0]
        raise MaelabError(f"cannot read config {path}: {where}{what}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MaelabError(f"cannot read config {path}: {e}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MaelabError(f"config {path} must be a mapping of field: value")
    return data


def _flatten(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    leaves = _leaf_fields(cls)
    sections = {s for s, _ in leaves.values() if s}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in sections and (value is None or isinstance(value, dict)):
            part = _flatten(cls, value or {}, source)  # `optim:` with nothing under it: an empty section
        elif key in leaves:
            part = {key: value}
        elif key in sections:  # `augment: false` of a linprobe preset given to finetune, whose augment is a section
            raise MaelabError(f"config section {key!r} in {source} must hold `field: value` lines, got {value!r} "
                              f"(is it another command's preset?)")
        else:
            raise MaelabError(f"unknown config field {key!r} in {source}; valid fields: {', '.join(leaves)}")
        if twice := sorted(set(part) & set(flat)):
            raise MaelabError(f"config field {twice[0]!r} is given twice in {source} (in two sections?): keep one")
        flat.update(part)
    return flat


def build_config(cls: type, overrides: dict[str, Any] | None = None, yaml_path: str | None = None):
    """Defaults, then the YAML preset, then explicit overrides; every value type-checked."""
    flat: dict[str, Any] = {}
    leaves = _leaf_fields(cls)
    if yaml_path:
        path = resolve_preset(yaml_path)
        flat.update(_flatten(cls, load_yaml(path), str(path)))
        for name, value in flat.items():  # checked here even where a flag overrides it: the preset is broken
            try:                          # for its next use, which the user would meet without the flag
                _coerce(value, _field_type(cls, leaves[name][0], name), name)
            except MaelabError as e:
                raise MaelabError(f"{e} (in {path})") from None
    typed = _flatten(cls, overrides or {}, "the command line")
    flat.update(typed)
    hints = typing.get_type_hints(cls)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, value in flat.items():
        section, _ = leaves[name]
        said = "--" + name.replace("_", "-") if name in typed else name  # as the user wrote it
        value = _coerce(value, _field_type(cls, section, name), said)
        if name in SEED_FIELDS:
            for seed in value if isinstance(value, list) else [value]:
                check_seed(seed, "--" + name.replace("_", "-"))
        (sections.setdefault(section, {}) if section else top)[name] = value
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            top[f.name] = hints[f.name](**sections.get(f.name, {}))
    return cls(**top)


SEED_FIELDS = ("seed", "subset_seed", "seeds")
SEED_LIMIT = 2**63  # torch takes seeds below 2**64 and wraps negative ones onto them (-1 is 2**64 - 1)


def check_seed(value: int | None, flag: str = "--seed") -> None:
    """A seed every generator maelab seeds takes as it is, with ``seed + 1`` (the validation subset's) too."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise SameOnEveryRank(f"{flag} must be a whole number from 0 to 2**63 - 1, got {value} (torch refuses seeds from "
                          f"2**64 on, and reads a negative seed as a large one)")


def config_from_args(cls: type, args: argparse.Namespace):
    leaves = _leaf_fields(cls)
    overrides = {k: v for k, v in vars(args).items() if k in leaves}  # the flags given (defaults are suppressed)
    cfg = build_config(cls, overrides, getattr(args, "config", None))
    cfg.typed_flags = {k: overrides[k] for k in overrides}  # what the user typed (not a setting: not recorded)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
