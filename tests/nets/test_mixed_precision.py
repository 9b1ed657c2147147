"""Training under CPU bf16 autocast stays finite, with the default memory options and with ssm_autocast."""
import pytest
import torch

from lkm_unet import LKMUNet, derive_kernel_sizes


def demo_like_net(patch, features, blocks=(1, 3, 4, 6, 6), decoder_blocks=1, **options):
    """A 5-stage 2D network with windows derived for the patch, at given widths and block counts."""
    strides = [[1, 1]] + [[2, 2]] * 4
    torch.manual_seed(0)
    net = LKMUNet(input_channels=1, n_stages=5, features_per_stage=features, conv_op="torch.nn.Conv2d",
                  kernel_sizes=3, strides=strides, n_blocks_per_stage=list(blocks), num_classes=4,
                  n_conv_per_stage_decoder=decoder_blocks, conv_bias=True, norm_op="torch.nn.InstanceNorm2d",
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin="torch.nn.LeakyReLU",
                  nonlin_kwargs={"inplace": True}, deep_supervision=True, shape_policy="error",
                  **derive_kernel_sizes(patch, strides), **options)
    net.apply(net.initialize)
    return net


def blobs(batch, patch, generator):
    """Images with bright discs of 3 labels on noise, and their label maps."""
    yy, xx = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in patch), indexing="ij")
    images = torch.randn(batch, 1, *patch, generator=generator) * 0.3
    labels = torch.zeros(batch, *patch, dtype=torch.long)
    for b in range(batch):
        for label in (1, 2, 3):
            cy, cx, r = (torch.rand(3, generator=generator) * torch.tensor([patch[0], patch[1], patch[0] / 6])).tolist()
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (r + 2) ** 2
            labels[b][disc] = label
            images[b, 0][disc] += label
    return images, labels


def train(net, steps, batch, patch, autocast=True):
    """nnU-Net's optimiser (SGD, lr 1e-2, momentum 0.99, Nesterov) and deep-supervised cross-entropy with
    its weights, under CPU bf16 autocast (or in fp32). Returns the losses; asserts every step is finite."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([1 / 2 ** i for i in range(5)])
    weights[-1] = 0
    weights = weights / weights.sum()
    losses = []
    for step in range(steps):
        images, labels = blobs(batch, patch, generator)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = net(images)
            loss = sum(w * torch.nn.functional.cross_entropy(
                o.float(), labels[:, ::2 ** i, ::2 ** i]) for i, (w, o) in enumerate(zip(weights, outs)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None), f"step {step}"
        opt.step()
        losses.append(loss.item())
    return losses


def test_short_bf16_training_stays_finite_and_tracks_fp32():
    """Short: 8 steps of a narrow demo-shaped network under bf16 with ssm_autocast, and in fp32."""
    losses = {}
    for name, autocast in (("bf16", True), ("fp32", False)):
        net = demo_like_net((32, 32), [4, 8, 8, 8, 8], ssm_autocast=True)
        losses[name] = train(net, 8, 2, (32, 32), autocast)
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.02 * losses["fp32"][0]


@pytest.mark.slow
@pytest.mark.parametrize("ssm_autocast", [False, True])
def test_200_bf16_steps_of_the_demo_network_stay_finite(ssm_autocast):
    """The quickstart network as ``lkm-unet plans 990 -c 2d --preset auto`` writes it for the demo data:
    96 x 96 patch, 32..512 features, one residual block per stage, two decoder blocks, batch 4. About 17 s
    a step on 2 cores without bf16 instructions (AVX2 only), so about an hour per parameter."""
    net = demo_like_net((96, 96), [32, 64, 128, 256, 512], blocks=(1,) * 5, decoder_blocks=2,
                        ssm_autocast=ssm_autocast)
    losses = train(net, 200, 4, (96, 96))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
