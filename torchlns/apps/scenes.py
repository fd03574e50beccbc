"""Driving data: generated scenes for segmentation and for 2-D/3-D detection, and a
Cityscapes-style folder loader.

# Note: generated scenes
A scene is a road under a horizon, seen from a car: sky above a skyline of buildings, a road
narrowing to a vanishing point, dashed lane marks drawn in perspective, up to three vehicles
on the road (boxes whose size grows towards the camera), verges on both sides, brightness
jitter and sensor noise. The bottom rows are the ego vehicle's bonnet, labelled
``IGNORE_INDEX`` as Cityscapes labels its ego vehicle. Scenes are generated in batches with
vectorized torch ops from a seeded generator, so a dataset is reproducible bit for bit and
costs milliseconds per hundred images.

# Note: generated box scenes
Detection scenes are rendered, not painted: a level pinhole camera (``Camera``) at 1.65 m
over a flat ground looks along +x, and every pixel's ray is intersected with the ground and
with each object, a yawed 3-D box, in vectorized torch ops (the nearest hit wins, so
occlusion is right). The frame is the one of the box metrics: x forward, y left, z up, the
left camera at ``(0, 0, camera.height)``, the right one ``camera.baseline`` to its right.
A box is ``(cx, cy, cz, dx, dy, dz, yaw)`` (see Note: box conventions in ``metrics.py``):
``dx`` is its length along its heading, ``cz = dz / 2`` (it stands on the ground).

A scene is a four-lane road along x (the ego car in lane y = 0; traffic on lanes y <= 0
heads away, on the others towards the camera; one vehicle in five is turning, at any yaw),
sidewalks and grass beside it, with up to ``max_objects`` cars, trucks and pedestrians
(pedestrians on the sidewalks, at any yaw) at 7-42 m, placed without overlapping in the
bird's-eye view and only where the projected 3-D centre is in the image. The faces of a box
are shaded by their direction (top brightest, front brighter than back, so the heading can
be seen), cars have dark windows in their upper half, and each object casts a contact
shadow on the ground. An object less than 30% visible (or under 12 pixels) after occlusion
is removed and the scene rendered again, so every ground-truth box can be seen and every
visible object is in the ground truth. 2-D boxes are the projected 3-D boxes' extents,
clipped to the image. Like the segmentation scenes, a dataset is reproducible bit for bit
from its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = ["CLASSES", "PALETTE", "IGNORE_INDEX", "generate_scenes", "SceneDataset", "CityscapesFolder",
           "CITYSCAPES_TO_SCENE", "BOX_CLASSES", "BOX_MEAN_SIZE", "Camera", "BoxScenes", "generate_box_scenes",
           "BoxSceneDataset", "box_corners"]

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


# ----------------------------------------------------------------------------------------
# detection scenes (see Note: generated box scenes)
# ----------------------------------------------------------------------------------------
BOX_CLASSES = ("car", "truck", "pedestrian")
BOX_MEAN_SIZE = ((3.9, 1.65, 1.5), (8.25, 2.5, 3.1), (0.7, 0.6, 1.75))  # (length, width, height), metres
_CLASS_P = (0.6, 0.15, 0.25)
_LANES = (-3.5, 0.0, 3.5, 7.0)
_ROAD = (-5.25, 8.75)      # road edges, y in metres
_SIDEWALK = (-8.25, 11.75)  # outer sidewalk edges


@dataclass(frozen=True)
class Camera:
    """A level pinhole camera ``height`` metres over the ground, looking along +x (see Note: generated
    box scenes). Pixel ``(u, v)`` is column, row; the horizon is the row ``v = cy``."""

    fx: float
    fy: float
    cx: float
    cy: float
    height: float = 1.65
    baseline: float = 0.54

    @classmethod
    def for_image(cls, height: int, width: int, hfov_deg: float = 72.0, horizon: float = 0.4) -> "Camera":
        f = width / 2 / math.tan(math.radians(hfov_deg) / 2)
        return cls(f, f, width / 2, horizon * height)

    def origin_y(self, right: bool = False) -> float:
        return -self.baseline if right else 0.0

    def project(self, points: torch.Tensor, right: bool = False) -> torch.Tensor:
        """World points (..., 3) to pixels (..., 2); points must lie in front of the camera (x > 0)."""
        x, y, z = points.unbind(-1)
        return torch.stack([self.cx - self.fx * (y - self.origin_y(right)) / x,
                            self.cy - self.fy * (z - self.height) / x], -1)

    def backproject(self, uv: torch.Tensor, depth: torch.Tensor, right: bool = False) -> torch.Tensor:
        """Pixels (..., 2) at forward distances ``depth`` (...) to world points (..., 3)."""
        u, v = uv.unbind(-1)
        return torch.stack([depth, self.origin_y(right) - (u - self.cx) / self.fx * depth,
                            self.height - (v - self.cy) / self.fy * depth], -1)


@dataclass
class BoxScenes:
    """Rendered scenes and their ground truth, padded to ``K`` objects a scene.

    ``images`` (n, 3, H, W) float32 in [0, 1] (``right``: the stereo partner, or None);
    ``labels`` (n, K) int64 indices into ``BOX_CLASSES``, -1 for an empty slot; ``boxes3d``
    (n, K, 7) and ``boxes2d`` (n, K, 4) float32, zero in empty slots.
    """

    images: torch.Tensor
    right: Optional[torch.Tensor]
    labels: torch.Tensor
    boxes3d: torch.Tensor
    boxes2d: torch.Tensor
    camera: Camera

    def __len__(self) -> int:
        return self.images.shape[0]

    def target(self, i: int) -> dict:
        """Scene ``i``'s ground truth: ``labels`` (k,), ``boxes2d`` (k, 4), ``boxes3d`` (k, 7)."""
        keep = self.labels[i] >= 0
        return {"labels": self.labels[i][keep], "boxes2d": self.boxes2d[i][keep], "boxes3d": self.boxes3d[i][keep]}

    def targets(self) -> List[dict]:
        return [self.target(i) for i in range(len(self))]


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """The 8 corners (..., 8, 3) of boxes (..., 7)."""
    c, size, yaw = boxes[..., :3], boxes[..., 3:6], boxes[..., 6]
    signs = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=boxes.dtype)
    local = signs * size.unsqueeze(-2) / 2
    cos, sin = yaw.cos().unsqueeze(-1), yaw.sin().unsqueeze(-1)
    x = cos * local[..., 0] - sin * local[..., 1]
    y = sin * local[..., 0] + cos * local[..., 1]
    return c.unsqueeze(-2) + torch.stack([x, y, local[..., 2]], -1)


def _place(n: int, k_max: int, camera: Camera, width: int, u) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels (n, K) and boxes (n, K, 7): sampled slot by slot, each slot rejected where it would
    overlap an earlier object in the bird's-eye view or fall outside the image."""
    labels = torch.full((n, k_max), -1, dtype=torch.int64)
    boxes = torch.zeros(n, k_max, 7)
    mean = torch.tensor(BOX_MEAN_SIZE)
    cum = torch.tensor(_CLASS_P).cumsum(0)
    tan_half = (width / 2 - 3) / camera.fx  # keep the projected centre 3 pixels inside the image
    for k in range(k_max):
        cls = torch.searchsorted(cum, u(n) * cum[-1]).clamp(max=len(BOX_CLASSES) - 1)
        size = mean[cls] * (0.9 + 0.2 * u(n, 3))
        truck = cls == 1
        size[truck, 0] = 6.5 + 3.5 * u(int(truck.sum()))
        x = 7 + 35 * u(n)
        lane = torch.tensor(_LANES)[(u(n) * len(_LANES)).long().clamp(max=len(_LANES) - 1)]
        y_vehicle = lane + (u(n) - 0.5)
        yaw_vehicle = torch.where(lane <= 0, 0.0, math.pi) + 0.3 * (u(n) - 0.5)
        turning = u(n) < 0.2
        any_yaw = math.pi * (2 * u(n) - 1)
        yaw_vehicle = torch.where(turning, any_yaw, yaw_vehicle)
        left = u(n) < 0.5
        y_ped = torch.where(left, _ROAD[1] + 0.4 + (_SIDEWALK[1] - _ROAD[1] - 0.8) * u(n),
                            _SIDEWALK[0] + 0.4 + (_ROAD[0] - _SIDEWALK[0] - 0.8) * u(n))
        ped = cls == 2
        y = torch.where(ped, y_ped, y_vehicle)
        yaw = torch.where(ped, any_yaw, yaw_vehicle)
        cand = torch.cat([torch.stack([x, y, size[:, 2] / 2], 1), size, yaw[:, None]], 1)
        ok = (u(n) < 0.8) & (y.abs() < x * tan_half)
        radius = 0.5 * torch.hypot(size[:, 0], size[:, 1]) + 0.4
        if k:
            prev = boxes[:, :k]
            r_prev = 0.5 * torch.hypot(prev[..., 3], prev[..., 4]) + 0.4
            dist = torch.hypot(prev[..., 0] - x[:, None], prev[..., 1] - y[:, None])
            ok &= ~((labels[:, :k] >= 0) & (dist < r_prev + radius[:, None])).any(1)
        labels[ok, k] = cls[ok]
        boxes[ok, k] = cand[ok]
    return labels, boxes


def _look(n: int, k_max: int, u) -> dict:
    """Per-scene and per-object appearance, drawn once so that a stereo pair shares it."""
    paint = torch.tensor([[0.75, 0.1, 0.1], [0.1, 0.2, 0.6], [0.85, 0.85, 0.85], [0.15, 0.15, 0.15],
                          [0.9, 0.6, 0.1], [0.2, 0.5, 0.3], [0.55, 0.55, 0.6], [0.5, 0.3, 0.6]])
    colour = paint[(u(n, k_max) * len(paint)).long().clamp(max=len(paint) - 1)] * (0.85 + 0.3 * u(n, k_max, 1))
    return {"colour": colour.clamp(0, 1), "road": 0.3 + 0.1 * u(n, 1), "grass": 0.8 + 0.4 * u(n, 1),
            "skyline": 0.02 + 0.1 * u(n, 16), "building": 0.35 + 0.35 * u(n, 16), "gain": 0.75 + 0.5 * u(n, 1, 1, 1)}


def _rays(camera: Camera, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray directions through the pixel centres, each (1, H*W): x (all ones), y, z."""
    vv, uu = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    dy, dz = -(uu - camera.cx) / camera.fx, -(vv - camera.cy) / camera.fy
    return torch.ones(1, height * width), dy.reshape(1, -1), dz.reshape(1, -1)


def _trace(camera: Camera, height: int, width: int, labels, boxes, right: bool) -> dict:
    """One ray a pixel against the ground and every box: the nearest object (``index``, -1 for
    none), the shade of the face it hits, whether that is a window, contact shadows on the
    ground, the ground hit point, and each object's unoccluded pixel count (``own``)."""
    n, k_max = labels.shape
    _, ry, rz = _rays(camera, height, width)
    oy, oz = camera.origin_y(right), camera.height
    down = rz < 0
    t_ground = torch.where(down, oz / (-rz).clamp_min(1e-9), torch.full_like(rz, math.inf))
    gx, gy = t_ground, oy + t_ground * ry
    best_t = t_ground.expand(n, -1).clone()
    index = torch.full((n, rz.shape[1]), -1, dtype=torch.int64)
    shade = torch.zeros(n, rz.shape[1])
    window = torch.zeros(n, rz.shape[1], dtype=torch.bool)
    shadow = torch.zeros(n, rz.shape[1], dtype=torch.bool)
    own = torch.zeros(n, k_max, dtype=torch.int64)
    rz_safe = torch.where(rz.abs() < 1e-9, torch.full_like(rz, 1e-9), rz)
    for k in range(k_max):
        present = (labels[:, k] >= 0)[:, None]
        b = boxes[:, k, :, None]  # (n, 7, 1)
        cos, sin = b[:, 6].cos(), b[:, 6].sin()
        hx, hy, hz = b[:, 3] / 2, b[:, 4] / 2, b[:, 5] / 2
        px, py, pz = -b[:, 0], oy - b[:, 1], oz - b[:, 2]
        ox, oyl = cos * px + sin * py, -sin * px + cos * py  # the origin in the box's frame
        dx, dy = cos + sin * ry, -sin + cos * ry             # the ray in the box's frame (its x part is 1)
        dx = torch.where(dx.abs() < 1e-9, 1e-9, dx)
        dy = torch.where(dy.abs() < 1e-9, 1e-9, dy)
        ax, bx = (-hx - ox) / dx, (hx - ox) / dx
        ay, by = (-hy - oyl) / dy, (hy - oyl) / dy
        az, bz = (-hz - pz) / rz_safe, (hz - pz) / rz_safe
        nx, ny, nz = torch.minimum(ax, bx), torch.minimum(ay, by), torch.minimum(az, bz)
        far = torch.minimum(torch.minimum(torch.maximum(ax, bx), torch.maximum(ay, by)), torch.maximum(az, bz))
        t_near = torch.maximum(torch.maximum(nx, ny), nz)
        hit = present & (t_near <= far) & (t_near > 0)
        own[:, k] = hit.sum(1)
        closer = hit & (t_near < best_t)
        best_t = torch.where(closer, t_near, best_t)
        index = index.masked_fill(closer, k)
        on_x, on_z = nx >= torch.maximum(ny, nz), nz >= torch.maximum(nx, ny)
        face = torch.where(on_z, 1.0, torch.where(on_x, torch.where(dx < 0, 0.95, 0.6), 0.75))
        shade = torch.where(closer, face, shade)
        car = (labels[:, k] == 0)[:, None]
        window = torch.where(closer, car & (pz + t_near * rz > 0.1 * hz) & ~on_z, window)
        qx, qy = gx - b[:, 0], gy - b[:, 1]  # contact shadow: the footprint, slightly enlarged
        shadow |= present & ((cos * qx + sin * qy).abs() < hx + 0.25) & ((cos * qy - sin * qx).abs() < hy + 0.25)
    return {"index": index, "shade": shade, "window": window, "shadow": shadow, "gx": gx, "gy": gy, "down": down,
            "own": own}


def _paint(camera: Camera, height: int, width: int, hits: dict, look: dict) -> torch.Tensor:
    """The image (n, 3, H, W) of a trace, before gain and noise."""
    index, gx, gy, down = hits["index"], hits["gx"], hits["gy"], hits["down"]
    n = index.shape[0]
    colour = look["colour"].gather(1, index.clamp_min(0)[..., None].expand(-1, -1, 3))  # (n, P, 3)
    obj = torch.where(hits["window"][..., None], torch.tensor([0.12, 0.14, 0.2]), colour * hits["shade"][..., None])
    on_road = (gy > _ROAD[0]) & (gy < _ROAD[1])
    walk = ~on_road & (gy > _SIDEWALK[0]) & (gy < _SIDEWALK[1])
    ground = torch.where(on_road[..., None], look["road"][..., None].expand(n, 1, 3),
                         torch.where(walk[..., None], torch.tensor([0.62, 0.6, 0.58]),
                                     torch.tensor([0.25, 0.45, 0.18]) * look["grass"][..., None]))
    dashed = torch.frac(gx / 9.0) < 0.45
    white = torch.zeros_like(on_road)
    for m in (_LANES[0] + 1.75, _LANES[2] + 1.75):
        white |= ((gy - m).abs() < 0.08) & dashed
    for m in (_ROAD[0] + 0.15, _ROAD[1] - 0.15):
        white |= (gy - m).abs() < 0.08
    yellow = ((gy - 1.75).abs() - 0.12).abs() < 0.06
    ground = torch.where((white & on_road)[..., None], torch.tensor([0.9, 0.9, 0.9]), ground)
    ground = torch.where((yellow & on_road)[..., None], torch.tensor([0.85, 0.7, 0.15]), ground)
    ground = ground * torch.where(hits["shadow"], 0.45, 1.0)[..., None]
    # the sky, with a skyline of buildings just above the horizon (in image columns)
    sky_v = ((camera.cy - (torch.arange(height) + 0.5)) / camera.cy).repeat_interleave(width).view(1, -1)
    sky = torch.tensor([0.45, 0.65, 0.95]) + 0.25 * (1 - sky_v.clamp(0, 1))[..., None]
    col = (torch.arange(width) * 16 // width).repeat(height)
    building = (sky_v < look["skyline"][:, col]) & ~down
    far = torch.where(building[..., None], look["building"][:, col, None] * torch.tensor([1.0, 0.95, 0.9]), sky)
    img = torch.where((index >= 0)[..., None], obj, torch.where(down[..., None], ground, far))
    return img.view(n, height, width, 3).permute(0, 3, 1, 2)


def generate_box_scenes(n: int, height: int = 80, width: int = 256, seed: int = 0, *, max_objects: int = 8,
                        stereo: bool = False, camera: Optional[Camera] = None) -> BoxScenes:
    """``n`` rendered detection scenes with their ground truth (see Note: generated box scenes)."""
    if n < 0 or height < 16 or width < 16 or max_objects < 1:
        raise ValueError(f"need n >= 0, max_objects >= 1 and an image of at least 16x16, got n={n}, "
                         f"max_objects={max_objects}, {height}x{width}")
    camera = camera or Camera.for_image(height, width)
    g = torch.Generator().manual_seed(seed)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    labels, boxes = _place(n, max_objects, camera, width, u)
    look = _look(n, max_objects, u)
    hits = _trace(camera, height, width, labels, boxes, right=False)
    visible = torch.nn.functional.one_hot(hits["index"] + 1, max_objects + 1)[..., 1:].sum(1)
    hidden = (labels >= 0) & ((visible < 12) | (visible < 0.3 * hits["own"]))
    labels = labels.masked_fill(hidden, -1)
    boxes = boxes.masked_fill(hidden[..., None], 0.0)
    again = hidden.any(1)
    if again.any():  # only the scenes that lost an object are traced again
        redo = _trace(camera, height, width, labels[again], boxes[again], right=False)
        for key in ("index", "shade", "window", "shadow"):
            hits[key][again] = redo[key]
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))

    def finish(hits: dict, right: bool):
        img = _paint(camera, height, width, hits, look)
        gn = torch.Generator().manual_seed(noise_seed + right)
        return (img * look["gain"] + 0.03 * torch.randn(img.shape, generator=gn)).clamp(0, 1)

    corners = box_corners(boxes)
    corners[..., 0].clamp_(min=0.1)  # objects start 7 m ahead: this only guards empty slots
    uv = camera.project(corners)  # (n, K, 8, 2)
    limit = torch.tensor([float(width), float(height)])
    lo, hi = uv.min(-2).values.clamp(min=0).minimum(limit), uv.max(-2).values.clamp(min=0).minimum(limit)
    boxes2d = torch.cat([lo, hi], -1).masked_fill((labels < 0)[..., None], 0.0)
    right = finish(_trace(camera, height, width, labels, boxes, right=True), True) if stereo else None
    return BoxScenes(finish(hits, False), right, labels, boxes, boxes2d, camera)


class BoxSceneDataset(torch.utils.data.Dataset):
    """``n`` generated detection scenes, made once in seeded chunks of 128; items are
    ``(image, target)`` (``((left, right), target)`` with ``stereo``), a target as in ``BoxScenes.target``."""

    def __init__(self, n: int, height: int = 80, width: int = 256, seed: int = 0, *, max_objects: int = 8,
                 stereo: bool = False):
        parts = [generate_box_scenes(min(128, n - i), height, width, seed * 1_000_003 + i, max_objects=max_objects,
                                     stereo=stereo) for i in range(0, max(n, 1), 128)]
        cat = (lambda name: torch.cat([getattr(p, name) for p in parts])[:n])
        self.scenes = BoxScenes(cat("images"), cat("right") if stereo else None, cat("labels"), cat("boxes3d"),
                                cat("boxes2d"), parts[0].camera)

    @property
    def camera(self) -> Camera:
        return self.scenes.camera

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i):
        s = self.scenes
        image = (s.images[i], s.right[i]) if s.right is not None else s.images[i]
        return image, s.target(i)
