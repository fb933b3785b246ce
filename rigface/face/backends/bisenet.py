"""BiSeNet face parsing (face-parsing.PyTorch, 19 CelebAMask-HQ classes) and the head mask built from it.

Checkpoint: `79999_iter.pth`, a flat state dict with `cp.resnet.*` (torchvision ResNet-18 names),
`cp.arm16/arm32/conv_head16/conv_head32/conv_avg`, `ffm.*` and `conv_out/conv_out16/conv_out32`.
Input: RGB at 512 with ImageNet mean/std. As in the RigFace authors' preprocessing every class but
background (0) counts as head foreground.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rigface.face.backends.nets import resnet18
from rigface.face.backends.weights import WeightFormatError, load_exact, load_torch_checkpoint, strip_prefix

NUM_CLASSES = 19
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class AttentionRefinementModule(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x):
        _, feat8, feat16, feat32 = self.resnet.features(x)
        avg = self.conv_avg(feat32.mean((2, 3), keepdim=True))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up


class FeatureFusionModule(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], 1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Inference graph: only the main output is computed; the two auxiliary heads exist for the keys."""

    def __init__(self, n_classes: int = NUM_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x):
        feat8, feat_cp8 = self.cp(x)
        out = self.conv_out(self.ffm(feat8, feat_cp8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(path: str | Path) -> BiSeNet:
    state = load_torch_checkpoint(Path(path))
    if not isinstance(state, dict):
        raise WeightFormatError(f"{path}: expected a state dict, got {type(state).__name__}")
    net = BiSeNet()
    load_exact(net, strip_prefix(state, "module."), str(path))
    return net.eval()


class BiSeNetMask:
    """`BiSeNetMask(checkpoint)(crop, landmarks=None) -> (S, S) uint8 0/255`: the mask-backend interface."""

    name = "bisenet"

    def __init__(self, checkpoint: str | Path, input_size: int = 512, device: str = "cpu"):
        self.net = load_bisenet(checkpoint).to(device)
        self.input_size = int(input_size)
        self.device = device
        self.version = f"{Path(checkpoint).name}@{self.input_size}"
        self._lock = threading.Lock()
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def parse(self, crop: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids 0..18 at the crop's size."""
        h, w = crop.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(crop[..., :3])).float().div(255.0).permute(2, 0, 1)[None]
        if (h, w) != (self.input_size, self.input_size):
            x = F.interpolate(x, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self._mean) / self._std
        with self._lock:
            logits = self.net(x.to(self.device)).float().cpu()
        if (h, w) != (self.input_size, self.input_size):
            logits = F.interpolate(logits, (h, w), mode="bilinear", align_corners=False)
        return logits[0].argmax(0).numpy().astype(np.uint8)

    def __call__(self, crop: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        return np.where(self.parse(crop) > 0, 255, 0).astype(np.uint8)
