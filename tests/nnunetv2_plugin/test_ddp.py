"""LKM-UNet under torch DDP (gloo, 2 processes, CPU), as nnU-Net's -num_gpus path wraps it."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from lkm_unet import LKMUNet

KWARGS = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 8], conv_op="torch.nn.Conv2d", kernel_sizes=3,
              strides=[1, 2, 2], n_blocks_per_stage=1, num_classes=2, n_conv_per_stage_decoder=1, conv_bias=True,
              norm_op="torch.nn.InstanceNorm2d", norm_op_kwargs={"affine": True}, nonlin="torch.nn.LeakyReLU",
              pim_kernel_sizes=[[4, 4], [2, 2], [2, 2]], pam_pool_sizes=[[2, 2], [2, 2], [1, 1]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, deep_supervision: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)                       # same initial weights on both ranks
    net = LKMUNet(deep_supervision=deep_supervision, **KWARGS)
    net.apply(net.initialize)
    model = DDP(net)                           # find_unused_parameters=False, as nnU-Net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(100 + rank)              # different data per rank
    for _ in range(2):                         # a second step fails if a parameter went unused in the first
        out_maps = model(torch.randn(2, 1, 16, 16))
        loss = sum(o.square().mean() for o in out_maps) if deep_supervision else out_maps.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_ddp_gloo_two_processes_keep_replicas_identical(tmp_path, deep_supervision):
    mp.spawn(_worker, args=(2, _free_port(), deep_supervision, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=1e-6, msg=key)
    torch.manual_seed(0)
    initial = LKMUNet(deep_supervision=deep_supervision, **KWARGS)
    initial.apply(initial.initialize)
    moved = [k for k, v in initial.state_dict().items() if v.is_floating_point() and not torch.equal(v, rank0[k])]
    assert any(".lkm_stages." in k for k in moved)   # the SSM parameters were trained, in sync
