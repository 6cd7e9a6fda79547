"""Batched, deterministic rendering of scenes into images in [0, 1].

Shapes are drawn from signed-distance functions (SDFs) in each object's own frame, where the object's radius is 1;
a pixel's coverage is ``clamp(0.5 - sdf * radius_px, 0, 1)``, which anti-aliases edges at any resolution without
supersampling. Backgrounds are textures of a grey level with a small tint; lighting multiplies the whole image by a
brightness and an RGB gain; noise is a counter-based hash of (scene seed, pixel), so it is identical on every device
and for every batch composition. Images are rounded to multiples of 1/255, i.e. they are exact 8-bit images.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rclip.world.attributes import COLOUR_RGB, MAX_OBJECTS, SIZE_RADIUS, TEXTURES
from rclip.world.scenes import Scene

_SQRT2 = math.sqrt(2.0)


def _box(u: torch.Tensor, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.maximum(u.abs() - a, v.abs() - b)


def _halfplanes(u: torch.Tensor, v: torch.Tensor, angles_deg: Sequence[float], inradius: float) -> torch.Tensor:
    out = None
    for deg in angles_deg:
        phi = math.radians(deg)
        d = u * math.cos(phi) + v * math.sin(phi)
        out = d if out is None else torch.maximum(out, d)
    return out - inradius


def _circle(u: torch.Tensor, v: torch.Tensor, cu: float, cv: float, r: float) -> torch.Tensor:
    return torch.sqrt((u - cu) ** 2 + (v - cv) ** 2) - r


def shape_sdf(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (negative inside) of shape ``shape`` at local coordinates (u, v).

    Units are object radii; ``v`` points down the image, so "up" is ``v < 0``.
    """
    rho = torch.sqrt(u * u + v * v)
    if shape == 0:  # circle
        return rho - 0.95
    if shape == 1:  # square
        return _box(u, v, 0.8, 0.8)
    if shape == 2:  # triangle, apex up
        return _halfplanes(u, v - 0.1, (90.0, 210.0, 330.0), 0.55)
    if shape == 3:  # diamond
        return (u.abs() + v.abs() - 1.1) / _SQRT2
    if shape == 4:  # five-pointed star, a point up
        theta = torch.atan2(v, u) + math.pi / 2
        t = torch.remainder(theta * 5 / (2 * math.pi), 1.0)
        w = (1 - 2 * t).abs()
        return 0.7 * (rho - (0.45 + 0.62 * w**1.5))
    if shape == 5:  # cross (plus sign)
        return torch.minimum(_box(u, v, 0.95, 0.32), _box(u, v, 0.32, 0.95))
    if shape == 6:  # ring
        return torch.maximum(rho - 0.95, 0.52 - rho)
    if shape == 7:  # heart, tip down: a diamond and two lobes
        body = (u.abs() + (v - 0.15).abs() - 0.78) / _SQRT2
        lobes = torch.minimum(_circle(u, v, -0.39, -0.24, 0.55), _circle(u, v, 0.39, -0.24, 0.55))
        return torch.minimum(body, lobes)
    if shape == 8:  # hexagon
        return _halfplanes(u, v, (0.0, 60.0, 120.0, 180.0, 240.0, 300.0), 0.86)
    if shape == 9:  # crescent: a disc with an offset bite
        return torch.maximum(rho - 0.95, -_circle(u, v, 0.42, -0.18, 0.72))
    raise ValueError(f"unknown shape index {shape}")


def texture_field(texture: torch.Tensor, bg: torch.Tensor, x: torch.Tensor, y: torch.Tensor, px: float
                  ) -> torch.Tensor:
    """Texture value in [-1, 1] per pixel.

    Args:
        texture: (B,) texture indices.
        bg: (B, 8) background parameters (see :class:`~rclip.world.scenes.Scene`).
        x, y: (S, S) pixel centres in [0, 1].
        px: size of one pixel in image sides (1 / S), for soft edges.
    Returns: (B, S, S)
    """
    period = bg[:, 2, None, None]
    angle = bg[:, 3, None, None]
    phase = bg[:, 4, None, None]
    xc, yc = x[None] - 0.5, y[None] - 0.5
    s = xc * torch.cos(angle) + yc * torch.sin(angle)
    t = -xc * torch.sin(angle) + yc * torch.cos(angle)
    out = torch.zeros(texture.shape[0], *x.shape, dtype=x.dtype, device=x.device)
    for index, name in enumerate(TEXTURES):
        rows = (texture == index).nonzero().flatten()
        if rows.numel():
            out[rows] = _TEXTURES[name](s[rows], t[rows], period[rows], phase[rows], px)
    return out


_TWO_PI = 2 * math.pi
_TEXTURES = {
    "plain": lambda s, t, p, ph, px: torch.zeros_like(s),
    "striped": lambda s, t, p, ph, px: torch.tanh(3 * torch.sin(_TWO_PI * (s / p + ph))),
    "checkered": lambda s, t, p, ph, px: torch.tanh(
        5 * torch.sin(_TWO_PI * (s / p + ph)) * torch.sin(_TWO_PI * t / p)),
    "dotted": lambda s, t, p, ph, px: _dots(s, t, p, ph, px),
    "wavy": lambda s, t, p, ph, px: torch.tanh(
        3 * torch.sin(_TWO_PI * (s / p + ph) + 1.8 * torch.sin(_TWO_PI * t / (2 * p)))),
    "gradient": lambda s, t, p, ph, px: (1.6 * s).clamp(-1, 1),
}


def _dots(s: torch.Tensor, t: torch.Tensor, period: torch.Tensor, phase: torch.Tensor, px: float) -> torch.Tensor:
    a = torch.remainder(s / period + phase, 1.0) - 0.5
    b = torch.remainder(t / period, 1.0) - 0.5
    dist = torch.sqrt(a * a + b * b) * period
    cover = (0.5 + (0.24 * period - dist) / px).clamp(0, 1)
    return 2 * cover - 1


def _noise_field(seeds: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B,) integer seeds -> (B, 3, R, R) zero-mean, unit-variance uniform noise.

    Drawn on the CPU from one generator per scene, so it depends only on the scene, never on the device or on
    which other scenes share the batch.
    """
    gen = torch.Generator()
    fields = []
    for seed in seeds.tolist():
        gen.manual_seed(int(seed))
        fields.append(torch.rand(3, resolution, resolution, generator=gen))
    return (torch.stack(fields) - 0.5) * math.sqrt(12.0)


def scene_tensors(scenes: Sequence[Scene], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Pack scenes into padded parameter tensors (the inputs of :func:`render_tensors`)."""
    b = len(scenes)
    rows = [[float(v) for v in (o.shape, o.colour, o.size, o.cell, o.dx, o.dy, o.angle, *o.shade)]
            for sc in scenes for o in sc.objects]
    slots = [(i, k) for i, sc in enumerate(scenes) for k in range(len(sc.objects))]
    obj = torch.zeros(b, MAX_OBJECTS, 10)
    present = torch.zeros(b, MAX_OBJECTS, dtype=torch.bool)
    if slots:
        i, k = torch.tensor(slots).T
        obj[i, k] = torch.tensor(rows)
        present[i, k] = True
    return {
        "objects": obj.to(device),
        "present": present.to(device),
        "texture": torch.tensor([sc.texture for sc in scenes], dtype=torch.long, device=device),
        "background": torch.tensor([sc.background for sc in scenes], dtype=torch.float32, device=device),
        "light": torch.tensor([sc.light for sc in scenes], dtype=torch.float32, device=device),
        "noise_std": torch.tensor([sc.noise[0] for sc in scenes], dtype=torch.float32, device=device),
        "noise_seed": torch.tensor([sc.noise[1] for sc in scenes], dtype=torch.int64, device=device),
    }


def render_tensors(p: dict[str, torch.Tensor], resolution: int) -> torch.Tensor:
    """Render packed scene parameters. Returns (B, 3, resolution, resolution) float32 in [0, 1]."""
    device = p["objects"].device
    r = int(resolution)
    coords = (torch.arange(r, device=device, dtype=torch.float32) + 0.5) / r
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    bg = p["background"]
    field = texture_field(p["texture"], bg, x, y, 1.0 / r)
    grey = bg[:, 0, None, None] + bg[:, 1, None, None] * field
    canvas = grey[:, None] + bg[:, 5:8, None, None]  # (B, 3, R, R)

    palette = torch.tensor(COLOUR_RGB, device=device, dtype=torch.float32)
    radii = torch.tensor(SIZE_RADIUS, device=device, dtype=torch.float32)
    # Every object is drawn inside a square window that covers its largest possible extent (1.2 radii, any
    # rotation) plus a pixel of anti-aliasing; outside it the coverage is exactly zero.
    win = min(r, int(math.ceil(2 * 1.2 * max(SIZE_RADIUS) * r)) + 2)
    offsets = torch.arange(win, device=device)
    obj = p["objects"]
    for k in range(MAX_OBJECTS):
        rows = p["present"][:, k].nonzero().flatten()
        if rows.numel() == 0:
            continue
        o = obj[rows, k]
        shape, colour, size, cell = (o[:, j].round().long() for j in range(4))
        rad = radii[size][:, None, None]
        cx = (torch.remainder(cell, 3).float() + 0.5) / 3 + o[:, 4]
        cy = (torch.div(cell, 3, rounding_mode="floor").float() + 0.5) / 3 + o[:, 5]
        x0 = (torch.floor(cx * r).long() - win // 2).clamp(0, r - win)
        y0 = (torch.floor(cy * r).long() - win // 2).clamp(0, r - win)
        ix = x0[:, None] + offsets  # (n, win) pixel columns of each window
        iy = y0[:, None] + offsets
        xs, ys = (ix.float() + 0.5) / r, (iy.float() + 0.5) / r
        cos_a, sin_a = torch.cos(o[:, 6])[:, None, None], torch.sin(o[:, 6])[:, None, None]
        u0 = (xs[:, None, :] - cx[:, None, None]) / rad
        v0 = (ys[:, :, None] - cy[:, None, None]) / rad
        u = cos_a * u0 + sin_a * v0
        v = -sin_a * u0 + cos_a * v0
        sdf = torch.empty_like(u)
        for sh in shape.unique().tolist():
            sel = (shape == sh).nonzero().flatten()
            sdf[sel] = shape_sdf(int(sh), u[sel], v[sel])
        alpha = (0.5 - sdf * rad * r).clamp(0, 1)[:, None]  # (n, 1, win, win)
        rgb = (palette[colour] + o[:, 7:10])[:, :, None, None]
        b_idx, c_idx = rows[:, None, None, None], torch.arange(3, device=device)[None, :, None, None]
        y_idx, x_idx = iy[:, None, :, None], ix[:, None, None, :]
        patch = canvas[b_idx, c_idx, y_idx, x_idx]
        canvas[b_idx, c_idx, y_idx, x_idx] = patch * (1 - alpha) + rgb * alpha

    light = p["light"]
    canvas = canvas * light[:, 0, None, None, None] * light[:, 1:4, None, None]
    noise = _noise_field(p["noise_seed"], r).to(device)
    canvas = canvas + noise * p["noise_std"][:, None, None, None]
    return (canvas.clamp(0, 1) * 255).round() / 255


def render(scenes: Sequence[Scene], resolution: int, device: torch.device | str = "cpu",
           batch_size: int = 512) -> torch.Tensor:
    """Render scenes. Returns (N, 3, resolution, resolution) float32 in [0, 1] on ``device``."""
    if len(scenes) == 0:
        return torch.zeros(0, 3, resolution, resolution, device=device)
    chunks = [render_tensors(scene_tensors(scenes[i:i + batch_size], device), resolution)
              for i in range(0, len(scenes), batch_size)]
    return torch.cat(chunks)
