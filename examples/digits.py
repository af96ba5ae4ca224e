"""Real data with no download: scikit-learn's handwritten digits (1,797 real 8x8 scans),
upsampled to 32x32 RGB, and a small DeiT trained on them here (no hub weights).

Used by the demo (fidelity of a converted model on real images) and by the examples.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_out")


def load_digits_tensors(size: int = 32, seed: int = 0):
    """(x_train, y_train, x_test, y_test): float images (N, 3, size, size), normalised."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0       # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def small_deit(num_classes: int = 10, size: int = 32):
    import timm
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=4,
                             embed_dim=96, depth=6, num_heads=3, num_classes=num_classes)


def train(model, x, y, epochs: int = 30, batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            xb = x[idx]
            # light augmentation: random shifts of up to 2 px
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(f"  epoch {ep + 1}/{epochs} loss {total / len(y):.3f}")
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def trained_small_deit(log=print):
    """The small DeiT trained on digits (cached in bench_out/ after the first run)."""
    path = os.path.join(CACHE, "deit_digits.pth")
    model = small_deit()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    x, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    train(model, x, y, log=log)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()
