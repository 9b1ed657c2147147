"""What a training step keeps for backward: bytes saved by autograd, counted per block.

Device-independent: the count is the same on a CPU and a GPU (the tensors autograd keeps are the
same), so it can be measured on any machine and compared between networks and memory options.
A storage is counted once however many ops save it or views of it; parameters are not counted
(they exist whether or not anything is saved). Tensors kept alive by ``torch.utils.checkpoint``
(its inputs) are counted like saved tensors: they are what checkpointing stores instead.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


@dataclass
class SavedBytes:
    """``total`` bytes saved for backward, split by ``per_block`` (label -> bytes, in forward order)."""

    total: int = 0
    per_block: dict[str, int] = field(default_factory=dict)


def block_labels(network: nn.Module) -> dict[nn.Module, str]:
    """Modules to attribute saved tensors to: the stem, each encoder stage's convolutions, PiM and
    PaM (LKM-UNet), and the decoder. Works for LKM-UNet and dynamic-network-architectures'
    ``ResidualEncoderUNet``; a tensor saved outside every labelled module goes to 'other'."""
    encoder = network.encoder
    labels: dict[nn.Module, str] = {encoder.stem: "stem"} if getattr(encoder, "stem", None) is not None else {}
    for s, stage in enumerate(encoder.stages):
        labels[stage] = f"stage {s} conv"
    for s, lkm in enumerate(getattr(encoder, "lkm_stages", [])):
        for name, block in (("PiM", lkm.pim), ("PaM", lkm.pam)):
            if block is not None:  # None: ablated
                labels[block] = f"stage {s} {name}"
    labels[network.decoder] = "decoder"
    return labels


def _storage_key(tensor: Tensor) -> int:
    """Identity of a tensor's storage, shared by all its views; works for fake tensors (no data)."""
    return tensor.untyped_storage()._cdata


class _Meter:
    def __init__(self, parameters: list[Tensor]) -> None:
        self.skip = {_storage_key(p) for p in parameters}
        self.seen: set[int] = set()
        self.result = SavedBytes()
        self.stack = ["other"]

    def record(self, tensor: Tensor) -> None:
        if tensor.device.type == "meta" or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = _storage_key(tensor)
        if key in self.skip or key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        label = self.stack[-1]
        self.result.total += storage.nbytes()
        self.result.per_block[label] = self.result.per_block.get(label, 0) + storage.nbytes()

    def leave(self) -> None:
        self.stack.pop()  # returns None, so the hook leaves the module's output alone

    def pack(self, tensor: Tensor) -> Tensor:
        self.record(tensor)
        return tensor


@contextlib.contextmanager
def _labelled(meter: _Meter, labels: dict[nn.Module, str]) -> Iterator[None]:
    handles = []
    for module, label in labels.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, label=label: meter.stack.append(label)))
        handles.append(module.register_forward_hook(lambda m, a, o: meter.leave()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _counting_checkpoint_inputs(meter: _Meter) -> Iterator[None]:
    original = torch.utils.checkpoint.checkpoint

    @functools.wraps(original)
    def checkpoint(fn: Callable, *args, **kwargs):
        for arg in args:
            if isinstance(arg, Tensor) and torch.is_grad_enabled():
                meter.record(arg)
        return original(fn, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = checkpoint
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


def saved_bytes(network: nn.Module, x: Tensor, autocast_dtype: Optional[torch.dtype] = None,
                labels: Optional[dict[nn.Module, str]] = None, fake: bool = False) -> tuple[SavedBytes, object]:
    """Run ``network(x)`` in training mode (under autocast to ``autocast_dtype`` if given) and count
    the bytes autograd saves for backward. Returns the count and the output (call backward on it,
    or drop it to free the saved tensors).

    ``fake=True`` runs the forward pass on fake tensors (``FakeTensorMode``: shapes, dtypes, views and
    the autograd graph, no data and no arithmetic), so a configuration too large or too slow for the
    machine (the paper's full 3D patch; bf16 convolutions on a CPU without bf16 instructions) is
    counted in seconds. The output is then fake: it cannot be differentiated for real. The count
    matches the real one up to ops whose real kernels save a differently sized buffer than their fake
    (meta) twin (tests/nets/test_memory_estimate.py bounds the difference)."""
    labels = block_labels(network) if labels is None else labels
    params = list(network.parameters())
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # the mode memoizes real -> fake, so the fake parameters (and their views) are these storages
        params += [mode.from_tensor(p) for p in params]
        x = mode.from_tensor(x)
    meter = _Meter(params)
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with mode, _labelled(meter, labels), _counting_checkpoint_inputs(meter), \
            torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t), autocast:
        out = network(x)
    return meter.result, out
