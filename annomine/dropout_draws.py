"""Dropout masks for CPU training, drawn exactly as PyTorch draws them, in a fraction of its time.

PyTorch's CPU Bernoulli kernel draws a mask one element at a time from the default generator, on one thread; on 2
cores a two-tower step spends a fifth of its CPU time there. `bernoulli_mask` draws the same elements from the same
generator state with the compiled `annomine._torch_bernoulli` (built with the package) and leaves the generator where
PyTorch's own draw would leave it, so a seeded training is PyTorch's own to the bit. Once per process it compares
itself with PyTorch on a private generator; where the extension is not built, or the check fails (another PyTorch
build, another CPU kernel), the masks come from PyTorch itself.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

_CHECKED: dict[str, object] = {}


def _compiled_draw():
    """The compiled `draw(state, out, threshold)`, or None where it is not built."""
    try:
        from annomine import _torch_bernoulli
    except ImportError:
        return None
    return _torch_bernoulli.draw


def _threshold(keep: float) -> int:
    """A draw keeps its element when its 53 low bits, as a fraction of 2**53, are below `keep`: below this integer."""
    return math.ceil(keep * 2.0 ** 53)


def _draw_from(draw, generator_state: torch.Tensor, numel: int, keep: float) -> torch.Tensor:
    """`numel` 0/1 draws (uint8) from a serialized CPU generator state, which advances in place."""
    out = torch.empty(numel, dtype=torch.uint8)
    draw(generator_state.numpy(), out.numpy(), _threshold(keep))
    return out


def _agrees_with_torch(draw) -> bool:
    """Whether `draw` gives PyTorch's own masks and generator states, on a private generator (the default one is
    left alone): counts that cross the generator's 624-word blocks, odd and even, from a fresh seed and mid-block."""
    generator = torch.Generator().manual_seed(20_261_207)
    for numel, keep in ((1, 0.9), (311, 0.5), (1_001, 0.9), (5_000, 0.8), (0, 0.9), (20_000, 0.1)):
        state = generator.get_state()
        ours = _draw_from(draw, state, numel, keep)
        theirs = torch.empty(numel, dtype=torch.uint8).bernoulli_(keep, generator=generator)
        if not (torch.equal(ours, theirs) and torch.equal(state, generator.get_state())):
            return False
    return True


def _fast_draw():
    """The compiled draw once it has agreed with PyTorch in this process, else None."""
    if "draw" not in _CHECKED:
        draw = _compiled_draw()
        try:
            _CHECKED["draw"] = draw if draw is not None and _agrees_with_torch(draw) else None
        except (ValueError, RuntimeError) as err:  # a generator state of another layout
            log.debug("compiled Bernoulli draws disagree with this PyTorch (%s)", err)
            _CHECKED["draw"] = None
        if _CHECKED["draw"] is None:
            log.debug("dropout masks come from PyTorch's own Bernoulli kernel")
    return _CHECKED["draw"]


def bernoulli_mask(shape: tuple[int, ...], keep: float) -> torch.Tensor:
    """A uint8 CPU tensor of `shape`, each element 1 with probability `keep`: element for element what
    `torch.empty(shape).bernoulli_(keep)` draws from the default CPU generator, which is left where that draw leaves it."""
    draw = _fast_draw()
    if draw is None:
        return torch.empty(shape, dtype=torch.uint8).bernoulli_(keep)
    state = torch.get_rng_state()
    mask = _draw_from(draw, state, math.prod(shape), keep).view(shape)
    torch.set_rng_state(state)
    return mask


def dropout_multiplier(mask: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """What `torch.nn.functional.dropout(x, p)` multiplies `x` by on CPU, given its 0/1 draws: 0 or 1 / (1 - p)."""
    return mask.to(dtype).div_(1 - p)
