"""Models: autoencoder / UNet shapes, attention numbering, fine-tune selection, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpldm.config import AutoencoderConfig, RunConfig, UNetConfig
from dpldm.models.attention import CrossAttention, SpatialTransformer
from dpldm.models.autoencoder import Autoencoder, DiagonalGaussian
from dpldm.models.embedders import ClassEmbedder
from dpldm.models.ldm import LatentDiffusion, load_ldm, save_ldm
from dpldm.models.selection import apply_finetune, count_parameters, finetune_summary
from dpldm.models.unet import UNet


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more, and lose a lot on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(**kw) -> UNet:
    base = dict(in_channels=4, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                num_heads=2, context_dim=8, num_classes=5)
    base.update(kw)
    return UNet(UNetConfig(**base))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mult,f", [((1, 2), 2), ((1, 2, 2), 4)])
def test_autoencoder_shapes(channels, mult, f):
    cfg = AutoencoderConfig(in_channels=channels, base_channels=8, channel_mult=mult, latent_channels=3)
    ae = Autoencoder(cfg)
    assert ae.downsample_factor == f
    x = torch.rand(2, channels, 16, 16) * 2 - 1
    post = ae.encode(x)
    assert post.mean.shape == (2, 3, 16 // f, 16 // f) == post.logvar.shape
    recon, post2 = ae(x)
    assert recon.shape == x.shape
    assert ae.decode(post.mode()).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        ae.encode(torch.zeros(1, channels, 17, 16))


def test_diagonal_gaussian_kl_and_sample():
    moments = torch.randn(3, 4, 2, 2)
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :2], moments[:, 2:]
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), ref)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(post.sample(g1), mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g2))


@pytest.mark.parametrize("latent_channels,size", [(3, 16), (4, 8), (1, 8)])
def test_unet_shapes(latent_channels, size):
    unet = tiny_unet(in_channels=latent_channels)
    x = torch.randn(3, latent_channels, size, size)
    eps = unet(x, torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5]))  # 5 = null class
    assert eps.shape == x.shape


def test_class_embedder_null_row():
    emb = ClassEmbedder(num_classes=7, context_dim=5)
    assert emb.embedding.weight.shape == (8, 5) and emb.null_class == 7
    ctx = emb(torch.tensor([0, 7, 3]))
    assert ctx.shape == (3, 1, 5)
    torch.testing.assert_close(ctx[1, 0], emb.embedding.weight[7])


def test_cross_attention_matches_sdpa():
    attn = CrossAttention(query_dim=12, heads=3, dim_head=4, context_dim=6)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 7, 6)
    q, k, v = (t.view(2, -1, 3, 4).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 12)
    torch.testing.assert_close(attn(x, ctx), attn.to_out(ref))
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    assert attn.to_out.bias is not None


def test_spatial_transformer_starts_as_identity_and_uses_only_dp_layer_types():
    st = SpatialTransformer(channels=16, heads=2, depth=2, context_dim=8)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(st(x, torch.randn(2, 1, 8)), x)  # proj_out is zero-initialised
    allowed = (nn.Linear, nn.LayerNorm, nn.GroupNorm)
    for name, m in st.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            assert isinstance(m, allowed), f"{name}: {type(m).__name__} has parameters but no DP rule"


def test_attention_numbering_matches_hand_count():
    # widths 16/32/48; attention at levels 1 and 2; 2 res blocks per level.
    unet = UNet(UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=2,
                           attention_levels=(1, 2), num_heads=2, context_dim=8, num_classes=3))
    mods = unet.attention_modules()
    # hand count: input 2 (level 1) + 2 (level 2); middle 1; output 3 (level 2) + 3 (level 1) = 11
    assert len(mods) == 11
    assert [m.proj_in.in_features for m in mods] == [32, 32, 48, 48, 48, 48, 48, 48, 32, 32, 32]
    in_ids = {id(m) for m in unet.input_blocks.modules()}
    out_ids = {id(m) for m in unet.output_blocks.modules()}
    assert [id(m) in in_ids for m in mods] == [True] * 4 + [False] * 7
    assert mods[4] is unet.middle_block[1]
    assert [id(m) in out_ids for m in mods] == [False] * 5 + [True] * 6
    # forward order, observed with hooks
    order = []
    for m in mods:
        m.register_forward_hook(lambda mod, inp, out: order.append(mod))
    unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1]))
    assert [id(m) for m in order] == [id(m) for m in mods]


def paper_unet() -> UNet:
    # 6 input + 1 middle + 9 output = 16 attention modules, as in the paper's numbering
    return UNet(UNetConfig(in_channels=4, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2,
                           attention_levels=(0, 1, 2), num_heads=2, context_dim=8, num_classes=10))


def transformer_trainable_count(c: int, d: int) -> int:
    """Closed form for a depth-1 SpatialTransformer of width c, context d, GEGLU mult 4, without
    attn2.to_q (c*c) and attn2.to_k (d*c): c^2 terms proj_in 1 + attn1 4 + attn2.out 1 + GEGLU 8 +
    ff.out 4 + proj_out 1; d*c from attn2.to_v; biases/affines GN 2 + proj_in 1 + LN 6 + attn1.out 1
    + attn2.out 1 + GEGLU 8 + ff.out 1 + proj_out 1."""
    return 19 * c * c + d * c + 21 * c


def test_finetune_attention_9_16_trains_exactly_those_modules():
    unet = paper_unet()
    mods = unet.attention_modules()
    assert len(mods) == 16
    names = apply_finetune(unet, "attention:9-16")
    widths = [m.proj_in.in_features for m in mods]
    expected = sum(transformer_trainable_count(c, 8) for c in widths[8:16]) + 11 * 8  # + embedder rows
    total, trainable = count_parameters(unet)
    assert trainable == expected
    assert total == sum(p.numel() for p in unet.parameters())
    chosen = {id(p) for m in mods[8:16] for p in m.parameters()} | {id(unet.label_embedder.embedding.weight)}
    for name, p in unet.named_parameters():
        zero_grad = name.endswith(("attn2.to_q.weight", "attn2.to_k.weight"))
        assert p.requires_grad == (id(p) in chosen and not zero_grad), name
    assert names == [n for n, p in unet.named_parameters() if p.requires_grad]
    assert f"{trainable:,} of {total:,}" in finetune_summary(unet, "attention:9-16")


def test_finetune_all_and_attention_all_and_errors():
    unet = paper_unet()
    apply_finetune(unet, "attention:all")
    widths = [m.proj_in.in_features for m in unet.attention_modules()]
    assert count_parameters(unet)[1] == sum(transformer_trainable_count(c, 8) for c in widths) + 11 * 8
    apply_finetune(unet, "all")
    assert count_parameters(unet)[1] == count_parameters(unet)[0]
    apply_finetune(unet, "attention:1-2,16")
    assert count_parameters(unet)[1] == (transformer_trainable_count(widths[0], 8) + transformer_trainable_count(widths[1], 8)
                                         + transformer_trainable_count(widths[15], 8) + 11 * 8)
    for bad in ("attention:0-3", "attention:9-17", "attention:5-2", "attention:x", "bias"):
        with pytest.raises(ValueError, match="attention|finetune"):
            apply_finetune(unet, bad)
    with pytest.raises(ValueError, match=r"1\.\.16"):
        apply_finetune(unet, "attention:9-17")


def test_cross_attention_q_k_get_exactly_zero_gradient():
    unet = tiny_unet()
    for m in unet.attention_modules():  # make the transformers do something
        nn.init.normal_(m.proj_out.weight)
    nn.init.normal_(unet.out[-1].weight)
    unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 5])).square().sum().backward()
    for name, p in unet.named_parameters():
        if name.endswith(("attn2.to_q.weight", "attn2.to_k.weight")):
            assert torch.count_nonzero(p.grad) == 0, name
        if name.endswith("attn2.to_v.weight"):
            assert torch.count_nonzero(p.grad) > 0, name


def tiny_run_config() -> RunConfig:
    return RunConfig.from_dict({
        "autoencoder": {"base_channels": 8, "channel_mult": [1, 2]},
        "unet": {"model_channels": 8, "num_heads": 2, "context_dim": 8, "num_classes": 10},
        "diffusion": {"timesteps": 50, "sample_steps": 5},
        "data": {"image_size": 16},
    })


def test_ldm_checkpoint_round_trip_is_bit_exact(tmp_path):
    ldm = LatentDiffusion(tiny_run_config(), scale_factor=0.123456789123)
    with torch.no_grad():
        for p in list(ldm.ae.parameters()) + list(ldm.unet.parameters()):
            p.normal_()
    ldm.ema.update(ldm.unet)
    with torch.no_grad():
        for p in ldm.unet.parameters():
            p.add_(1.0)
    ldm.ema.update(ldm.unet)
    save_ldm(tmp_path / "m", ldm, {"note": "x"})
    back = load_ldm(tmp_path / "m")
    assert back.scale_factor == ldm.scale_factor and back.cfg == ldm.cfg and back.meta["note"] == "x"
    for a, b in ((ldm.ae, back.ae), (ldm.unet, back.unet), (ldm.ema.module, back.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert back.ema.num_updates == 2
    y = torch.tensor([0, 3])
    s1 = ldm.eval().sample(y, generator=torch.Generator().manual_seed(0))
    s2 = back.sample(y, generator=torch.Generator().manual_seed(0))
    assert s1.shape == (2, 1, 16, 16) and torch.equal(s1, s2)
