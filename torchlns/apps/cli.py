"""The ``convert``, ``report`` and ``compare`` commands of ``python -m torchlns``.

# Note: loading models safely
A model file is either a state_dict (loaded with ``torch.load(weights_only=True)`` and put
into the model that ``--model-class pkg.module:callable`` builds, strictly) or a whole
pickled ``nn.Module`` (``torch.save(model)``). Unpickling a module runs code named by the
file, so every file is first loaded with ``weights_only=True``; only if that refuses
because the file holds pickled objects, and the user passed ``--trust-pickle``, is it loaded
with ``weights_only=False``. Converted models' state_dicts hold ``LNSTensor``s, which load
with ``weights_only=True`` (see ``_rebuild_coded_tensor`` in tensor.py), but a float
``--model-class`` cannot take them, so converted models are loaded as whole modules.

# Note: user errors
Anything the user can cause and fix (a missing or non-torch file, a pickled module without
``--trust-pickle``, a ``--model-class`` that does not import, a state_dict that does not fit
the model, data that is not a tensor or does not fit the model) raises a ``CLIError``;
``torchlns.__main__.main`` prints it as one ``torchlns: error: ...`` line and returns 2.
Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import math
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .._text import format_table
from ..config import CALIBRATORS, ClusterConfig, ConvertConfig
from ..core.formats import CHIP_MAC, FP8_E4M3, FP8_E5M2, INT8, LNSFormat
from ..nn.swap import swappable_types
from ..tensor import CodedTensor
from ..transforms.convert import Inputs, call_model, convert
from ..transforms.sensitivity import sensitivity
from ..transforms.size import size_report

__all__ = ["CLIError", "FileError", "ModelError", "DataError", "FORMATS", "add_commands", "config_for",
           "load_model", "load_data", "format_variants"]


class CLIError(Exception):
    """A user error: ``main`` prints its message as one line and exits with status 2."""


class FileError(CLIError):
    """A file is missing, unreadable, not a torch file, or cannot be written."""


class ModelError(CLIError):
    """A model cannot be built: pickled without --trust-pickle, bad --model-class, state_dict mismatch."""


class DataError(CLIError):
    """The data file holds no usable tensor, or the model cannot run on it."""


# --format name -> ConvertConfig fields
FORMATS: Mapping[str, Mapping[str, Any]] = {
    "lns8": {},
    "lns8-chip": {"mac": CHIP_MAC},
    "lns8-mitchell": {"fmt": LNSFormat(8, 3, "mitchell")},
    "fp8-e4m3": {"fmt": FP8_E4M3},
    "fp8-e5m2": {"fmt": FP8_E5M2},
    "int8": {"fmt": INT8},
}


# ----------------------------------------------------------------------------------------
# loading files
# ----------------------------------------------------------------------------------------
class _Pickled(Exception):
    """The file holds pickled Python objects that ``weights_only=True`` refuses (``name``: the first).

    ``blocked``: torch names the global's module as one it always blocks (``os``, ``posix``,
    ``subprocess``, ...): code that runs commands, never a model's.
    """

    def __init__(self, name: str, blocked: bool = False):
        super().__init__(name)
        self.name = name
        self.blocked = blocked


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _check_readable(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileError(f"{what} file not found: {path}")
    if p.is_dir():
        raise FileError(f"{what} {path} is a directory, not a torch file")
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise FileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    # torch.save writes a zip archive; the legacy format starts with a pickle protocol byte.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise FileError(f"{what} {path} is not a torch file (expected a file written by torch.save)")
    return p


_UNSAFE_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
_BLOCKED = re.compile(r"whose module [\w.]+ is blocked")
# Damaged files (truncated, corrupted): the weights-only unpickler runs no code from the
# file, so these are all a file that torch cannot read. A truncated archive can fail in a
# seek (OSError: [Errno 22]).
_DAMAGED = (EOFError, RuntimeError, KeyError, ValueError, IndexError, TypeError, UnicodeDecodeError, OSError,
            zipfile.BadZipFile)


def _safe_load(path: str, what: str) -> Any:
    """``torch.load(weights_only=True)``; raises ``_Pickled`` for files holding pickled objects."""
    p = _check_readable(path, what)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        if found:
            raise _Pickled(found.group(1), blocked=bool(_BLOCKED.search(str(e)))) from None
        raise FileError(f"{what} {path} is not a readable torch file ({_first_line(e)})") from None
    except _DAMAGED as e:
        raise FileError(f"{what} {path} is not a readable torch file, damaged or truncated ({_first_line(e)})") \
            from None


def _unsafe_load(path: str, what: str) -> Any:
    """``torch.load(weights_only=False)``, for files the user trusts (``--trust-pickle``)."""
    _ensure_cwd_on_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise FileError(f"cannot load {what} {path}: it refers to code that cannot be imported ({_first_line(e)}); "
                        "put the module that defines the model on PYTHONPATH") from None
    except (pickle.UnpicklingError, *_DAMAGED) as e:
        raise FileError(f"{what} {path} is not a readable torch file, damaged or truncated ({_first_line(e)})") \
            from None


def _ensure_cwd_on_path() -> None:
    # The console script's sys.path does not hold the working directory; `python -m` does.
    # Appended, so it never shadows an installed package.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import_callable(spec: str, option: str = "--model-class") -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"{option} must look like pkg.module:callable, got {spec!r}")
    if not all(part.isidentifier() for part in module_name.split(".")) or \
            not all(part.isidentifier() for part in attr.split(".")):
        raise ModelError(f"{option} {spec}: {module_name!r}:{attr!r} is not a dotted module path and a name "
                         "(relative imports and file paths are not accepted)")
    _ensure_cwd_on_path()
    try:
        obj = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as e:
        raise ModelError(f"{option} {spec}: cannot import module {module_name!r} ({_first_line(e)})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelError(f"{option} {spec}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ModelError(f"{option} {spec}: {attr!r} is of type {type(obj).__name__}, not a class or a function")
    return obj


def _names(keys: Sequence[str], limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _from_state_dict(state: Mapping, spec: str, path: str, what: str) -> nn.Module:
    factory = _import_callable(spec)
    try:
        model = factory()
    except TypeError as e:
        raise ModelError(f"--model-class {spec}: calling it with no arguments failed ({_first_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model-class {spec} returned a {type(model).__name__}, not an nn.Module")
    return _load_into(model, state, f"--model-class {spec}", path, what)


def _load_into(model: nn.Module, state: Mapping, source: str, path: str, what: str) -> nn.Module:
    """``model`` with ``state`` loaded strictly, or a ModelError naming every mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} in the model"
              for k in expected if k in state and isinstance(state[k], torch.Tensor)
              and isinstance(expected[k], torch.Tensor) and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes, 3)}")
    if problems:
        hint = ""
        if any(isinstance(v, CodedTensor) for v in state.values()):
            hint = ("; it is a converted model's state_dict, which a float --model-class cannot take: "
                    "pass the converted module (convert's -o file) with --trust-pickle")
        elif any(isinstance(v, Mapping) for v in state.values()):
            hint = f"; it may be a training checkpoint (entries: {_names([str(k) for k in state])})"
        raise ModelError(f"{what} {path} does not fit {type(model).__name__} from {source}: "
                         f"{'; '.join(problems)}{hint}")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise ModelError(f"{what} {path} does not load into {type(model).__name__}: "
                         f"{' '.join(str(e).split())}") from None
    return model


def load_model(path: str, *, model_class: Optional[str] = None, trust_pickle: bool = False,
               what: str = "MODEL") -> nn.Module:
    """The model in ``path`` in eval mode (see Note: loading models safely)."""
    try:
        obj = _safe_load(path, what)
    except _Pickled as e:
        if e.blocked:  # refused whatever the flags say
            raise ModelError(f"{what} {path} is a pickle whose first global is {e.name}, from a module that runs "
                             "commands, not model code; torchlns refuses to load it, even with --trust-pickle") \
                from None
        if not trust_pickle:
            raise ModelError(
                f"{what} {path} is a pickled Python object ({e.name}), and loading it would run code from the file; "
                "pass --trust-pickle only if you trust the file, or save model.state_dict() and load it with "
                "--model-class pkg.module:callable") from None
        obj = _unsafe_load(path, what)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, Mapping):
        if model_class is None:
            if any(isinstance(v, CodedTensor) for v in obj.values()):
                raise ModelError(f"{what} {path} holds a converted model's state_dict, which cannot be rebuilt "
                                 "without its model: pass the converted module (convert's -o file) with --trust-pickle")
            raise ModelError(f"{what} {path} holds a state_dict; pass --model-class pkg.module:callable "
                             "to build the model it belongs to")
        return _from_state_dict(obj, model_class, path, what).eval()
    raise ModelError(f"{what} {path} holds a {type(obj).__name__}, not a model or a state_dict")


def _factory_value(text: str) -> Any:
    """A --factory-arg value: a Python literal (1, 0.5, True, None, 'x', (1, 2)) or else the text itself."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def factory_kwargs(pairs: Sequence[str]) -> dict:
    kwargs = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CLIError(f"--factory-arg must look like name=value, got {pair!r}")
        kwargs[key] = _factory_value(value)
    return kwargs


def model_from_factory(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The ready model ``pkg.module:callable(**kwargs)`` returns (see Note: loading models safely)."""
    factory = _import_callable(spec, "--model-factory")
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: one line saying what failed
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelError(f"--model-factory {spec}: calling it with ({args}) failed: "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model-factory {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(path: Optional[str], args: argparse.Namespace, what: str = "MODEL") -> nn.Module:
    """MODEL from its file, or from ``--model-factory`` (whose model then takes the file's
    state_dict, if a file is given too)."""
    spec = getattr(args, "model_factory", None)
    if spec is None:
        if path is None:
            raise CLIError(f"give {what} (a model file) or --model-factory pkg.module:callable")
        return load_model(path, model_class=args.model_class, trust_pickle=args.trust_pickle, what=what)
    if args.model_class is not None:
        raise CLIError("--model-class and --model-factory both build the model; give one")
    model = model_from_factory(spec, factory_kwargs(args.factory_arg))
    if path is not None:
        try:
            state = _safe_load(path, what)
        except _Pickled as e:
            raise ModelError(f"{what} {path} is a pickled object ({e.name}); with --model-factory it must be a "
                             "state_dict for the factory's model") from None
        if not isinstance(state, Mapping):
            raise ModelError(f"{what} {path} holds a {type(state).__name__}, not a state_dict for the factory's model")
        _load_into(model, state, f"--model-factory {spec}", path, what)
    return model.eval()


def model_name(path: Optional[str], args: argparse.Namespace) -> str:
    """How messages name a model: its file, or its factory."""
    return path if path is not None else f"--model-factory {args.model_factory}"


@dataclass
class Data:
    inputs: Any  # a tensor (N, ...), a list of tensors (positional inputs) or a dict (keyword inputs)
    targets: Optional[torch.Tensor] = None
    images: Any = None  # the ImageSet, when DATA names image files

    @property
    def samples(self) -> int:
        return _first_tensor(self.inputs).shape[0]

    def items(self, batch_size: int) -> list:
        """Calibration items of ``batch_size`` samples: tensors, ``Inputs(...)`` or dicts of keyword inputs."""
        if isinstance(self.inputs, torch.Tensor):
            return list(self.inputs.split(batch_size))
        if isinstance(self.inputs, Mapping):
            keys = list(self.inputs)
            return [dict(zip(keys, parts)) for parts in zip(*(self.inputs[k].split(batch_size) for k in keys))]
        return [Inputs(*parts) for parts in zip(*(t.split(batch_size) for t in self.inputs))]


def data_from_args(path: str, args: argparse.Namespace) -> Data:
    """DATA with the image options of the command (see ``_data_options``)."""
    return load_data(path, image_size=getattr(args, "image_size", 224),
                     normalization=getattr(args, "normalize", "imagenet"), skip_bad=getattr(args, "skip_bad", False),
                     progress=False if getattr(args, "json", False) else None)


def _first_tensor(inputs) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    return next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs[0]


def load_data(path: str, *, image_size: int = 224, normalization: str = "imagenet", skip_bad: bool = False,
              progress: Optional[bool] = None) -> Data:
    """A tensor ``(N, ...)`` of inputs, or a dict with ``"inputs"`` (and optionally ``"targets"``).

    ``"inputs"`` may also be a list of tensors (a model with several positional inputs, such as
    a stereo pair) or a dict of tensors (keyword inputs), each with the same N. A folder of
    images, a glob or an image file is read as images (see Note: image data on the command
    line in apps/images.py), with class folders giving the targets.
    """
    from .images import ImageDataError, is_image_spec, load_images

    if is_image_spec(path) and not path.endswith(".pt"):
        import warnings

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images = load_images(path, image_size, normalization, skip_bad=skip_bad, progress=progress)
        except ImageDataError as e:
            raise DataError(str(e)) from None
        for w in caught:  # the images --skip-bad left out, named on one line
            print(f"torchlns: warning: {w.message}", file=sys.stderr)
        return Data(images.inputs, images.targets, images)
    try:
        obj = _safe_load(path, "DATA")
    except _Pickled as e:
        raise DataError(f"DATA {path} holds pickled Python objects ({e.name}), not tensors; save a tensor, "
                        "or a dict {'inputs': tensor, 'targets': tensor}, with torch.save") from None
    targets = None
    if isinstance(obj, torch.Tensor):
        inputs = obj
    elif isinstance(obj, Mapping):
        if "inputs" not in obj:
            raise DataError(f"DATA {path} is a dict without an 'inputs' entry "
                            f"(entries: {_names([str(k) for k in obj]) or 'none'})")
        inputs, targets = obj["inputs"], obj.get("targets")
    else:
        raise DataError(f"DATA {path} holds a {type(obj).__name__}, not a tensor or a dict with an 'inputs' tensor")
    if isinstance(inputs, (list, tuple)) and inputs:
        parts = [(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
        inputs = list(inputs)
    elif isinstance(inputs, Mapping) and inputs:
        parts = [(f"inputs[{k!r}]", t) for k, t in inputs.items()]
        inputs = dict(inputs)
    else:
        parts = [("inputs", inputs)]
    n = None
    for what, t in parts:
        if not isinstance(t, torch.Tensor):
            raise DataError(f"DATA {path}: '{what}' is a {type(t).__name__}, not a tensor")
        if t.dim() == 0 or t.shape[0] == 0:
            raise DataError(f"DATA {path}: {what} of shape {tuple(t.shape)} hold no samples; expected (N, ...)")
        if not t.is_floating_point() or isinstance(t, CodedTensor):
            raise DataError(f"DATA {path}: {what} must be a float tensor, got {t.dtype}")
        if n is not None and t.shape[0] != n:
            raise DataError(f"DATA {path}: {what} has {t.shape[0]} samples, the other inputs {n}")
        n = t.shape[0]
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise DataError(f"DATA {path}: 'targets' is a {type(targets).__name__}, not a tensor")
        if targets.dim() == 0 or targets.shape[0] != n:
            raise DataError(f"DATA {path}: {tuple(targets.shape)} targets for {n} inputs")
    return Data(inputs, targets)


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------
def _describe(x) -> str:
    if isinstance(x, Inputs):
        return ", ".join(_describe(t) for t in x.args)
    if isinstance(x, Mapping):
        return ", ".join(f"{k}={_describe(t)}" for k, t in x.items())
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"


def _run(fn: Callable[[], Any], x, name: str, path: str) -> Any:
    """``fn()``, which runs model ``name`` on ``x``; the model failing on the data is a ``DataError``."""
    try:
        return fn()
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{name} {path} fails on a data batch of shape {_describe(x)} ({_first_line(e)})") from None


def _forward(model: nn.Module, x, name: str, path: str, check: bool) -> torch.Tensor:
    if not check:
        return call_model(model, x)
    y = _run(lambda: call_model(model, x), x, name, path)
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{name} {path} returns a {type(y).__name__}; compare needs a model that returns a tensor")
    return y


def _outputs(model: nn.Module, batches: Sequence, name: str, path: str) -> torch.Tensor:
    """The model's outputs on every batch, concatenated (eval mode, no grad); the first batch is checked."""
    model.eval()
    with torch.no_grad():
        return torch.cat([_forward(model, x, name, path, check=i == 0) for i, x in enumerate(batches)])


def config_for(fmt: str = "lns8", *, calibrator: str = "max", activation: str = "static",
               cluster: Optional[int] = None, cluster_scope: str = "layer",
               keep_float: Sequence[str] = ()) -> ConvertConfig:
    """The ``ConvertConfig`` that ``torchlns convert`` builds from its options."""
    kw = dict(FORMATS[fmt])
    if cluster is not None:
        kw["cluster"] = ClusterConfig(cluster, cluster_scope)
    return ConvertConfig(calibrator=calibrator, activation=activation,
                         overrides={name: None for name in keep_float}, **kw)


def _conversion_table(report: List[dict]) -> str:
    rows = []
    for r in report:
        p = r["input"]
        inp = "dynamic" if p is None else (f"offset {int(p)}" if r["fmt"].startswith("LNS") else f"scale {p:.4g}")
        rows.append((r["layer"] or "(root)", r["kind"], r["fmt"], r["mac"], inp,
                     "-" if r["acc_lsb"] is None else str(r["acc_lsb"])))
    return format_table(("layer", "kind", "format", "MAC", "input", "acc_lsb"), rows)


def _cluster_table(report) -> str:
    rows = [(s.layer or "(root)", str(s.kernels), str(s.clusters), f"{s.relative_error:.4f}") for s in report]
    return format_table(("layer", "kernels", "clusters", "rel. error"), rows, right=(1, 2, 3))


def _state_dict_path(out: Path) -> Path:
    return out.with_suffix(".state_dict.pt")


# ----------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    inputs = ((args.model, "MODEL"), (args.calib, "--calib DATA"))
    out = _check_writable(args.output, "-o", inputs)
    sd_out = _state_dict_path(out)
    _check_writable(str(sd_out), f"-o {args.output}'s state_dict", inputs)
    if args.image is not None:
        _check_writable(args.image, "--image", (*inputs, (str(out), "-o"), (str(sd_out), "the state_dict")))
    if args.cluster_scope is not None and args.cluster is None:
        raise CLIError("--cluster-scope needs --cluster C")

    model = build_model(args.model, args)
    name = model_name(args.model, args)
    data = data_from_args(args.calib, args)
    batches = _batches(data, args)
    names = [n for n, _ in model.named_modules()]
    for pattern in args.keep_float or ():
        if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
            layers = [n for n, m in model.named_modules() if isinstance(m, swappable_types())]
            raise CLIError(f"--keep-float {pattern!r} matches no layer of MODEL (layers: {_names(layers, 8)})")
    config = config_for(args.format, calibrator=args.calibrator, activation=args.activation, cluster=args.cluster,
                        cluster_scope=args.cluster_scope or "layer", keep_float=args.keep_float or ())
    with torch.no_grad():  # the data must fit the float model before calibration starts
        _forward(model.eval(), batches[0], "MODEL", name, check=True)
    try:
        qmodel = convert(model, config, calibration_data=batches)
    except ValueError as e:  # convert's own user-facing checks (e.g. layers calibration never reached)
        raise CLIError(f"conversion failed: {' '.join(str(e).split())}") from None

    n = sum(_first_tensor(b.args if isinstance(b, Inputs) else b).shape[0] for b in batches)
    print(f"converted {name} ({type(model).__name__}) to {args.format}: {config.fmt}"
          + (f", {config.mac}" if config.fmt.mac_kind == "log" else "")
          + f"; calibrated on {n} inputs in {len(batches)} batches")
    print()
    if qmodel.fold_report is not None:
        print(qmodel.fold_report)
        print()
    if qmodel.cluster_report is not None:
        print(f"cluster_kernels (C={args.cluster}, scope={config.cluster.scope}):")
        print(_cluster_table(qmodel.cluster_report))
        print()
    print("conversion:")
    print(_conversion_table(qmodel.conversion_report))
    print()
    print("coverage:")
    print(qmodel.conversion_report)
    print()
    print("size:")
    print(size_report(qmodel, reference=model))
    print()
    if args.image is not None:
        _write_image(qmodel, args.image)

    _save_converted(qmodel, out, sd_out, args.output)
    return 0


def _save_converted(qmodel: nn.Module, out: Path, sd_out: Path, given: str) -> None:
    """The converted module at ``out`` and its state_dict at ``sd_out``."""
    try:
        torch.save(qmodel.state_dict(), sd_out)
    except OSError as e:
        raise FileError(f"cannot write {sd_out}: {e.strerror or e}") from None
    try:
        torch.save(qmodel, out)
    except OSError as e:
        raise FileError(f"cannot write -o {given}: {e.strerror or e}") from None
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        out.unlink(missing_ok=True)
        raise ModelError(f"the converted model cannot be pickled ({_first_line(e)}); its state_dict was saved "
                         f"to {sd_out}; define the model class at module level") from None
    print(f"saved {out} (the module; load with torch.load(weights_only=False) or --trust-pickle)")
    print(f"saved {sd_out} (its state_dict; torch.load(weights_only=True) works)")


def _pair_paths(args: argparse.Namespace) -> tuple:
    """(FLOAT_MODEL, CONVERTED_MODEL) of compare and recover; with --model-factory and one file,
    that file is the converted model and the factory builds the float one (path None)."""
    float_path, converted_path = args.float_model, args.converted_model
    if args.model_factory is not None and converted_path is None:
        float_path, converted_path = None, float_path
    if converted_path is None:
        raise CLIError("give FLOAT_MODEL and CONVERTED_MODEL (or --model-factory and CONVERTED_MODEL)")
    return float_path, converted_path


def _load_pair(args: argparse.Namespace, float_path: Optional[str], converted_path: str) -> tuple:
    """(float model, converted model) of ``_pair_paths``."""
    return (build_model(float_path, args, what="FLOAT_MODEL"),
            load_model(converted_path, model_class=args.model_class, trust_pickle=args.trust_pickle,
                       what="CONVERTED_MODEL"))


def _pair_arguments(p: argparse.ArgumentParser, converted_help: str) -> None:
    p.add_argument("float_model", metavar="FLOAT_MODEL", nargs="?",
                   help="the float model: a state_dict file (with --model-class) or a pickled nn.Module; "
                        "left out with --model-factory")
    p.add_argument("converted_model", metavar="CONVERTED_MODEL", nargs="?", help=converted_help)


def cmd_recover(args: argparse.Namespace) -> int:
    from ..transforms.recover import METHODS, recover

    float_path, converted_path = _pair_paths(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or any(m not in METHODS for m in methods):
        raise CLIError(f"--methods must be a comma-separated list of {', '.join(METHODS)}, got {args.methods!r}")
    inputs = ((float_path, "FLOAT_MODEL"), (converted_path, "CONVERTED_MODEL"), (args.calib, "--calib DATA"))
    out = _check_writable(args.output, "-o", inputs)
    sd_out = _state_dict_path(out)
    _check_writable(str(sd_out), f"-o {args.output}'s state_dict", inputs)
    fmodel, qmodel = _load_pair(args, float_path, converted_path)
    data = data_from_args(args.calib, args)
    batches = _batches(data, args)
    try:
        r = recover(qmodel, fmodel, batches, methods=methods, progress=None,
                    rounding=dict(iterations=args.rounding_iterations), distillation=dict(steps=args.distill_steps))
    except ValueError as e:  # recover's own checks: not the source model, data that does not run, ...
        raise CLIError(f"recovery failed: {' '.join(str(e).split())}") from None
    print(f"recovered {converted_path} against {model_name(float_path, args)} on {data.samples} inputs "
          f"({', '.join(methods)})")
    print(r.recovery_report)
    print()
    _save_converted(r, out, sd_out, args.output)
    return 0


def _batches(data, args: argparse.Namespace) -> list:
    """DATA in batches of --batch-size, the first --max-batches of them."""
    batches = data.items(args.batch_size)
    return batches if args.max_batches is None else batches[:args.max_batches]


def _check_writable(path: str, what: str, inputs: Sequence[tuple] = ()) -> Path:
    """``path`` as a file that can be written and is none of ``inputs`` (``(file, option name)`` pairs)."""
    out = Path(path)
    if out.is_dir():
        raise FileError(f"{what} {path} is a directory; give the file to write")
    if not out.resolve().parent.is_dir():
        raise FileError(f"cannot write {what} {path}: directory {out.parent} does not exist")
    for given, name in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve() == out.resolve():
            raise FileError(f"{what} {path} would overwrite {name} {given}")
    return out


def _write_image(qmodel: nn.Module, path: str) -> None:
    """``torchlns.export`` to ``path``, and the size identity it keeps (see Note: weight image format)."""
    from ..deploy.image import HEADER_BYTES, ImageError, export

    try:
        manifest = export(qmodel, path)
    except ImageError as e:
        raise ModelError(f"cannot export the weight image: {e}") from None
    except OSError as e:
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
    total = os.path.getsize(path)
    bits = manifest["payload_bits"]
    payload = (bits + 7) // 8
    print(f"wrote {path}: {total:,} bytes = {HEADER_BYTES} header + {total - HEADER_BYTES - payload:,} manifest + "
          f"{payload:,} payload")
    print(f"payload: {bits:,} bits, size_report's total of {bits / 8:,.1f} bytes, padded to whole bytes")


def cmd_export(args: argparse.Namespace) -> int:
    _check_writable(args.output, "-o", ((args.model, "MODEL"),))
    model = build_model(args.model, args)
    _write_image(model, args.output)
    return 0


def _shape(text: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape such as 1,3,224,224, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions, got {text!r}")
    return dims


def _example(data: Optional[Data], shape: Optional[tuple]):
    """The cost model's input: a seeded random tensor of ``shape``, else DATA's first sample (batch 1)."""
    if shape is not None:
        return torch.rand(shape, generator=torch.Generator().manual_seed(0))
    if data is None:
        raise CLIError("give --input-shape N,C,H,W (or --calib DATA, whose first sample is used)")
    return data.items(1)[0]


# The network in each format of the comparison: (row name, convert's --format, cluster or not).
COST_VARIANTS = (("FP8 e4m3", "fp8-e4m3", False), ("INT8", "int8", False), ("LNS8 chip", "lns8-chip", False),
                 ("LNS8 chip + cluster", "lns8-chip", True))


def format_variants(model: nn.Module, batches: Sequence, clusters: int = 16) -> dict:
    """``{name: model}``: ``model`` as float32 (BN folded, as every converted one is), FP8 e4m3, INT8,
    LNS8 on the chip's MAC, and LNS8 with ``clusters`` centroids per k×k conv layer."""
    from ..transforms.fold import fold_batchnorm

    out = {"float32 (BN folded)": fold_batchnorm(model)}
    for name, fmt, clustered in COST_VARIANTS:
        config = config_for(fmt, cluster=clusters if clustered else None)
        try:
            out[f"{name} C={clusters}" if clustered else name] = convert(model, config, calibration_data=batches)
        except ValueError as e:
            raise CLIError(f"conversion to {name} failed: {' '.join(str(e).split())}") from None
    return out


def cmd_cost(args: argparse.Namespace) -> int:
    from ..deploy.cost import CHIPS, compare_costs, cost_report

    if args.compare and args.calib is None:
        raise CLIError("--compare converts MODEL in every format and needs --calib DATA")
    if args.clusters is not None and not args.compare:
        raise CLIError("--clusters is for --compare")
    chip = CHIPS[args.chip]
    overrides = {k: kib * 1024 for k, kib in (("weight_sram_bytes", args.weight_sram_kib),
                                              ("activation_sram_bytes", args.activation_sram_kib)) if kib is not None}
    if overrides:
        chip = chip.replace(name=f"{chip.name} (modified)", **overrides)
    model = build_model(args.model, args)
    name = model_name(args.model, args)
    data = data_from_args(args.calib, args) if args.calib is not None else None
    x = _example(data, args.input_shape)
    if args.compare:
        with torch.no_grad():  # the data must fit the float model before calibration starts
            _run(lambda: call_model(model, x), x, "MODEL", name)
        batches = _batches(data, args)
        result = compare_costs(format_variants(model, batches, args.clusters or 16), x, chip)
        if args.json:
            print(json.dumps(dict(chip=chip.name, models=result.to_dicts()), indent=2))
        else:
            print(f"{name} ({type(model).__name__}) on input {_describe(x)}, one inference:")
            print(result)
        return 0
    report = _run(lambda: cost_report(model, x, chip), x, "MODEL", name)  # any output: a detector's dict too
    if args.json:
        print(json.dumps(dict(chip=chip.name, totals=report.totals(), layers=report.to_dicts()), indent=2))
    else:
        print(f"{name} ({type(model).__name__}) on input {_describe(x)}, one inference:")
        print(report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    model = build_model(args.model, args)
    report = size_report(model)
    coverage = getattr(model, "conversion_report", None)
    if args.json:
        out = {"size": report.to_dicts()}
        if coverage is not None:
            out["coverage"] = dict(total_macs=coverage.total_macs, chip_macs=coverage.chip_macs,
                                   coverage=coverage.coverage, float_layers=coverage.float_layers)
        out.setdefault("coverage", None)
        print(json.dumps(out, indent=2))
    else:
        print(report)
        if coverage is not None:
            print()
            print("coverage:")
            print(coverage)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    model = build_model(args.model, args)
    name = model_name(args.model, args)
    data = data_from_args(args.data, args)
    batches = _batches(data, args)
    with torch.no_grad():
        _forward(model.eval(), batches[0], "MODEL", name, check=True)
    config = config_for(args.format, calibrator=args.calibrator, activation=args.activation)
    try:
        report = sensitivity(model, config, batches, k=args.k, progress=not args.json and None)
    except ValueError as e:
        raise CLIError(f"sensitivity failed: {' '.join(str(e).split())}") from None
    if args.json:
        print(json.dumps(dict(full_db=report.full_db, layers=report.to_dicts(),
                              suggestions=[dict(kept=list(s.kept), sqnr_db=s.sqnr_db, bytes=s.bytes, ratio=s.ratio,
                                                overrides={n: None for n in s.kept}) for s in report.suggestions]),
                         indent=2))
    else:
        print(f"{name} ({type(model).__name__}) in {args.format} on {data.samples} inputs:")
        print(report)
    return 0


@dataclass
class Comparison:
    samples: int
    shape: tuple
    sqnr_db: float
    max_abs_diff: float
    agreement: Optional[float]
    accuracy_name: Optional[str] = None
    accuracy_float: Optional[float] = None
    accuracy_converted: Optional[float] = None
    kl: Optional[float] = None  # mean KL(float || converted) of the softmax over dim 1
    top5_float: Optional[float] = None
    top5_converted: Optional[float] = None
    kl_per_sample: Optional[torch.Tensor] = None


def compare_outputs(ref: torch.Tensor, out: torch.Tensor, targets: Optional[torch.Tensor] = None) -> Comparison:
    """SQNR (float64), max |difference|, argmax agreement over dim 1 and accuracy against ``targets``."""
    from .. import metrics

    r, o = ref.detach().double(), out.detach().double()
    sqnr = math.nan if torch.isnan(r).any() or torch.isnan(o).any() else metrics.sqnr(o, r)
    c = Comparison(samples=ref.shape[0], shape=tuple(ref.shape), sqnr_db=sqnr,
                   max_abs_diff=float((o - r).abs().max()) if r.numel() else 0.0, agreement=None)
    if ref.dim() >= 2:
        pr, po = ref.argmax(1), out.argmax(1)
        c.agreement = metrics.agreement(pr, po)
        kl = torch.nn.functional.kl_div(o.log_softmax(1), r.log_softmax(1), log_target=True, reduction="none").sum(1)
        c.kl_per_sample = kl.reshape(kl.shape[0], -1).mean(1)
        c.kl = float(c.kl_per_sample.mean())
        if targets is not None:
            if targets.shape != pr.shape or targets.is_floating_point() or targets.dtype == torch.bool:
                raise DataError(f"targets of shape {_describe(targets)} do not match the outputs: expected integer "
                                f"class indices of shape {tuple(pr.shape)} (the output's argmax over dim 1)")
            c.accuracy_name = "top-1 accuracy" if ref.dim() == 2 else "pixel accuracy"
            c.accuracy_float = float((pr == targets).double().mean())
            c.accuracy_converted = float((po == targets).double().mean())
            if ref.dim() == 2 and ref.shape[1] >= 5:
                c.top5_float = float((r.topk(5, 1).indices == targets[:, None]).any(1).double().mean())
                c.top5_converted = float((o.topk(5, 1).indices == targets[:, None]).any(1).double().mean())
    elif targets is not None:
        raise DataError(f"targets need outputs of shape (N, classes, ...); the outputs have shape {tuple(ref.shape)}")
    return c


def cmd_telemetry(args: argparse.Namespace) -> int:
    from ..deploy.telemetry import telemetry

    float_path, converted_path = _pair_paths(args)
    fmodel, qmodel = _load_pair(args, float_path, converted_path)
    data = data_from_args(args.data, args)
    batches = _batches(data, args)
    try:
        report = telemetry(qmodel, batches, reference=fmodel)
    except ValueError as e:  # no chip layers, inputs the model rejects
        raise CLIError(f"telemetry failed: {' '.join(str(e).split())}") from None
    if args.json:
        print(json.dumps(dict(samples=data.samples, layers=report.to_dicts()), indent=2, default=str))
    else:
        print(f"{converted_path} on {data.samples} inputs, against {model_name(float_path, args)}:")
        print(report)
    if args.png:
        print(f"wrote {report.plot(args.png)}: the counters as a heatmap, layers by counter")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    float_path, converted_path = _pair_paths(args)
    fmodel, qmodel = _load_pair(args, float_path, converted_path)
    float_name = model_name(float_path, args)
    data = data_from_args(args.data, args)
    batches = data.items(args.batch_size)
    ref = _outputs(fmodel, batches, "FLOAT_MODEL", float_name)
    out = _outputs(qmodel, batches, "CONVERTED_MODEL", converted_path)
    if ref.shape != out.shape:
        raise DataError(f"the models' outputs differ in shape: {tuple(ref.shape)} (FLOAT_MODEL) vs "
                        f"{tuple(out.shape)} (CONVERTED_MODEL)")
    c = compare_outputs(ref, out, data.targets)
    print(f"samples: {c.samples}")
    print(f"output shape: {c.shape}")
    print(f"output SQNR: {c.sqnr_db:.3f} dB")
    print(f"max abs difference: {c.max_abs_diff:.6g}")
    if c.agreement is not None:
        print(f"prediction agreement: {c.agreement:.6f} (argmax over dim 1)")
        print(f"KL(float || converted): {c.kl:.6g} (softmax over dim 1, mean)")
    if c.accuracy_name is not None:
        print(f"{c.accuracy_name} (float): {c.accuracy_float:.6f}")
        print(f"{c.accuracy_name} (converted): {c.accuracy_converted:.6f}")
    if c.top5_float is not None:
        print(f"top-5 accuracy (float): {c.top5_float:.6f}")
        print(f"top-5 accuracy (converted): {c.top5_converted:.6f}")
    if data.images is not None and ref.dim() == 2 and args.sheet != "":
        sheet = _changed_most_sheet(args.sheet, data.images, ref, out, c, args.sheet_count)
        print(f"wrote {sheet}: the {min(args.sheet_count, c.samples)} images whose prediction changed most "
              "(largest KL), with both models' classes")
    return 0


def _changed_most_sheet(path: str, images, ref: torch.Tensor, out: torch.Tensor, c: Comparison, count: int) -> Path:
    """A contact sheet of the images with the largest KL(float || converted): file, true class, both predictions."""
    from .images import contact_sheet

    order = c.kl_per_sample.argsort(descending=True)[:count].tolist()
    pf, pq = ref.double().softmax(1), out.double().softmax(1)

    def cls(i: int) -> str:  # the index, and its folder's name where that says more
        name = images.class_name(i)
        return f"{i}" + (f" {name}"[:18] if name and name != str(i) else "")
    captions = []
    for i in order:
        lines = [images.paths[i].name[:24]]
        if images.targets is not None:
            lines.append(f"true  {cls(int(images.targets[i]))}")
        f, q = int(pf[i].argmax()), int(pq[i].argmax())
        lines += [f"float {cls(f)} {pf[i, f]:.2f}", f"chip  {cls(q)} {pq[i, q]:.2f}", f"KL {float(c.kl_per_sample[i]):.3f}"]
        captions.append(lines)
    try:
        return contact_sheet(_check_writable(path, "--sheet"), [images.paths[i] for i in order], captions)
    except OSError as e:
        raise FileError(f"cannot write --sheet {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------
def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = _positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def plain(doc: str) -> str:
    """A docstring paragraph for --help: reStructuredText's double backticks dropped."""
    return doc.replace("``", "")


def _loading_options(p: argparse.ArgumentParser, factory: bool = True) -> None:
    p.add_argument("--model-class", metavar="PKG.MODULE:CALLABLE",
                   help="builds the float model (called with no arguments) for a MODEL file that holds a state_dict")
    if factory:
        p.add_argument("--model-factory", metavar="PKG.MODULE:CALLABLE",
                       help="builds a ready model instead of MODEL, e.g. a pretrained network from a wheel or "
                            "timm.create_model (importing it runs that package's code: your choice); a MODEL file "
                            "given too must be a state_dict for it")
        p.add_argument("--factory-arg", action="append", default=[], metavar="NAME=VALUE",
                       help="a keyword argument for --model-factory (repeatable); VALUE is a Python literal "
                            "(3, 0.5, True, None, 'text') or else plain text")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading whole pickled modules (torch.save(model)); this runs code from the file, "
                        "so use it only for files you trust")


DATA_HELP = ("a .pt file (a float tensor (N, ...), or a dict with 'inputs' and optionally 'targets'), or images: "
             "a folder (flat, or one subfolder per class, which gives the targets), a quoted glob, or one file")


def _data_options(p: argparse.ArgumentParser) -> None:
    from .images import NORMALIZATIONS

    p.add_argument("--image-size", type=_positive_int, default=224, metavar="PX",
                   help="image DATA: shorter side resized to PX, then the centre PX x PX (default 224)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="imagenet",
                   help="image DATA: imagenet mean/std (default), tf for (rgb - 127) / 128, or none for [0, 1]")
    p.add_argument("--skip-bad", action="store_true",
                   help="image DATA: leave out (and name) images that cannot be read, instead of stopping")


def add_commands(sub) -> None:
    """Register ``convert``, ``report`` and ``compare`` on the ``torchlns`` subparsers."""
    p = sub.add_parser(
        "convert", help="convert a float model to LNS8 (or FP8/INT8) chip layers and save it",
        description="Fold batch norm, optionally cluster kernels, calibrate on DATA and swap in chip layers. "
                    "Writes OUT (the converted module, torch.save(model)) and OUT with suffix .state_dict.pt "
                    "(its state_dict, loadable with weights_only=True), and prints the fold, conversion and "
                    "size reports.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a state_dict file (with --model-class) or a pickled nn.Module (or --model-factory)")
    p.add_argument("--calib", required=True, metavar="DATA", help="calibration inputs: " + DATA_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to save the converted model")
    p.add_argument("--format", choices=list(FORMATS), default="lns8",
                   help="lns8 (ideal MAC, default), lns8-chip (LUT + fixed accumulator), lns8-mitchell, "
                        "fp8-e4m3, fp8-e5m2 or int8")
    p.add_argument("--calibrator", choices=CALIBRATORS, default="max",
                   help="static activation calibrator (default max)")
    p.add_argument("--activation", choices=("static", "dynamic"), default="static",
                   help="static per-tensor activation parameters (default) or dynamic per block")
    p.add_argument("--cluster", type=_positive_int, metavar="C", help="cluster k×k conv kernels into C centroids")
    p.add_argument("--cluster-scope", choices=("layer", "network"), help="k-means per layer (default) or network")
    p.add_argument("--keep-float", nargs="+", action="extend", metavar="NAME",
                   help="layer names or fnmatch patterns to keep in float (repeatable)")
    _loading_options(p)
    p.add_argument("--max-batches", type=_positive_int, metavar="N", help="calibrate on the first N batches only")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B",
                   help="calibration batch size (default 16)")
    p.add_argument("--image", metavar="IMAGE", help="also write the converted model's weight image (torchlns.export)")
    _data_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export", help="write a converted model's weight image: what the chip's memory holds",
        description="Write torchlns.export(MODEL) to OUT: a 16-byte header, a JSON manifest and every stored "
                    "field packed at its bit width, so the payload is the size report's total. Load it back "
                    "with torchlns.load_image(OUT, skeleton).")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a converted model: convert's -o file (pass --trust-pickle), or --model-factory")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the image file to write")
    _loading_options(p)
    p.set_defaults(func=cmd_export)

    from ..deploy.cost import CHIPS

    p = sub.add_parser(
        "cost", help="MACs, bytes, on-chip fit, DRAM traffic, latency and energy of a model on a chip",
        description="Run MODEL once and print torchlns.cost_report per layer: MACs, weight and activation bytes, "
                    "whether the weights fit the chip's SRAM, DRAM traffic, a roofline latency and an energy "
                    "estimate from Horowitz (ISSCC 2014). With --compare, MODEL is a float model, converted to "
                    "FP8, INT8, LNS8 and LNS8 with clustering on --calib DATA, and all of them are compared in "
                    "one table.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a float or converted model (convert's -o file: --trust-pickle), or --model-factory")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                   help="the input the model is costed on (default: --calib DATA's first sample)")
    p.add_argument("--chip", choices=list(CHIPS), default="edge",
                   help="; ".join(f"{c.name}: {c.note}" for c in CHIPS.values()) + " (default edge)")
    p.add_argument("--weight-sram-kib", type=nonnegative_int, metavar="KIB", help="override the chip's weight SRAM")
    p.add_argument("--activation-sram-kib", type=nonnegative_int, metavar="KIB",
                   help="override the chip's activation SRAM")
    p.add_argument("--compare", action="store_true",
                   help="convert MODEL (a float model) to every format on --calib DATA and compare them")
    p.add_argument("--calib", metavar="DATA", help="calibration inputs for --compare: " + DATA_HELP)
    p.add_argument("--clusters", type=_positive_int, metavar="C", help="centroids per layer in --compare (default 16)")
    p.add_argument("--max-batches", type=_positive_int, metavar="N", help="calibrate on the first N batches only")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="calibration batch size")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _loading_options(p)
    _data_options(p)
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser(
        "report", help="print the stored size of a float or converted model, per layer",
        description="Print torchlns.size_report of MODEL: every stored field at its own bit width, per layer "
                    "and in total, against float32.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a state_dict file (with --model-class) or a pickled nn.Module (or --model-factory)")
    _loading_options(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare", help="compare a converted model's outputs with the float model's",
        description="Run both models on DATA (batched, eval mode, no grad) and print the output SQNR, the "
                    "largest absolute difference, argmax agreement over dim 1, KL(float || converted) and, when "
                    "DATA has targets (a 'targets' tensor or class folders), each model's top-1 (or pixel) and "
                    "top-5 accuracy. For images and class outputs it also draws the images whose prediction "
                    "changed most (--sheet).")
    _pair_arguments(p, "usually convert's OUT file, a pickled module: pass --trust-pickle")
    p.add_argument("--data", required=True, metavar="DATA", help=DATA_HELP)
    _loading_options(p)
    _data_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="batch size (default 16)")
    p.add_argument("--sheet", default="torchlns-compare.png", metavar="PNG",
                   help="image DATA, class outputs: the contact sheet of the images whose prediction changed most "
                        "(default torchlns-compare.png; '' for none)")
    p.add_argument("--sheet-count", type=_positive_int, default=10, metavar="N", help="images on the sheet (default 10)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "telemetry", help="what the datapath does inside a converted model: saturation, flushes, truncation, "
                          "overflow, headroom",
        description="Run CONVERTED_MODEL on DATA and count exactly, per chip layer and in total: activation "
                    "codes that saturate or flush to zero and, with a fixed accumulator, products truncated to "
                    "zero, products, chunk sums and totals that overflow (saturate or wrap), and the largest "
                    "|total| as a share of the accumulator's range; plus each layer's output SQNR against "
                    "FLOAT_MODEL's layer on the same input. Counting changes no output bit.")
    _pair_arguments(p, "convert's OUT file, a pickled module: pass --trust-pickle")
    p.add_argument("--data", required=True, metavar="DATA", help=DATA_HELP)
    p.add_argument("--png", default="torchlns-telemetry.png", metavar="PNG",
                   help="the heatmap to write (default torchlns-telemetry.png; '' for none)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    _loading_options(p)
    _data_options(p)
    p.add_argument("--max-batches", type=_positive_int, metavar="N", help="use the first N batches only")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="batch size (default 16)")
    p.set_defaults(func=cmd_telemetry)

    p = sub.add_parser(
        "recover", help="win back a converted model's fidelity from unlabelled data (bias, rounding, distillation)",
        description="Run torchlns.recover on CONVERTED_MODEL against FLOAT_MODEL (the model it was converted from) "
                    "on --calib DATA: bias correction, adaptive rounding and distillation, or --methods. Prints "
                    "fidelity on DATA before and after each method and saves OUT like convert does. Keep DATA "
                    "apart from the data you evaluate on.")
    _pair_arguments(p, "convert's OUT file, a pickled module: pass --trust-pickle")
    p.add_argument("--calib", required=True, metavar="DATA", help="unlabelled calibration inputs: " + DATA_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to save the recovered model")
    p.add_argument("--methods", default="bias,rounding,distill", metavar="M[,M...]",
                   help="bias, rounding and/or distill, in order (default all three)")
    p.add_argument("--rounding-iterations", type=_positive_int, default=300, metavar="N",
                   help="adaptive-rounding steps per block (default 300)")
    p.add_argument("--distill-steps", type=_positive_int, default=200, metavar="N", help="distillation steps")
    _loading_options(p)
    _data_options(p)
    p.add_argument("--max-batches", type=_positive_int, metavar="N", help="use the first N batches only")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="batch size (default 16)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser(
        "sensitivity", help="per-layer SQNR of a conversion, and what keeping the worst layers float buys",
        description="Convert MODEL once, then score hybrids on DATA: for every chip layer the output SQNR with "
                    "only that layer on the chip, and with it and every layer before it. Prints the layers worst "
                    "first and, for k = 0..K, the SQNR and size of keeping the k worst layers float.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a state_dict file (with --model-class) or a pickled nn.Module (or --model-factory)")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="a .pt file: a float tensor (N, ...), or a dict with 'inputs' (a tensor, a list of tensors "
                        "or a dict of tensors); or images: a folder, a quoted glob, or one file")
    p.add_argument("--format", choices=list(FORMATS), default="lns8", help="the format to analyse (default lns8)")
    p.add_argument("--calibrator", choices=CALIBRATORS, default="max", help="static activation calibrator")
    p.add_argument("--activation", choices=("static", "dynamic"), default="static", help="activation encoding")
    p.add_argument("-k", type=int, default=3, metavar="K", help="suggest keeping up to K worst layers (default 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _loading_options(p)
    p.add_argument("--max-batches", type=_positive_int, metavar="N", help="use the first N batches only")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="batch size (default 16)")
    _data_options(p)
    p.set_defaults(func=cmd_sensitivity)
