"""The scan's custom op: torch.library's own checks, and torch.compile(fullgraph=True) of the networks.

``fullgraph=True`` makes any graph break an error, so these tests fail if a scan (or anything around it)
is not traceable. The ``aot_eager`` backend traces forward and backward through the fake implementation
and the registered autograd formula, then runs the real op: outputs and gradients must equal eager's.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import lkm_unet
from lkm_unet.ops import selective_scan_op  # noqa: F401  (registers torch.ops.lkm_unet.*)

from test_selective_scan import NAMES, make_inputs

OPTIONAL = ("D", "z", "delta_bias")


def op_args(present: tuple[bool, ...], softplus: bool, requires_grad: bool) -> tuple:
    inputs = make_inputs(2, 3, 9, 4, softplus=softplus)
    for name, on in zip(OPTIONAL, present):
        if not on:
            inputs[name] = None
    tensors = [None if inputs[k] is None else inputs[k].float().requires_grad_(requires_grad) for k in NAMES]
    return (*tensors, softplus, "torch")


@pytest.mark.parametrize("present,softplus", [((True, True, True), True), ((False, False, False), False),
                                              ((True, False, True), True)])
def test_opcheck_forward_and_backward(present: tuple[bool, ...], softplus: bool) -> None:
    for requires_grad in (False, True):
        torch.library.opcheck(torch.ops.lkm_unet.selective_scan_fwd.default, op_args(present, softplus, requires_grad))
    args = op_args(present, softplus, False)
    out, states, pre_gate = torch.ops.lkm_unet.selective_scan_fwd(*args)
    bwd_args = (torch.randn_like(out), *args[:-1], states, pre_gate, "torch")
    torch.library.opcheck(torch.ops.lkm_unet.selective_scan_bwd.default, bwd_args)


def compile_and_record(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.fx.GraphModule]]:
    """``torch.compile(model, fullgraph=True)`` with aot_eager, keeping the traced graphs."""
    graphs: list[torch.fx.GraphModule] = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return torch.compile(model, fullgraph=True, backend=backend), graphs


def eager_and_compiled(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict, list]:
    """Output, input gradient and parameter gradients of ``sum(w * model(x))``, eager and compiled."""
    torch._dynamo.reset()
    compiled, graphs = compile_and_record(model)
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = fn(xx)
        outs = out if isinstance(out, (list, tuple)) else [out]
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
        results.append({"out": [o.detach() for o in outs], "dx": xx.grad,
                        **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
    return results[0], results[1], graphs


def assert_same(eager: dict, compiled: dict) -> None:
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def scan_nodes(graphs: list[torch.fx.GraphModule]) -> int:
    """Scan forward nodes in the graphs and their subgraphs (activation checkpointing traces each
    recomputed block as a subgraph)."""
    return sum(str(node.target).startswith("lkm_unet.selective_scan_fwd") for gm in graphs
               for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes)


def test_compiled_mamba_has_one_graph_with_the_scan_op_and_matches_eager() -> None:
    torch.manual_seed(0)
    model = lkm_unet.Mamba(8)
    eager, compiled, graphs = eager_and_compiled(model, torch.randn(2, 11, 8))
    assert len(graphs) == 1 and scan_nodes(graphs) == 1
    assert_same(eager, compiled)


@pytest.mark.parametrize("grouping, checkpointing", [("window", False), ("strided", True)])
def test_compiled_2d_lkm_unet_has_one_graph_and_matches_eager(grouping: str, checkpointing: bool) -> None:
    torch.manual_seed(1)
    net = lkm_unet.LKMUNet(
        input_channels=2, n_stages=3, features_per_stage=[4, 8, 8], conv_op="torch.nn.Conv2d", kernel_sizes=3,
        strides=[1, 2, 2], n_blocks_per_stage=[1, 2, 1], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
        norm_op="torch.nn.InstanceNorm2d", norm_op_kwargs={"affine": True}, nonlin="torch.nn.LeakyReLU",
        deep_supervision=True, pim_kernel_sizes=[[4, 4], [2, 2], [2, 2]], pam_pool_sizes=[[2, 2], [2, 2], [1, 1]],
        pim_grouping=grouping, ssm_checkpointing=checkpointing)
    net.apply(net.initialize)
    eager, compiled, graphs = eager_and_compiled(net, torch.randn(2, 2, 8, 8))
    assert len(graphs) == 1
    if checkpointing:  # recomputed blocks are traced as subgraphs, run by run: at least one scan per direction
        assert scan_nodes(graphs) >= 3 * 2 * 2
    else:  # every PiM and PaM block scans twice (both directions) in each of the three stages
        assert scan_nodes(graphs) == 3 * 2 * 2
    assert_same(eager, compiled)


def test_every_option_combination_traces() -> None:
    """Optional inputs as None and the softplus flag are constants of the graph, not graph breaks."""
    for present, softplus in itertools.product(itertools.product([False, True], repeat=3), [False, True]):
        args = op_args(present, softplus, False)[:-2]
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: lkm_unet.selective_scan(*a, delta_softplus=softplus), fullgraph=True,
                           backend="aot_eager")
        torch.testing.assert_close(fn(*args), lkm_unet.selective_scan(*args, delta_softplus=softplus))


def test_backward_allocates_no_zero_gradient_for_the_internal_outputs() -> None:
    """The kept states and pre-gate output are outputs of the forward op that nothing differentiates:
    the backward gets None for them instead of zero tensors of their size (a zero-filled copy of the
    states per backward, as large as the output at short sequences)."""
    from lkm_unet.ops import selective_scan

    inputs = {k: (v.float().requires_grad_() if v is not None else None) for k, v in make_inputs(2, 8, 40, 4).items()}
    args = [inputs[k] for k in NAMES]
    _, states, _ = torch.ops.lkm_unet.selective_scan_fwd(*(a.detach() for a in args), True, "torch")
    y = selective_scan(*args[:6], z=args[6], delta_bias=args[7], delta_softplus=True, backend="torch")
    with torch.profiler.profile(record_shapes=True) as prof:
        y.backward(torch.ones_like(y))
    zero_fills = [e for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_")
                  and any(list(s) == list(states.shape) for s in e.input_shapes if s)]
    assert zero_fills == [], [e.name for e in zero_fills]
