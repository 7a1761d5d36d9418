"""[driver] Spark ML Params from one declarative table per class.

Each class lists its parameters once, as ``ParamSpec`` rows; :func:`with_params` turns the
table into Spark ``Param`` attributes, ``getXxx()`` / ``setXxx()`` methods, a keyword-only
``__init__`` signature and :meth:`TableParams.describe`. Adding a parameter is one row (plus
reading it where it is used: ``self.get("name")``). Parameter names are the snake_case
constructor keywords; getters and setters are camel-cased (``learning_rate`` →
``getLearningRate``). Values are checked by the config dataclasses they feed
(:meth:`TableParams.config`), so a bad value raises ``ConfigError`` naming the parameter on
construction and on every setter (which then leaves the old value in place).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyspark.ml.param import Param, Params

from sparkdl.errors import ConfigError

__all__ = [
    "REQUIRED",
    "ParamSpec",
    "TableParams",
    "with_params",
    "as_dict",
    "as_list",
    "json_friendly",
]

T = TypeVar("T", bound="TableParams")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a parameter that the caller must set (no default value)."""


def as_list(value: Any) -> Any:
    """Sequences (not strings) → list; anything else unchanged (and caught by validation)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def as_dict(value: Any) -> Any:
    """None → {}; mappings → a plain dict copy; anything else unchanged."""
    if value is None:
        return {}
    return dict(value) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, default, documentation and where its value goes."""

    name: str
    default: Any
    doc: str
    section: str | None = None
    """The config object the value feeds ("model", "optim", "sync", "checkpoint"), or None."""
    field: str | None = None
    """The field of that config object (default: ``name``)."""
    convert: Callable[[Any], Any] | None = None
    """Normalises a value before it is stored (e.g. tuple → list); never raises."""

    @property
    def camel(self) -> str:
        return "".join(part[:1].upper() + part[1:] for part in self.name.split("_"))


def json_friendly(value: Any) -> Any:
    """A JSON-friendly description of a value (callables and modules by name)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [json_friendly(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_friendly(v) for k, v in value.items()}
    return getattr(value, "__qualname__", None) or type(value).__name__


class TableParams(Params):
    """Params whose table (``_param_specs``) gives defaults, conversion and validation."""

    _param_specs: tuple[ParamSpec, ...] = ()
    _describe_sections: tuple[str, ...] = ()

    def _init_params(self, kwargs: dict[str, Any], *, require: bool = True) -> None:
        """Spark's Params init, the table's defaults, then ``kwargs`` (checked)."""
        Params.__init__(self)
        defaults = {s.name: s.default for s in self._param_specs if s.default is not REQUIRED}
        self._setDefault(**{n: self._converted(self._spec(n), v) for n, v in defaults.items()})
        self._assign(kwargs)
        if not require:
            return
        missing = [s.name for s in self._param_specs if not self.isDefined(s.name)]
        if missing:
            raise ConfigError(
                f"{missing[0]} must be set, got nothing. Pass {missing[0]}=... to "
                f"{type(self).__name__} (required: {missing})"
            )
        self._validate()

    @classmethod
    def _blank(cls: type[T]) -> T:
        """An instance with defaults only, for readers that set the saved values next."""
        instance = cls.__new__(cls)
        instance._init_state()
        TableParams._init_params(instance, {}, require=False)
        return instance

    def _init_state(self) -> None:
        """Non-Param state (overridden by classes that have some)."""

    def _spec(self, name: str) -> ParamSpec:
        for spec in self._param_specs:
            if spec.name == name:
                return spec
        allowed = sorted(s.name for s in self._param_specs)
        raise ConfigError(
            f"parameter must be one of {allowed}, got {name!r}. Fix the spelling "
            f"({type(self).__name__})"
        )

    @staticmethod
    def _converted(spec: ParamSpec, value: Any) -> Any:
        return spec.convert(value) if spec.convert else value

    def _assign(self, kwargs: Mapping[str, Any]) -> None:
        for name, value in kwargs.items():
            spec = self._spec(name)
            self._paramMap[self.getParam(name)] = self._converted(spec, value)

    def setParams(self: T, **kwargs: Any) -> T:
        """Set several parameters at once; on a ConfigError none of them changes."""
        before = dict(self._paramMap)
        self._assign(kwargs)
        try:
            self._validate()
        except Exception:
            self._paramMap = before
            raise
        return self

    def get(self, name: str) -> Any:
        """The value of parameter ``name`` (set or default)."""
        return self.getOrDefault(name)

    def values(self) -> dict[str, Any]:
        """Every defined parameter's value, in table order."""
        return {s.name: self.get(s.name) for s in self._param_specs if self.isDefined(s.name)}

    def config(self, section: str, cls: Callable[..., Any], **extra: Any) -> Any:
        """``cls(**fields)`` from the parameters of ``section`` (plus ``extra``)."""
        fields = {
            spec.field or spec.name: self.get(spec.name)
            for spec in self._param_specs
            if spec.section == section and self.isDefined(spec.name)
        }
        return cls(**fields, **extra)

    def describe(self) -> dict[str, Any]:
        """The parameters as JSON-friendly data (recorded in run.json); those of a section in
        ``_describe_sections`` nested under it by field name, e.g. ``{"optim": {"loss": ...}}``."""
        out: dict[str, Any] = {}
        for spec in self._param_specs:
            if not self.isDefined(spec.name):
                continue
            value = json_friendly(self.get(spec.name))
            if spec.section in self._describe_sections:
                out.setdefault(spec.section, {})[spec.field or spec.name] = value
            else:
                out[spec.name] = value
        return out

    def _validate(self) -> None:
        """Raise ConfigError for bad values (overridden: build the config objects)."""

    # Persistence hooks (sparkdl.ml.persistence): data beyond the Params, none by default.
    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def _save_data(self, root: str) -> None:
        """Write the instance's own files under ``root`` (a URI, through sparkdl.storage)."""

    def _load_data(self, root: str, extra: dict[str, Any], trusted: bool) -> None:
        """Read what _save_data wrote; ``extra`` is _extra_metadata's saved dict."""


def _getter(spec: ParamSpec) -> Callable[[Any], Any]:
    def get(self: TableParams) -> Any:
        return self.getOrDefault(spec.name)

    get.__doc__ = f"``{spec.name}``: {spec.doc}."
    return get


def _setter(spec: ParamSpec) -> Callable[[Any, Any], Any]:
    def set_(self: TableParams, value: Any) -> Any:
        return self.setParams(**{spec.name: value})

    set_.__doc__ = f"Set ``{spec.name}`` ({spec.doc}); returns self. ConfigError on a bad value."
    return set_


def params_table(specs: Sequence[ParamSpec]) -> str:
    """The Params as docstring lines: ``name`` (default): meaning."""
    lines = ["Parameters (keyword arguments; each also has a getXxx/setXxx):", ""]
    for spec in specs:
        default = "required" if spec.default is REQUIRED else f"default {spec.default!r}"
        lines.append(f"    {spec.name} ({default}): {spec.doc}")
    return "\n".join(lines)


def with_params(specs: Sequence[ParamSpec]) -> Callable[[type[T]], type[T]]:
    """Class decorator: the table's Params, getters, setters and the ``__init__`` signature."""

    def decorate(cls: type[T]) -> type[T]:
        cls._param_specs = tuple(specs)
        for spec in specs:
            setattr(cls, spec.name, Param(Params._dummy(), spec.name, spec.doc))
            setattr(cls, f"get{spec.camel}", _getter(spec))
            setattr(cls, f"set{spec.camel}", _setter(spec))
        cls.__doc__ = f"{inspect.cleandoc(cls.__doc__ or '')}\n\n{params_table(specs)}\n"
        init = cls.__dict__.get("__init__")
        if init is not None:
            own = [
                p
                for p in inspect.signature(init).parameters.values()
                if p.kind is not p.VAR_KEYWORD
            ]
            table = [
                inspect.Parameter(
                    s.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if s.default is REQUIRED else s.default,
                )
                for s in specs
                if s.name not in {p.name for p in own}
            ]
            init.__signature__ = inspect.Signature(own + table)  # type: ignore[attr-defined]
        return cls

    return decorate
