"""Segmentation data: generated driving-like scenes, and a Cityscapes-style folder loader.

# Note: generated scenes
A scene is a road under a horizon, seen from a car: sky above a skyline of buildings, a road
narrowing to a vanishing point, dashed lane marks drawn in perspective, up to three vehicles
on the road (boxes whose size grows towards the camera), verges on both sides, brightness
jitter and sensor noise. The bottom rows are the ego vehicle's bonnet, labelled
``IGNORE_INDEX`` as Cityscapes labels its ego vehicle. Scenes are generated in batches with
vectorized torch ops from a seeded generator, so a dataset is reproducible bit for bit and
costs milliseconds per hundred images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = ["CLASSES", "PALETTE", "IGNORE_INDEX", "generate_scenes", "SceneDataset", "CityscapesFolder",
           "CITYSCAPES_TO_SCENE"]

CLASSES = ("road", "lane mark", "vehicle", "sky", "background")
PALETTE = ((128, 64, 128), (255, 255, 255), (0, 0, 142), (70, 130, 180), (107, 142, 35))
IGNORE_INDEX = 255


def generate_scenes(n: int, height: int = 64, width: int = 128, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes: images (n, 3, H, W) float32 in [0, 1] and labels (n, H, W) int64 (see Note: generated scenes)."""
    if n < 0 or height < 16 or width < 16:
        raise ValueError(f"need n >= 0 and an image of at least 16x16, got n={n}, {height}x{width}")
    g = torch.Generator().manual_seed(seed)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    yy = torch.linspace(0, 1, height).view(1, height, 1)
    xx = torch.linspace(0, 1, width).view(1, 1, width)
    horizon = 0.32 + 0.16 * u(n, 1, 1)
    depth = ((yy - horizon) / (1 - horizon)).clamp(min=0)  # 0 at the horizon, 1 at the bottom
    vanish = 0.3 + 0.4 * u(n, 1, 1)
    bottom = 0.4 + 0.2 * u(n, 1, 1)
    centre = vanish + (bottom - vanish) * depth
    half = (0.3 + 0.25 * u(n, 1, 1)) * depth
    below = yy > horizon

    labels = torch.full((n, height, width), 4, dtype=torch.int64)  # background: verges, buildings
    blocks = 8
    skyline = (0.05 + 0.25 * u(n, 1, blocks)).repeat_interleave(-(-width // blocks), dim=2)[..., :width]
    sky = (yy < horizon - skyline) & ~below
    labels[sky] = 3
    road = below & ((xx - centre).abs() < half)
    labels[road] = 0
    # Dashed lane marks at fixed fractions of the road width; dashes shorten with distance.
    phase = 6.0 / (depth + 0.08) + 10 * u(n, 1, 1)
    dashed = torch.frac(phase / math.pi) < 0.45
    mark_width = 0.004 + 0.012 * depth
    lanes = torch.zeros_like(road)
    for frac in (-1 / 3, 1 / 3):
        lanes |= (xx - (centre + frac * 2 * half)).abs() < mark_width
    labels[road & lanes & dashed] = 1
    # Vehicles: a box on the road at a random depth, sized by its depth.
    vehicle_colour = torch.zeros(n, 3, height, width)
    for _ in range(3):
        present = u(n, 1, 1) < 0.7
        d = 0.15 + 0.75 * u(n, 1, 1)
        y_bottom = horizon + d * (1 - horizon)
        c = vanish + (bottom - vanish) * d + (u(n, 1, 1) - 0.5) * 1.2 * (0.3 + 0.25 * 0.5) * d
        w = 0.12 * d + 0.02
        h = (0.7 + 0.3 * u(n, 1, 1)) * w * width / height * 0.6
        box = present & ((xx - c).abs() < w / 2) & (yy <= y_bottom) & (yy > y_bottom - h)
        labels[box] = 2
        colour = (0.15 + 0.8 * u(n, 3, 1, 1))
        vehicle_colour = torch.where(box.unsqueeze(1), colour.expand(n, 3, height, width), vehicle_colour)
    labels[:, int(height * 0.95):, :] = IGNORE_INDEX  # the ego vehicle's bonnet

    img = torch.empty(n, 3, height, width)
    sky_rgb = torch.tensor([0.45, 0.65, 0.95]).view(1, 3, 1, 1) + 0.25 * (yy / horizon).clamp(max=1).unsqueeze(1)
    building = (0.3 + 0.4 * u(n, 1, 1, blocks)).repeat_interleave(-(-width // blocks), dim=3)[..., :width]
    verge = torch.tensor([0.25, 0.45, 0.2]).view(1, 3, 1, 1) * (0.8 + 0.4 * u(n, 1, 1, 1))
    road_rgb = (0.28 + 0.1 * u(n, 1, 1, 1)).expand(n, 3, 1, 1)
    lab = labels.unsqueeze(1)
    img[:] = torch.where(below.unsqueeze(1), verge.expand(n, 3, height, width),
                         building.expand(n, 3, height, width) * torch.tensor([1.0, 0.95, 0.9]).view(1, 3, 1, 1))
    img = torch.where(lab == 3, sky_rgb.expand(n, 3, height, width), img)
    img = torch.where(lab == 0, road_rgb.expand(n, 3, height, width), img)
    img = torch.where(lab == 1, torch.full_like(img, 0.92), img)
    img = torch.where(lab == 2, vehicle_colour, img)
    img = torch.where(lab == IGNORE_INDEX, torch.full_like(img, 0.1), img)
    img = img * (0.75 + 0.5 * u(n, 1, 1, 1)) + 0.04 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1), labels


class SceneDataset(torch.utils.data.Dataset):
    """``n`` generated scenes (image, label), made once in seeded chunks of 256."""

    def __init__(self, n: int, height: int = 64, width: int = 128, seed: int = 0):
        parts = [generate_scenes(min(256, n - i), height, width, seed * 1_000_003 + i) for i in range(0, n, 256)]
        self.images = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, 3, height, width)
        self.labels = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, height, width, dtype=torch.long)

    @classmethod
    def from_dataset(cls, ds) -> "SceneDataset":
        """Any dataset of (image, label) pairs of one size (e.g. ``CityscapesFolder``), held as tensors."""
        items = [ds[i] for i in range(len(ds))]
        if not items:
            raise ValueError("the dataset is empty")
        out = cls.__new__(cls)
        out.images = torch.stack([x for x, _ in items]).float()
        out.labels = torch.stack([y for _, y in items]).long()
        return out

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# Cityscapes labelIds -> scene classes (road 7; car, truck, bus, caravan, trailer, train,
# motorcycle, bicycle 26-33; sky 23; the rest background; 0-6 (unlabelled, ego vehicle,
# rectification border, out of roi, static, dynamic, ground) ignored). Cityscapes has no
# lane-mark class: its markings are labelled road.
CITYSCAPES_TO_SCENE = {7: 0, 23: 3, **{i: 2 for i in range(26, 34)}}


class CityscapesFolder(torch.utils.data.Dataset):
    """A Cityscapes-style folder: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` images and
    ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` label maps, mapped to the scene classes.

    Images are resized to ``size`` (H, W) (bilinear; labels nearest) when given.
    """

    def __init__(self, root, split: str = "val", size: Optional[Tuple[int, int]] = None):
        self.root = Path(root)
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir} does not exist: expected a Cityscapes-style folder "
                                    "(leftImg8bit/<split>/<city>/*_leftImg8bit.png)")
        self.items: List[Tuple[Path, Path]] = []
        for img in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            label = self.root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise FileNotFoundError(f"no label map {label} for {img}")
            self.items.append((img, label))
        if not self.items:
            raise FileNotFoundError(f"no *_leftImg8bit.png images under {image_dir}")
        self.size = size
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
        lut[7:] = 4
        for k, v in CITYSCAPES_TO_SCENE.items():
            lut[k] = v
        self.lut = lut

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        img_path, label_path = self.items[i]
        img, label = Image.open(img_path).convert("RGB"), Image.open(label_path)
        if self.size is not None:
            h, w = self.size
            img, label = img.resize((w, h), Image.BILINEAR), label.resize((w, h), Image.NEAREST)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        y = torch.frombuffer(bytearray(label.tobytes()), dtype=torch.uint8).view(label.height, label.width)
        return x.permute(2, 0, 1).float() / 255, self.lut[y.long()]
