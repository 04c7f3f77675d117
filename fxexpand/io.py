"""Saving and loading models safely.

``fxexpand.save(model, path, factory=...)`` writes a plain dictionary — format tag, the name of a
*model factory*, its keyword arguments, the ``state_dict`` and an example input shape — that loads
with ``torch.load(weights_only=True)``: no code runs while reading it.

``fxexpand.load(path)`` then builds the model by calling the named factory, but only if that name
is on the allow-list:

* ``torchvision:<builder>`` for every torchvision model builder (built with ``weights=None``;
  the weights come from the file), ``timm:<model>`` for every model in timm's registry (built with
  ``timm.create_model(name, pretrained=False)``: nothing is downloaded; needs the optional extra,
  ``pip install 'fxexpand[timm]'``), and ``fxexpand:<model>`` for fxexpand's own models
  (:mod:`fxexpand.demo.models`);
* names registered in this process with :func:`register_factory`;
* names passed in ``allow=`` (the CLI's ``--allow-factory module:function``), which the user
  thereby allows fxexpand to import.

A file naming anything else is refused before anything is imported. An *expanded* model (from
:func:`fxexpand.compile`) is saved with its base model's factory and its pass recipe (registered
pass names and plain keyword arguments); loading rebuilds the base model, re-runs the recipe —
only registered passes, nothing imported by name — and loads the weights. Pickled modules
(``torch.save(module)``) run code when unpickled, so they load only with ``trust_pickle=True``
(CLI: ``--trust-pickle``).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .demo import models as _models
from .api import compile as _compile
from .core import (
    DynamicLayer,
    ExitRecord,
    LoadError,
    ModelFactory,
    Recipe,
    get_record,
    registered_passes,
    set_record,
)

__all__ = ["save", "load", "load_file", "register_factory", "build_model", "allowed_factories", "LoadedModel"]

FORMAT = "fxexpand.model"
VERSION = 1
_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_NAME_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register_factory(name: str, fn: Callable[..., nn.Module]) -> None:
    """Allow ``name`` (``"package:function"`` style) in files loaded in this process."""
    if not _NAME_RE.match(name):
        raise ValueError(f"factory names look like 'package:function', got {name!r}")
    _FACTORIES[name] = fn


def allowed_factories() -> list[str]:
    return sorted(_FACTORIES) + ["torchvision:<any model builder>", "timm:<any timm model>", "fxexpand:SmallNet"]


def _torchvision_builder(name: str) -> Callable[..., nn.Module] | None:
    try:
        # lazy: torchvision.models pulls in torch._dynamo (~2 s); only a torchvision: factory needs it
        import torchvision.models as tvm

        return tvm.get_model_builder(name)
    except Exception:
        return None


TIMM_MISSING = "pip install 'fxexpand[timm]'"


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    """``timm.create_model(name, pretrained=False, **kwargs)``; :class:`LoadError` when timm is
    not installed (naming the extra that installs it) or has no model ``name``."""
    try:
        # lazy: timm is an optional extra, and importing it takes ~4 s; only a timm: factory needs it
        import timm
    except ImportError as e:
        raise LoadError(f"timm:{name} needs timm, which is not installed ({type(e).__name__}: {e}); "
                        f"install the optional extra: {TIMM_MISSING}") from e
    if not timm.is_model(name):
        raise LoadError(f"timm has no model named {name!r} (see timm.list_models())")

    def build(**kwargs: Any) -> nn.Module:
        if kwargs.get("pretrained"):
            raise LoadError(f"timm:{name} is built with pretrained=False (weights come from the file or "
                            "from training); fxexpand never downloads weights")
        kwargs.pop("pretrained", None)
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _resolve(name: str, allow: Iterable[str]) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LoadError(f"the file names an invalid model factory {name!r}")
    if name in _FACTORIES:
        return _FACTORIES[name]
    pkg, fn = name.split(":")
    if pkg == "fxexpand":

        obj = getattr(_models, fn, None)
        if fn not in _models.__all__ or obj is None:
            raise LoadError(f"fxexpand has no built-in model {fn!r}; built-ins: {', '.join(_models.__all__)}")
        return obj
    if pkg == "torchvision":
        builder = _torchvision_builder(fn)
        if builder is None:
            raise LoadError(f"torchvision has no model builder named {fn!r}")
        return lambda **kw: builder(weights=None, **kw)
    if pkg == "timm":
        return _timm_builder(fn)
    if name in set(allow):
        try:
            obj = getattr(importlib.import_module(pkg), fn)
        except Exception as e:
            raise LoadError(f"could not import allowed factory {name}: {type(e).__name__}: {e}") from e
        if not callable(obj):
            raise LoadError(f"allowed factory {name} is not callable")
        return obj
    raise LoadError(
        f"the file asks for model factory {name!r}, which is not on the allow-list, so fxexpand did not "
        f"import or call it. If you trust this file, allow it with --allow-factory {name} (Python: "
        f"fxexpand.load(path, allow=[{name!r}]) or fxexpand.register_factory)."
    )


def build_model(spec: str, *, allow: Iterable[str] = (), **kwargs: Any) -> nn.Module:
    """Build a model from a factory name, e.g. ``build_model("torchvision:mobilenet_v2")`` or
    ``build_model("timm:mobilenetv3_small_100")`` (random weights: ``weights=None`` /
    ``pretrained=False``)."""
    fn = _resolve(spec, allow)
    try:
        model = fn(**kwargs)
    except Exception as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"model factory {spec} failed with arguments {kwargs}: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise LoadError(f"model factory {spec} returned {type(model).__name__}, not an nn.Module")
    set_record(model, ModelFactory(spec, dict(kwargs)))
    return model


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    input_shape: Iterable[int] | None = None,
) -> Path:
    """Write ``model`` as a weights-only file that :func:`load` can rebuild.

    ``factory`` names the function that builds the architecture (see the module docstring);
    models made by :func:`build_model` remember theirs. ``factory_kwargs`` must be plain values
    (numbers, strings, lists, dicts). The file is written atomically.
    """
    if factory is None:
        made_by = get_record(model, ModelFactory)
        if made_by is None:
            raise ValueError("save() needs factory='package:function' (how to rebuild the architecture)")
        factory = made_by.spec
        factory_kwargs = factory_kwargs if factory_kwargs is not None else made_by.kwargs
    if not _NAME_RE.match(factory):
        raise ValueError(f"factory names look like 'package:function', got {factory!r}")
    made_with = get_record(model, Recipe)
    recipe = list(made_with.passes) if made_with is not None else []
    if input_shape is None and (any(isinstance(m, DynamicLayer) for m in model.modules())
                                or get_record(model, ExitRecord) is not None):
        raise ValueError("this model (AugmentWidth / InsertEarlyExits) is rebuilt from its input shape: pass "
                         "input_shape=(batch, channels, ...) to save()")
    if made_with is not None and not made_with.replayable:
        raise ValueError(
            "this expanded model was made with a pass whose arguments cannot be recorded as plain values "
            "(for example a targets predicate or an activation class); use registered passes with plain "
            "arguments (names, numbers, strings) to save it, or save its state_dict yourself"
        )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "factory": factory,
        "kwargs": dict(factory_kwargs or {}),
        "input_shape": None if input_shape is None else [int(d) for d in input_shape],
        "recipe": [[name, kwargs] for name, kwargs in recipe],
        "state_dict": model.state_dict(),
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class LoadedModel:
    """What :func:`load_file` found: the model, where it came from, and an input shape if recorded."""

    def __init__(self, model: nn.Module, source: str, input_shape: list[int] | None):
        self.model, self.source, self.input_shape = model, source, input_shape


def load(path: str | os.PathLike, *, allow: Iterable[str] = (), trust_pickle: bool = False) -> nn.Module:
    """Load a model written by :func:`save` (or, with ``trust_pickle=True``, a pickled module)."""
    return load_file(path, allow=allow, trust_pickle=trust_pickle).model


def load_file(path: str | os.PathLike, *, allow: Iterable[str] = (), trust_pickle: bool = False) -> LoadedModel:
    p = Path(path)
    if not p.exists():
        raise LoadError(f"model file {p} does not exist")
    if p.is_dir():
        raise LoadError(f"{p} is a directory, not a model file")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" not in msg:
            raise LoadError(f"{p} is not a readable model file (corrupt or truncated?): {_short(msg)}") from e
        if not trust_pickle:
            raise LoadError(
                f"{p} contains pickled Python objects (for example a module saved with torch.save(model)); "
                "unpickling runs code named in the file, so fxexpand refuses it by default. If you trust "
                "the file's source, pass --trust-pickle (Python: trust_pickle=True); better, re-save the "
                "model with fxexpand.save(model, path, factory=...), which loads without running code."
            ) from None
        return _load_pickled(p)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise LoadError(f"{p} is not a readable model file (corrupt or truncated?): {type(e).__name__}: "
                        f"{_short(str(e))}") from e
    except Exception as e:  # torch raises assorted types on damaged archives
        raise LoadError(f"{p} could not be read: {type(e).__name__}: {_short(str(e))}") from e
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"] == FORMAT:
        try:
            return _from_payload(p, obj, allow)
        except LoadError:
            raise
        except Exception as e:  # a payload damaged in a way no check below foresaw
            raise LoadError(f"{p} is an fxexpand file with a malformed payload: {type(e).__name__}: "
                            f"{_short(str(e))}") from e
    kind = type(obj).__name__
    hint = ""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = " It looks like a bare state_dict, which does not say which architecture to build."
    raise LoadError(
        f"{p} is a valid torch file but holds a {kind}, not a model.{hint} Save models with "
        "fxexpand.save(model, path, factory=...), or pass a torchvision model name such as "
        "torchvision:mobilenet_v2."
    )


def _load_pickled(p: Path) -> LoadedModel:
    try:
        obj = torch.load(p, weights_only=False, map_location="cpu")
    except Exception as e:
        raise LoadError(f"{p} could not be unpickled: {type(e).__name__}: {_short(str(e))}") from e
    if not isinstance(obj, nn.Module):
        raise LoadError(f"{p} unpickled to a {type(obj).__name__}, not an nn.Module")
    return LoadedModel(obj, f"pickled {type(obj).__name__}", None)


def _from_payload(p: Path, obj: dict, allow: Iterable[str]) -> LoadedModel:
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise LoadError(f"{p} has fxexpand format version {_short(repr(version), 60)}; this fxexpand reads {VERSION}")
    factory, kwargs, sd = obj.get("factory"), obj.get("kwargs"), obj.get("state_dict")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs) or not isinstance(sd, dict):
        raise LoadError(f"{p} is an fxexpand file with a malformed payload (factory arguments or weights "
                        "are not dictionaries keyed by name); re-save the model with fxexpand.save")
    model = build_model(factory, allow=allow, **kwargs)
    recipe = obj.get("recipe")
    if recipe is None:
        recipe = []
    if not isinstance(recipe, list):
        raise LoadError(f"{p} has a malformed pass recipe")
    shape = obj.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)):
        raise LoadError(f"{p} records an invalid input shape {shape!r}")
    if recipe:
        model = _rebuild_expanded(p, model, recipe, shape)
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise LoadError(f"the weights in {p} do not fit {factory}({kwargs}): {_short(str(e))}") from e
    source = factory if not recipe else f"{factory} expanded by {'+'.join(r[0] for r in recipe)}"
    return LoadedModel(model, source, shape)


def _rebuild_expanded(p: Path, model: nn.Module, recipe: Any, shape: list[int] | None = None) -> nn.Module:
    """Re-run the recorded passes (registered passes only, plain keyword arguments), with example
    inputs of the recorded shape when there is one (passes such as AugmentWidth need shapes)."""

    reg = registered_passes()
    passes = []
    if not isinstance(recipe, list):
        raise LoadError(f"{p} has a malformed pass recipe")
    for entry in recipe:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], dict)):
            raise LoadError(f"{p} has a malformed pass recipe entry {entry!r}")
        name, kwargs = entry
        if name not in reg:
            raise LoadError(f"{p} names pass {name!r}, which is not registered in this fxexpand")
        try:
            passes.append(reg[name](**kwargs))
        except Exception as e:
            raise LoadError(f"{p}: pass {name} rejected its recorded arguments {kwargs}: {e}") from e
    try:
        example = None if shape is None else (torch.zeros(shape),)
        return _compile(model, passes=passes, example_inputs=example)
    except Exception as e:
        raise LoadError(f"{p}: re-running the expansion recipe failed: {type(e).__name__}: {e}") from e


def _short(msg: str, n: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[:n] + "..."
