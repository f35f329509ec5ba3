"""mmseg's PhotoMetricDistortion on uint8 ``[3, H, W]`` tensors, with an explicit generator.

As mmseg 0.x: brightness (add U(-32, 32)), then in a random order contrast (multiply U(0.5, 1.5))
before or after saturation (HSV S times U(0.5, 1.5)) and hue (H shifted by an integer in
[-18, 18) steps of OpenCV's 180-step circle), each applied with probability 0.5; every step clips
to 0..255 and truncates to uint8. mmseg's contrast multiplies the pixel values (it does not blend
with the mean grey, as torchvision's ``adjust_contrast`` does) and its saturation scales S in HSV
(torchvision's blends with grey), so these are written out here; the HSV conversion is exact in
float where OpenCV's works on uint8 channels (differences of a grey level).
"""

from __future__ import annotations

import torch


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _coin(g: torch.Generator) -> bool:
    return bool(torch.randint(0, 2, (), generator=g).item())


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """``uint8(clip(x * alpha + beta, 0, 255))`` in float32, as mmseg's ``convert``."""
    return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """float ``[3, H, W]`` RGB in 0..255 -> H in [0, 1) of the circle, S in 0..1, V in 0..255."""
    r, g, b = rgb.unbind(0)
    v, _ = rgb.max(0)
    c = v - rgb.min(0).values
    s = torch.where(v > 0, c / v.clamp(min=1e-12), torch.zeros_like(v))
    safe = c.clamp(min=1e-12)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(c > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv` (float RGB in 0..255)."""
    h, s, v = hsv.unbind(0)
    k = (torch.arange(3, dtype=hsv.dtype).view(3, 1, 1) * -2 + 5 + h * 6) % 6  # r, g, b: n = 5, 3, 1
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def photometric_distortion(image: torch.Tensor, g: torch.Generator, brightness_delta: float = 32,
                           contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> torch.Tensor:
    """The distorted uint8 image (see the module docstring)."""
    x = image
    if _coin(g):
        x = _convert(x, beta=_uniform(g, -brightness_delta, brightness_delta))
    contrast_first = _coin(g)  # mmseg: mode 1 = contrast before the HSV steps, mode 0 after

    def apply_contrast(t: torch.Tensor) -> torch.Tensor:
        return _convert(t, alpha=_uniform(g, *contrast)) if _coin(g) else t

    if contrast_first:
        x = apply_contrast(x)
    if _coin(g):
        hsv = rgb_to_hsv(x.float())
        hsv[1] = (hsv[1] * _uniform(g, *saturation)).clamp(0, 1)
        x = hsv_to_rgb(hsv).round().clamp(0, 255).to(torch.uint8)
    if _coin(g):
        hsv = rgb_to_hsv(x.float())
        shift = int(torch.randint(-hue_delta, hue_delta, (), generator=g).item())
        hsv[0] = (hsv[0] + shift / 180) % 1.0
        x = hsv_to_rgb(hsv).round().clamp(0, 255).to(torch.uint8)
    if not contrast_first:
        x = apply_contrast(x)
    return x
