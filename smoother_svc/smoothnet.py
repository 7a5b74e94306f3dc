"""The learned smoother: SmoothNet's architecture (Zeng et al., ECCV 2022) in torch.

A temporal-only network applied to each coordinate channel separately: a window of T samples
goes through Linear(T, 512) → LeakyReLU(0.1) → 3 residual blocks [Linear(512, 256) → Dropout →
LeakyReLU(0.2) → Linear(256, 512) → Dropout → LeakyReLU(0.2), + identity] → Linear(512, T).
It slides over the sequence with step 1 and every sample's outputs are averaged; the sequence is
first extended at both ends by odd reflection (window − 1 samples), so edge samples get as many
windows as the others.

Input convention (ours, stored with each checkpoint): each window has its mean subtracted (so the
network sees the shape of the motion, not where the landmark is) and is multiplied by
`input_scale` (10: metres → decimetres, so values are of order one); outputs are scaled back and
the mean is added again. It smooths world landmarks (metres, hip-centred) sampled on a uniform
grid — trained at 30 fps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smoother_svc.filters import on_uniform_grid

DEFAULT_WINDOW = 32
INPUT_SCALE = 10.0
_WINDOWS_PER_BATCH = 16384  # bounds inference memory: 16384 × 512 floats per activation


class ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.dropout(self.linear1(x)))
        y = self.activation(self.dropout(self.linear2(y)))
        return x + y


class SmoothNet(nn.Module):
    """(..., window) → (..., window)."""

    def __init__(self, window: int = DEFAULT_WINDOW, width: int = 512, hidden: int = 256,
                 blocks: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.window = window
        self.encoder = nn.Sequential(nn.Linear(window, width), nn.LeakyReLU(0.1))
        self.blocks = nn.Sequential(*[ResidualBlock(width, hidden, dropout) for _ in range(blocks)])
        self.decoder = nn.Linear(width, window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.blocks(self.encoder(x)))


def smooth_windows(model: SmoothNet, windows: torch.Tensor, input_scale: float = INPUT_SCALE) -> torch.Tensor:
    """Applies the model to (..., window) windows with the centring convention above."""
    mean = windows.mean(dim=-1, keepdim=True)
    return model((windows - mean) * input_scale) / input_scale + mean


@torch.no_grad()
def smooth_sequence(model: SmoothNet, values: np.ndarray, input_scale: float = INPUT_SCALE) -> np.ndarray:
    """(T, C) uniformly sampled channels, T ≥ window → (T, C): sliding window, step 1, averaged,
    on the model's device."""
    device = next(model.parameters()).device
    window = model.window
    n, channels = values.shape
    if n < window:
        raise ValueError(f"sequence of {n} samples is shorter than the window ({window})")
    model.eval()
    series = torch.as_tensor(np.ascontiguousarray(values.T), dtype=torch.float32, device=device)  # (C, T)
    starts = n - window + 1
    total = torch.zeros((channels, n), dtype=torch.float32, device=device)
    step = max(1, _WINDOWS_PER_BATCH // max(1, channels))
    for first in range(0, starts, step):
        last = min(starts, first + step)
        # (C, k, window) windows starting at first..last-1
        windows = series[:, first:last + window - 1].unfold(1, window, 1)
        out = smooth_windows(model, windows, input_scale)
        for offset in range(window):  # overlap-add, one shift at a time
            total[:, first + offset:last + offset] += out[:, :, offset]
    t = np.arange(n)
    counts = np.minimum(t, starts - 1) - np.maximum(0, t - window + 1) + 1  # windows covering t
    return total.cpu().numpy().T.astype(np.float64) / counts[:, None]


@dataclass
class LearnedSmoother:
    """A loaded checkpoint, ready to smooth world landmarks."""

    model: SmoothNet
    version: str
    input_scale: float = INPUT_SCALE

    @property
    def window(self) -> int:
        return self.model.window

    def apply(self, times: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(T, C) samples at `times` (T ≥ window) → smoothed, via the uniform grid."""
        return on_uniform_grid(times, values, lambda v, dt: self._uniform(v))

    def _uniform(self, values: np.ndarray) -> np.ndarray:
        if len(values) < 2:
            return values.copy()
        # Odd reflection at both ends (a line continues as itself): the first and last samples
        # then sit inside as many windows as any other, instead of at a window's edge, where the
        # network is weakest (without it a 1 m/s ramp came out up to 7 cm off at the ends).
        pad = self.window - 1
        padded = np.pad(values, ((pad, pad), (0, 0)), mode="reflect", reflect_type="odd")
        return smooth_sequence(self.model, padded, self.input_scale)[pad:-pad]
