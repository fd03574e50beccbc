"""Image files as a model's input batch: a folder (flat, or one subfolder per class), a glob, or one file.

# Note: image data on the command line
Wherever a command takes DATA, a path that is not a ``.pt`` file is read as images:

* a folder of images, flat (no labels), or ``ImageFolder``-style with one subfolder per class
  (the labels); a folder holding both images and class subfolders is refused, since which is
  meant cannot be told;
* a glob (``'photos/*.jpg'``; quote it so that the shell does not expand it), or one image file.

Class indices: when every class folder's name starts with an integer (``281``, ``281-tabby``)
that integer is the class, so a folder tree can name the classes of a pretrained network
(ImageNet's, say); otherwise the folders in sorted order are classes 0, 1, ... (torchvision's
rule). Each image is decoded by Pillow, converted to RGB (grayscale replicated, alpha dropped),
its shorter side resized to ``size`` (bilinear, antialiased) and the centre ``size`` x
``size`` cropped, then normalised by a preset: ``imagenet`` (mean and std of ImageNet on
[0, 1]), ``tf`` (``(rgb - 127) / 128``, TensorFlow-trained networks such as EfficientNet-Lite)
or ``none`` ([0, 1]). Decoding runs on a thread pool (Pillow releases the GIL), with a progress
line. An image Pillow cannot read is named in a one-line error, or, with ``skip_bad``, left
out and named in a warning; files without an image extension are named in a warning too:
nothing is dropped silently. No image at all is an error.
"""

from __future__ import annotations

import glob as globmod
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["ImageSet", "load_images", "is_image_spec", "normalize", "contact_sheet", "NORMALIZATIONS", "IMAGE_EXTENSIONS",
           "ImageDataError"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
NORMALIZATIONS = ("imagenet", "tf", "none")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageDataError(ValueError):
    """Image DATA that cannot be read: no images, a corrupt file, a folder of mixed layout."""


@dataclass
class ImageSet:
    """Images as one float32 batch ``(N, 3, size, size)``, with their paths and, for class
    folders, their labels and class names (``classes[i]`` names class index ``class_ids[i]``)."""

    inputs: torch.Tensor
    paths: List[Path]
    targets: Optional[torch.Tensor] = None
    classes: List[str] = field(default_factory=list)
    class_ids: List[int] = field(default_factory=list)
    skipped: List[Tuple[Path, str]] = field(default_factory=list)

    def class_name(self, index: int) -> Optional[str]:
        """The folder name of class ``index``, if one of the folders is that class."""
        for name, i in zip(self.classes, self.class_ids):
            if i == index:
                return name
        return None


def is_image_spec(path: str) -> bool:
    """Whether DATA names images (a folder, a glob or an image file) rather than a ``.pt`` file."""
    p = Path(path)
    return p.is_dir() or any(c in path for c in "*?[") or p.suffix.lower() in IMAGE_EXTENSIONS


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _others(folder: Path) -> List[Path]:
    """The files of a folder that are not images (hidden files aside): named, not read."""
    return [e for e in sorted(folder.iterdir()) if e.is_file() and not e.name.startswith(".") and not _is_image(e)]


def _listing(spec: str) -> Tuple[List[Path], Optional[List[int]], List[str], List[int]]:
    """(paths, labels or None, class names, class ids) of an image spec."""
    p = Path(spec)
    if p.is_dir():
        entries = sorted(p.iterdir())
        files = [e for e in entries if _is_image(e)]
        others = _others(p) + [f for d in entries if d.is_dir() and not d.name.startswith(".") for f in _others(d)]
        if others:
            names = ", ".join(str(o) for o in others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
            warnings.warn(f"DATA {spec}: left out {len(others)} file(s) that are not images "
                          f"({', '.join(IMAGE_EXTENSIONS)}): {names}", stacklevel=3)
        dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        class_dirs = [d for d in dirs if any(_is_image(f) for f in d.iterdir())]
        if files and class_dirs:
            raise ImageDataError(f"DATA {spec} holds both images and class folders ({class_dirs[0].name}/, ...); "
                                 "give a flat folder of images or one subfolder per class")
        if files:
            return files, None, [], []
        if not class_dirs:
            raise ImageDataError(f"DATA {spec} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                                 "directly or in one subfolder per class)")
        numbered = [re.match(r"\d+", d.name) for d in class_dirs]
        ids = [int(m.group()) for m in numbered] if all(numbered) else list(range(len(class_dirs)))
        if len(set(ids)) != len(ids):
            raise ImageDataError(f"DATA {spec}: two class folders name the same class index "
                                 f"({sorted(i for i in ids if ids.count(i) > 1)[0]})")
        paths, labels = [], []
        for d, i in zip(class_dirs, ids):
            for f in sorted(d.iterdir()):
                if _is_image(f):
                    paths.append(f)
                    labels.append(i)
        return paths, labels, [d.name for d in class_dirs], ids
    if any(c in spec for c in "*?["):
        paths = sorted(Path(f) for f in globmod.glob(spec, recursive=True) if _is_image(Path(f)))
        if not paths:
            raise ImageDataError(f"DATA {spec}: the pattern matches no image files")
        return paths, None, [], []
    if not p.exists():
        raise ImageDataError(f"DATA {spec} does not exist")
    if not _is_image(p):
        raise ImageDataError(f"DATA {spec} is not an image file ({', '.join(IMAGE_EXTENSIONS)}) or a .pt file")
    return [p], None, [], []


def _decode(path: Path, size: int) -> torch.Tensor:
    """One image as a uint8 (3, size, size) tensor: RGB, shorter side resized to size, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")  # grayscale replicated, palette expanded, alpha dropped
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1)


def normalize(images: torch.Tensor, preset: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) images as float32, normalised by ``preset`` (see Note: image data on the command line)."""
    if preset not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {preset!r}")
    x = images.float()
    if preset == "tf":
        return (x - 127) / 128
    x = x / 255
    if preset == "imagenet":
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def load_images(spec: str, size: int = 224, normalization: str = "imagenet", *, skip_bad: bool = False,
                progress: Optional[bool] = None, workers: Optional[int] = None) -> ImageSet:
    """The images ``spec`` names as one batch (see Note: image data on the command line)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the image size must be a positive int, got {size!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {normalization!r}")
    paths, labels, classes, ids = _listing(str(spec))
    from .progress import _progress

    def one(path: Path):
        try:
            return _decode(path, size), None
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a bad file
            return None, " ".join(str(e).split()) or type(e).__name__

    show = sys.stderr.isatty() if progress is None else progress
    results = []
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(one, paths)
        bar = _progress(it, f"reading {len(paths)} images", total=len(paths)) if show else it
        for r in bar:
            results.append(r)
    kept, kept_labels, skipped = [], [], []
    for i, (path, (img, err)) in enumerate(zip(paths, results)):
        if err is not None:
            if not skip_bad:
                raise ImageDataError(f"DATA {spec}: cannot read image {path}: {err} (pass --skip-bad to leave it out)")
            skipped.append((path, err))
            continue
        kept.append(i)
    if skipped:
        names = ", ".join(str(p) for p, _ in skipped[:5]) + (f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {len(paths)}: {names}", stacklevel=2)
    if not kept:
        raise ImageDataError(f"DATA {spec}: none of its {len(paths)} image(s) could be read")
    inputs = normalize(torch.stack([results[i][0] for i in kept]), normalization)
    targets = torch.tensor([labels[i] for i in kept]) if labels is not None else None
    return ImageSet(inputs, [paths[i] for i in kept], targets, classes, ids, skipped)


def contact_sheet(path, images: Sequence[Path], captions: Sequence[Sequence[str]], columns: int = 5,
                  thumb: int = 160) -> Path:
    """A PNG grid of the image files (re-read at ``thumb`` px, centre-cropped), each with its lines of caption."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line = 12
    lines = max((len(c) for c in captions), default=0)
    rows = max(1, -(-len(images) // columns))
    cell_w, cell_h = thumb + 8, thumb + 8 + lines * line + 4
    sheet = Image.new("RGB", (min(columns, max(1, len(images))) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(zip(images, captions)):
        x0, y0 = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        pil = Image.fromarray(_decode(Path(img), thumb).permute(1, 2, 0).contiguous().numpy())
        sheet.paste(pil, (x0, y0))
        for j, text in enumerate(caption):
            draw.text((x0, y0 + thumb + 2 + j * line), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
