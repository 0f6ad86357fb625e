"""The named parts a transformer is assembled from, each chosen by one config key.

A *part* is one module file that registers a class under a name (Megatron-core's
``ModuleSpec`` and torchtitan's ``ModelSpec`` in spirit): the position scheme
(``model.position_embedding``), the attention core (``model.attention_core``, or the
adaptive span's), the normalization (``model.normalization``) and the MLP
(``model.activation``). A part owns

- its config keys' validation: ``problems(cfg)`` when it is chosen, and ``requires``:
  keys that mean something only with it (set without it, one error names both keys);
- its parameters and their tensor-parallel sharding (it builds them);
- its training-time behaviour (``training_hooks`` on its modules, see
  :mod:`megatron_lite.hooks`).

A new part is one new file that defines the class and decorates it with its registry's
``register``, plus an import in :mod:`megatron_lite.models` so it registers::

    @POSITIONS.register("rotary")
    class RotaryPositions(PositionScheme): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_lite.config import Config, ConfigError, ModelConfig


class Part:
    """What every registered part declares (class attributes and class methods)."""

    name: str = ""  # set by Registry.register
    # model keys that need this part: {"mem_len": "why"}; a key whose value differs from
    # its default while another part is chosen is an error naming both keys
    requires: dict[str, str] = {}

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        """Settings that cannot work with this part chosen (one message each)."""
        return []

    @classmethod
    def pipeline_refusal(cls, cfg: Config) -> str | None:
        """Why this part cannot run in a pipeline (``parallel.pipeline_parallel_size`` >
        1), or None when it can."""
        return None

    @classmethod
    def resolve(cls, m: ModelConfig) -> None:
        """Write out, in place, what this part's keys imply (called once, after the
        checks pass, by :func:`megatron_lite.resolve.resolve_config`)."""

    @classmethod
    def describe(cls, m: ModelConfig) -> str:
        """One line announcing this part when a run starts with it chosen (what it is,
        its settings), or ``""`` for a default that needs no word (GPT-2's own parts)."""
        return ""


class Registry:
    """Parts of one kind by name, chosen by the config key ``key`` (``model.x``)."""

    def __init__(self, key: str, what: str, choose: Callable[[ModelConfig], str] | None = None):
        self.key, self.what = key, what
        self._choose = choose or (lambda m: getattr(m, key.split(".", 1)[1]))
        self._parts: dict[str, type] = {}

    def register(self, *names: str) -> Callable[[type], type]:
        """Class decorator: the part answers to ``names`` (its ``name`` is the first)."""

        def add(cls: type) -> type:
            for name in names:
                if name in self._parts:
                    raise ValueError(f"{self.what} {name!r} is registered twice")
                self._parts[name] = cls
            if not cls.__dict__.get("name"):
                cls.name = names[0]
            return cls

        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._parts)

    def chosen_name(self, m: ModelConfig) -> str:
        return self._choose(m)

    def get(self, name: str) -> Any:
        """The part registered as ``name``; an unknown name is one :class:`ConfigError`."""
        if name not in self._parts:
            raise ConfigError(f"{self.key}={name!r} is not one of {', '.join(self._parts)}")
        return self._parts[name]

    def of(self, m: ModelConfig) -> Any:
        """The part this model config chooses."""
        return self.get(self.chosen_name(m))

    def problems(self, cfg: Config) -> list[str]:
        """The chosen part's problems, and keys of unchosen parts that were set."""
        name = self.chosen_name(cfg.model)
        if name not in self._parts:
            return [f"{self.key}={name!r} is not one of {', '.join(self._parts)}"]
        chosen, problems = self._parts[name], []
        defaults = ModelConfig()
        for part in dict.fromkeys(self._parts.values()):
            if part is chosen:
                continue
            for key, why in part.requires.items():
                value = getattr(cfg.model, key)
                if value != getattr(defaults, key) and key not in chosen.requires:
                    problems.append(f"model.{key}={value} needs {self.key}={part.name}"
                                    f"{f' ({why})' if why else ''}")
        if cfg.parallel.pipeline_parallel_size > 1 and (why := chosen.pipeline_refusal(cfg)):
            problems.append(f"{self.key}={name} refuses parallel.pipeline_parallel_size="
                            f"{cfg.parallel.pipeline_parallel_size} ({why})")
        return problems + chosen.problems(cfg)


def _core_name(m: ModelConfig) -> str:
    return "adaptive_span" if m.adaptive_span else m.attention_core


POSITIONS = Registry("model.position_embedding", "position scheme")
ATTENTION_CORES = Registry("model.attention_core", "attention core", _core_name)
NORMS = Registry("model.normalization", "normalization")
MLPS = Registry("model.activation", "MLP")
REGISTRIES = (POSITIONS, ATTENTION_CORES, NORMS, MLPS)


def model_problems(cfg: Config) -> list[str]:
    """Every registry's problems with ``cfg`` (its parts' own checks)."""
    return [p for registry in REGISTRIES for p in registry.problems(cfg)]


def describe_parts(m: ModelConfig) -> list[str]:
    """The chosen parts' start lines (:meth:`Part.describe`), the silent ones left out."""
    return [line for registry in REGISTRIES if (line := registry.of(m).describe(m))]


def resolve_parts(m: ModelConfig) -> None:
    """Each chosen part writes out what its keys imply (:meth:`Part.resolve`)."""
    for registry in REGISTRIES:
        registry.of(m).resolve(m)
