"""What happens when a window or pool size does not divide a feature map (SPEC 4).

``pad``: pad each axis at its end to a multiple of the size and crop back afterwards; padded tokens are
masked out of the scan. ``error``: raise a ValueError that names the place, the axis, the size, the
window and the nearest sizes that would work. Never a silent change of semantics.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

SHAPE_POLICIES = ("pad", "error")


def check_policy(policy: str) -> str:
    if policy not in SHAPE_POLICIES:
        raise ValueError(f"shape_policy={policy!r} is not valid; valid: {', '.join(map(repr, SHAPE_POLICIES))}")
    return policy


def per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` axes; check a sequence has ``ndim`` positive ints."""
    sizes = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(sizes) != ndim:
        raise ValueError(f"{name}={list(sizes)} has {len(sizes)} entries; this is a {ndim}D network, "
                         f"so give one int or {ndim} ints")
    for axis, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={list(sizes)}: axis {axis} has {size!r}; sizes must be positive ints")
    return sizes


def nearest_multiples(size: int, multiple: int) -> tuple[int, ...]:
    """The multiples of ``multiple`` just below and above ``size`` (one value if below is 0)."""
    below = (size // multiple) * multiple
    above = below + multiple
    return (above,) if below == 0 else (below, above)


def padding_for(
    spatial: Sequence[int],
    sizes: Sequence[int],
    policy: str,
    where: str,
    what: str,
    input_stride: Optional[Sequence[int]] = None,
) -> tuple[int, ...]:
    """Per-axis amount to pad ``spatial`` at the end so that ``sizes`` divide it.

    Under policy ``error`` a non-dividing axis raises a ValueError: the first message of
    :func:`divisibility_errors`.
    """
    if policy == "error":
        errors = divisibility_errors(spatial, sizes, where, what, input_stride)
        if errors:
            raise ValueError(errors[0])
    return tuple((-s) % k for s, k in zip(spatial, sizes))


def divisibility_errors(
    spatial: Sequence[int],
    sizes: Sequence[int],
    where: str,
    what: str,
    input_stride: Optional[Sequence[int]] = None,
    patch_multiple: Optional[Sequence[int]] = None,
) -> list[str]:
    """One message per axis on which ``sizes`` does not divide ``spatial`` (empty when all divide).

    Each names ``where`` (e.g. 'stage 2 PiM'), ``what`` ('kernel size', 'pool size'), the axis, the size
    and the nearest valid sizes; with ``input_stride`` (the stage's total downsampling per axis) also the
    nearest valid patch sizes on that axis, multiples of ``patch_multiple`` too where given (the
    network's total stride, which every patch must be a multiple of).
    """
    errors = []
    for axis, (s, k) in enumerate(zip(spatial, sizes)):
        if s % k == 0:
            continue
        message = (f"{where}: {what} {k} does not divide axis {axis} of the feature map "
                   f"{tuple(spatial)} (size {s}); {what}s that divide it: "
                   f"{' or '.join(map(str, nearest_divisors(s, k)))}")
        if input_stride is not None:
            multiple = k * input_stride[axis]
            if patch_multiple is not None:
                multiple = math.lcm(multiple, patch_multiple[axis])
            patches = nearest_multiples(s * input_stride[axis], multiple)
            message += f"; or a patch size of {' or '.join(map(str, patches))} on axis {axis}"
        errors.append(message + "; or shape_policy='pad'")
    return errors


def nearest_divisors(size: int, target: int) -> tuple[int, ...]:
    """The divisors of ``size`` just below and just above ``target``."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    below = [d for d in divisors if d < target]
    above = [d for d in divisors if d > target]
    return tuple(x for x in (below[-1] if below else None, above[0] if above else None) if x is not None)
