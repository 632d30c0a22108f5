"""What the CLI's ``--model``, ``--checkpoint``, ``--data`` and ``--loss`` name, loaded.

``--model`` takes one of these forms (:func:`parse_model_spec`):

- ``torchvision:resnet50`` — a torchvision model, random weights;
- ``resnet50`` — a bare name is a torchvision name (what the CLI always took);
- ``timm:efficientnet_b0`` — a timm model, random weights (``pip install 'fxprune[timm]'``);
- ``path/to/file.py:factory`` — ``factory()`` from a Python file;
- ``package.module:factory`` — ``factory()`` from an importable module;
- ``model.pt2`` — a ``torch.export.save``'d ExportedProgram.

A factory returns an ``nn.Module``, an ExportedProgram, or ``(module, input_shape)`` to name its
example input shape. :func:`load_model` builds the model and says which input shape it expects
by default (timm: its pretrained config; ``.pt2``: the program's own example), so the CLI needs
``--input-shape`` only to override it.

Every failure is a :class:`SpecError` whose message says which forms are accepted and what went
wrong (a missing file, no such factory, timm not installed, an unknown name with close matches):
the CLI prints it as a usage error, never as a traceback. This module builds things from user
input only; the pruning library never imports it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_INPUT_SHAPE",
    "MODEL_FORMS",
    "LoadedModel",
    "ModelSpec",
    "SpecError",
    "load_checkpoint",
    "load_data",
    "load_loss",
    "load_model",
    "parse_model_spec",
]

#: the example input when neither the model nor the command line names one (ImageNet-sized)
DEFAULT_INPUT_SHAPE: tuple[int, ...] = (1, 3, 224, 224)

#: the accepted ``--model`` forms, one example each (in every --model error and --help epilog)
MODEL_FORMS: tuple[tuple[str, str], ...] = (
    ("torchvision:resnet50", "a torchvision model, random weights"),
    ("resnet50", "a bare name: a torchvision model (as torchvision:resnet50)"),
    ("timm:efficientnet_b0", "a timm model, random weights; input size from its config"),
    ("path/to/file.py:factory", "factory() from a Python file"),
    ("package.module:factory", "factory() from an importable module"),
    ("model.pt2", "an ExportedProgram written by torch.export.save"),
)

_IDENT = re.compile(r"[A-Za-z_]\w*")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_TIMM_NAME = re.compile(r"[A-Za-z_][\w.\-]*")  # timm names may carry a pretrained tag: a.b_c
_LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


class SpecError(ValueError):
    """A model, checkpoint, data or loss argument that cannot be used; the message says why."""


def forms_text() -> str:
    """The accepted ``--model`` forms, one per line, for error messages and ``--help``."""
    width = max(len(form) for form, _ in MODEL_FORMS)
    return "\n".join(f"  {form:<{width}}  {what}" for form, what in MODEL_FORMS)


def _spec_error(spec: str, problem: str) -> SpecError:
    return SpecError(f"{spec!r}: {problem}\naccepted --model forms:\n{forms_text()}")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value.

    Attributes:
        kind: ``"torchvision"``, ``"timm"``, ``"file"``, ``"module"`` or ``"exported"``.
        target: the model name (torchvision, timm), the file path (file, exported) or the
            dotted module name (module).
        factory: the factory function's name (file, module); None otherwise.
        text: the value as given.
    """

    kind: str
    target: str
    factory: str | None = None
    text: str = ""

    @property
    def name(self) -> str:
        """A short name for the model, safe as a directory name (the default ``runs/<name>``)."""
        if self.kind in ("torchvision", "timm"):
            base = self.target
        elif self.kind == "exported":
            base = Path(self.target).stem
        else:
            source = Path(self.target).stem if self.kind == "file" else self.target
            base = f"{source}-{self.factory}"
        return re.sub(r"[^\w.\-]", "_", base)


def parse_model_spec(text: str) -> ModelSpec:
    """The :class:`ModelSpec` ``text`` names (syntax only: nothing is imported or opened).

    Raises:
        SpecError: ``text`` is none of the accepted forms (the message lists them).
    """
    spec = text.strip()
    if not spec:
        raise _spec_error(text, "empty model spec")
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in ("torchvision", "timm"):
        pattern = _IDENT if prefix == "torchvision" else _TIMM_NAME
        if not pattern.fullmatch(rest):
            raise _spec_error(text, f"{rest!r} is not a {prefix} model name")
        return ModelSpec(prefix, rest.lower() if prefix == "torchvision" else rest, None, text)
    if spec.endswith(".pt2"):
        return ModelSpec("exported", spec, None, text)
    source, colon, factory = spec.rpartition(":")
    if colon:
        if not _IDENT.fullmatch(factory):
            raise _spec_error(text, f"{factory!r} after the last ':' is not a function name")
        if source.endswith(".py"):
            return ModelSpec("file", source, factory, text)
        if _DOTTED.fullmatch(source):
            return ModelSpec("module", source, factory, text)
        raise _spec_error(
            text, f"{source!r} before ':{factory}' is neither a .py file nor a dotted module name"
        )
    if spec.endswith(".py"):
        raise _spec_error(text, f"name the factory to call in {spec}: {spec}:factory")
    if _IDENT.fullmatch(spec):
        return ModelSpec("torchvision", spec.lower(), None, text)
    raise _spec_error(text, "not a model name, a .pt2 file or a source:factory pair")


class LoadedModel(NamedTuple):
    """A built model and the example input shape it expects unless told otherwise."""

    model: nn.Module | torch.export.ExportedProgram
    input_shape: tuple[int, ...]


def load_model(spec: ModelSpec | str) -> LoadedModel:
    """Build the model ``spec`` names, in eval mode, and its default example input shape.

    torchvision and timm models get random weights (seed torch first for repeatable ones);
    the shape is timm's ``resolve_data_config`` input size at batch 1, a ``.pt2`` program's own
    example, a factory's ``(module, shape)`` when it returns one, else
    :data:`DEFAULT_INPUT_SHAPE`.

    Raises:
        SpecError: the spec is malformed, its file or module is missing or fails to import, the
            factory does not exist or returns something else than a model, timm is not
            installed, or the name is unknown (with close matches).
    """
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    loader = {
        "torchvision": _torchvision,
        "timm": _timm,
        "exported": _exported,
        "file": _factory,
        "module": _factory,
    }[spec.kind]
    model, shape = loader(spec)
    if isinstance(model, nn.Module):
        model.eval()
    return LoadedModel(model, tuple(shape))


def _close(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(close)}" if close else ""


def _torchvision(spec: ModelSpec) -> tuple[nn.Module, tuple[int, ...]]:
    try:
        import torchvision
    except ImportError:
        raise _spec_error(
            spec.text, "torchvision is not installed: pip install 'fxprune[vision]'"
        ) from None
    names = torchvision.models.list_models()
    if spec.target not in names:
        raise _spec_error(
            spec.text,
            f"unknown torchvision model {spec.target!r}{_close(spec.target, names)} "
            "(torchvision.models.list_models() lists them all)",
        )
    return torchvision.models.get_model(spec.target, weights=None), DEFAULT_INPUT_SHAPE


def _timm(spec: ModelSpec) -> tuple[nn.Module, tuple[int, ...]]:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise _spec_error(spec.text, "timm is not installed: pip install 'fxprune[timm]'") from None
    if not timm.is_model(spec.target):
        raise _spec_error(
            spec.text,
            f"unknown timm model {spec.target!r}{_close(spec.target, timm.list_models())} "
            "(timm.list_models() lists them all)",
        )
    model = timm.create_model(spec.target, pretrained=False)
    size = resolve_data_config({}, model=model)["input_size"]
    return model, (1, *size)


def _exported(spec: ModelSpec) -> tuple[torch.export.ExportedProgram, tuple[int, ...]]:
    path = Path(spec.target)
    if not path.is_file():
        raise _spec_error(spec.text, f"no such file: {path}")
    try:
        ep = torch.export.load(path)
    except Exception as exc:  # torch raises many types for a file that is not a program
        raise _spec_error(
            spec.text,
            f"{path} is not an ExportedProgram saved by torch.export.save "
            f"({type(exc).__name__}: {exc})",
        ) from exc
    args, kwargs = ep.example_inputs or ((), {})
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    shape = tuple(tensors[0].shape) if len(tensors) == 1 else DEFAULT_INPUT_SHAPE
    return ep, shape


def _factory(spec: ModelSpec) -> tuple[nn.Module | torch.export.ExportedProgram, tuple[int, ...]]:
    fn = resolve_callable(spec.target, spec.factory or "", spec.text, what="factory")
    try:
        made = fn()
    except Exception as exc:
        raise _spec_error(
            spec.text, f"{spec.factory}() raised {type(exc).__name__}: {exc}"
        ) from exc
    shape: Any = DEFAULT_INPUT_SHAPE
    if isinstance(made, tuple) and len(made) == 2:
        made, shape = made
    models = (nn.Module, torch.export.ExportedProgram)
    if not isinstance(made, models) or not _is_shape(shape):
        raise _spec_error(
            spec.text,
            f"{spec.factory}() must return an nn.Module, an ExportedProgram or "
            f"(module, input_shape), got {type(made).__name__}",
        )
    return made, tuple(int(n) for n in shape)


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, (tuple, list, torch.Size)) and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    )


def resolve_callable(source: str, name: str, spec: str, *, what: str) -> Callable[..., Any]:
    """``name`` from a Python file (``source`` ends in .py) or an importable dotted module.

    A file is imported as a module of its own (registered in ``sys.modules``, so a model whose
    classes it defines can be pickled); a module is imported with the current directory on the
    path, as ``python -m`` would.

    Raises:
        SpecError: the file or module is missing or fails to import, or has no callable ``name``.
    """
    error = _spec_error if what == "factory" else _plain_error
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise error(spec, f"no such file: {path}")
        module = _import_file(path, spec, error)
    else:
        module = _import_module(source, spec, error)
    fn = getattr(module, name, None)
    if not callable(fn):
        public = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise error(
            spec,
            f"no {what} {name!r} in {source}{_close(name, public)}"
            + ("" if fn is None else f" ({name} is a {type(fn).__name__}, not a function)"),
        )
    return fn


def _plain_error(spec: str, problem: str) -> SpecError:
    return SpecError(f"{spec!r}: {problem}")


def _import_file(path: Path, spec: str, error: Callable[[str, str], SpecError]) -> Any:
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"fxprune_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:  # pragma: no cover  (a .py has one)
        raise error(spec, f"cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        with _on_path(str(resolved.parent)):  # its own sibling imports work, as for a script
            loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise error(spec, f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(source: str, spec: str, error: Callable[[str, str], SpecError]) -> Any:
    try:
        with _on_path(os.getcwd()):
            return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name and source.startswith(exc.name):  # the module itself, not one it imports
            raise error(
                spec, f"no module named {exc.name!r} (on sys.path or in the current directory)"
            ) from exc
        raise error(spec, f"importing {source} raised {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise error(spec, f"importing {source} raised {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _on_path(directory: str) -> Iterator[None]:
    """``directory`` on ``sys.path`` for the duration (added only when missing)."""
    if directory in sys.path:
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


# ---- --checkpoint ------------------------------------------------------------------------


def load_checkpoint(model: nn.Module | torch.export.ExportedProgram, path: str | Path) -> None:
    """Load the state dict in ``path`` into ``model``, strictly (every key, every shape).

    The file holds a state dict, or a dict with one under ``"state_dict"`` or ``"model"`` (what
    training scripts commonly save).

    Raises:
        SpecError: naming the file: it is not a state dict, or its keys or shapes do not match
            the model's (the first few missing, unexpected and mis-shaped keys are listed).
    """
    if isinstance(model, torch.export.ExportedProgram):
        raise SpecError(
            f"argument --checkpoint: {path}: a .pt2 program carries its own weights; "
            "--checkpoint applies to torchvision, timm and factory models"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a state dict
        raise SpecError(
            f"argument --checkpoint: {path} is not a state dict ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(
            f"argument --checkpoint: {path} is not a state dict (a dict of tensors, as "
            f"model.state_dict() gives), got {type(state).__name__}"
        )
    mismatch = _mismatch(model.state_dict(), state)
    if mismatch:
        raise SpecError(f"argument --checkpoint: {path} does not match the model: {mismatch}")
    model.load_state_dict(state, strict=True)


def _mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What differs between two state dicts, the first keys of each kind; '' if nothing."""

    def first(keys: list[str]) -> str:
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        return ", ".join(keys[:3]) + more

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs the model's {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {first(unexpected)}")
        if all(k.startswith("module.") for k in unexpected) and missing:
            parts.append("(saved from DistributedDataParallel? strip the 'module.' prefix)")
    if shapes:
        parts.append(f"mis-shaped: {first(shapes)}")
    return "; ".join(parts)


# ---- --data and --loss -------------------------------------------------------------------


class TensorFiles:
    """The batches in a directory of ``.pt`` files, each ``(inputs, target)``, by file name.

    Files are read one at a time on each pass (compile makes two: importance, then BatchNorm
    statistics), so the directory may be larger than memory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = sorted(directory.glob("*.pt"))
        if not self.files:
            raise SpecError(f"argument --data: no .pt files in {directory}")
        self._read(self.files[0])  # the common mistakes show before any work starts

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for path in self.files:
            yield self._read(path)

    @staticmethod
    def _read(path: Path) -> tuple[Any, Any]:
        try:
            batch = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SpecError(
                f"argument --data: {path} does not load ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise SpecError(
                f"argument --data: {path} must hold a pair (inputs, target), got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        return batch[0], batch[1]


class _Calls:
    """A function's batches, re-iterable: each pass calls the function again."""

    def __init__(self, fn: Callable[[], Iterable[Any]], spec: str) -> None:
        self.fn = fn
        self.spec = spec

    def __iter__(self) -> Iterator[Any]:
        batches = self.fn()
        if not isinstance(batches, Iterable):
            raise SpecError(
                f"argument --data: {self.spec} must return an iterable of (inputs, target) "
                f"batches, got {type(batches).__name__}"
            )
        return iter(batches)


def load_data(text: str) -> Iterable[tuple[Any, Any]]:
    """The batches ``--data`` names: a directory of ``.pt`` files, or ``source:function``.

    ``source`` is a ``.py`` file or a dotted module; ``function()`` returns an iterable of
    ``(inputs, target)`` batches and is called once per pass over the data.

    Raises:
        SpecError: no such directory or function, or no ``.pt`` files in the directory.
    """
    path = Path(text)
    if path.is_dir():
        return TensorFiles(path)
    source, colon, name = text.rpartition(":")
    if not colon or not source or not _IDENT.fullmatch(name):
        raise SpecError(
            f"argument --data: {text!r} is neither a directory of .pt files (each holding "
            "(inputs, target)) nor path/to/file.py:function / package.module:function"
        )
    fn = resolve_callable(source, name, f"--data {text}", what="function")
    return _Calls(fn, text)


def load_loss(text: str) -> Callable[[Any, Any], torch.Tensor]:
    """``loss(output, target)``: ``cross_entropy``, ``mse``, or ``source:function``.

    Raises:
        SpecError: neither a known name nor a function that can be found.
    """
    if text in _LOSSES:
        return _LOSSES[text]
    source, colon, name = text.rpartition(":")
    if not colon or not source or not _IDENT.fullmatch(name):
        raise SpecError(
            f"argument --loss: {text!r} is none of {', '.join(_LOSSES)}, "
            "path/to/file.py:function or package.module:function"
        )
    return resolve_callable(source, name, f"--loss {text}", what="function")
