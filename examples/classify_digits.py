"""Classification of handwritten digits (scikit-learn's bundled 8x8 digits): float32 vs chip formats.

    python examples/classify_digits.py             # about a minute on a CPU
    python examples/classify_digits.py --smoke     # seconds (what CI runs)
    python examples/classify_digits.py --device cuda --epochs 200

A small CNN is trained on 80% of the 1797 digits, converted with batch-norm folding and
calibration to LNS8 (ideal and chip MACs), FP8, INT8, and LNS8 with cluster compression and
centroid fine-tuning, and every model's top-1 accuracy on the other 20% is printed. The
difference map (``digits_difference_map.png``) shows which test digits the converted model
classifies differently from the float model, and each model's errors.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, FP8_E5M2, INT8, ConvertConfig
from torchlns.metrics import top1_accuracy


def load_digits():
    from sklearn.datasets import load_digits as sk_load  # bundled with scikit-learn: no download

    d = sk_load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def make_model() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def fit(model, x, y, epochs, lr, params=None, device="cpu"):
    model.train().to(device)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, x, device="cpu"):
    return torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(256)])


def difference_map(path: Path, x, y, float_pred, conv_pred, n: int = 360, scale: int = 4) -> None:
    """Three grids of test digits, a red frame marking: converted != float, float errors, converted errors."""
    from PIL import Image

    n = min(n, len(y))
    cols = 20
    digits = (x[:n, 0] * 255).to(torch.uint8)

    def grid(marked):
        tiles = torch.stack([digits] * 3, -1)
        tiles = torch.nn.functional.pad(tiles.permute(0, 3, 1, 2), (2, 2, 2, 2), value=255).permute(0, 2, 3, 1)
        border = torch.ones(tiles.shape[1:3], dtype=torch.bool)
        border[2:-2, 2:-2] = False
        tiles[marked.nonzero()[:, 0][:, None], border.nonzero()[:, 0], border.nonzero()[:, 1]] = torch.tensor(
            [230, 20, 20], dtype=torch.uint8)  # a red frame marks the digit
        rows = [torch.cat(list(tiles[i:i + cols]), 1) for i in range(0, n - n % cols, cols)]
        return torch.cat(rows, 0)

    panels = [grid(float_pred[:n] != conv_pred[:n]), grid(float_pred[:n] != y[:n]), grid(conv_pred[:n] != y[:n])]
    sep = torch.full((panels[0].shape[0], 6, 3), 255, dtype=torch.uint8)
    img = torch.cat([panels[0], sep, panels[1], sep, panels[2]], 1).numpy()
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--clusters", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("torchlns-digits"))
    p.add_argument("--smoke", action="store_true", help="a few epochs, for a quick check")
    args = p.parse_args(argv)
    epochs = 3 if args.smoke else args.epochs
    torch.manual_seed(0)
    (xt, yt), (xv, yv) = load_digits()
    model = fit(make_model(), xt, yt, epochs, 3e-3, device=args.device)
    calib = list(xt[:512].split(64))
    float_pred = predict(model, xv, args.device)
    float_bytes = torchlns.size_report(model).total_bytes
    rows, preds = [], {}
    candidates = [("LNS8 ideal", ConvertConfig()), ("LNS8 chip", ConvertConfig(mac=CHIP_MAC)),
                  ("FP8 e4m3", ConvertConfig(fmt=FP8_E4M3)), ("FP8 e5m2", ConvertConfig(fmt=FP8_E5M2)),
                  ("INT8", ConvertConfig(fmt=INT8))]
    models = [("float32", model)] + [(name, torchlns.convert(model, cfg, calib)) for name, cfg in candidates]
    # Cluster every 3x3 conv, then fine-tune: centroids, scales and the dense layers train,
    # the indices stay fixed. (The first layer has only 16 kernels, so C >= 16 keeps it exact.)
    clustered = torchlns.cluster_kernels(torchlns.fold_batchnorm(model), args.clusters)
    fit(clustered, xt, yt, epochs, 1e-3, device=args.device)
    models.append((f"LNS8 + cluster C={args.clusters}", torchlns.convert(clustered, ConvertConfig(), calib)))
    print(f"{'format':<22} {'top-1 %':>8} {'agreement %':>12} {'bytes':>9} {'vs float32':>10}")
    for name, m in models:
        pred = predict(m, xv, args.device)
        preds[name] = pred
        size = torchlns.size_report(m).total_bytes
        rows.append((name, 100 * top1_accuracy(pred, yv), 100 * (pred == float_pred).double().mean().item(), size))
        print(f"{name:<22} {rows[-1][1]:8.2f} {rows[-1][2]:12.2f} {size:9,.0f} {float_bytes / size:9.1f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    difference_map(args.out / "digits_difference_map.png", xv, yv, float_pred, preds["LNS8 chip"])
    print(f"wrote {args.out / 'digits_difference_map.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
