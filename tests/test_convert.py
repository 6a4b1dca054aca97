"""optimize / revert on crossvit_fast's own models and on a model laid out as timm's (recognised by structure)."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crossvit_fast
from crossvit_fast.layers import Attention, CrossAttentionBlock, MultiScaleBlock


# --- stand-ins with timm's layout and forward code paths (timm itself needs torchvision: not on CPU machines) ---
class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv, self.q_norm, self.k_norm = nn.Linear(dim, 3 * dim), nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TimmCrossAttention(nn.Module):
    def __init__(self, src):
        super().__init__()
        self.num_heads, self.scale = src.num_heads, src.scale  # timm keeps no head_dim attribute here
        self.wq, self.wk, self.wv, self.proj = src.wq, src.wk, src.wv, src.proj
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q = self.wq(x[:, 0:1]).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, 1, C)))


class TimmCrossAttentionBlock(nn.Module):
    def __init__(self, src: CrossAttentionBlock):
        super().__init__()
        self.norm1, self.attn, self.drop_path = src.norm1, TimmCrossAttention(src.attn), src.drop_path

    def forward(self, x):
        return x[:, 0:1] + self.drop_path(self.attn(self.norm1(x)))


class TimmMultiScaleBlock(nn.Module):
    def __init__(self, src: MultiScaleBlock):
        super().__init__()
        self.num_branches = 2
        self.blocks, self.projs = src.blocks, src.projs
        self.fusion = nn.ModuleList([TimmCrossAttentionBlock(f) for f in src.fusion])
        self.revert_projs = src.revert_projs

    def forward(self, x):
        outs_b = [block(x[i]) for i, block in enumerate(self.blocks)]
        proj_cls = [proj(outs_b[i][:, 0:1]) for i, proj in enumerate(self.projs)]
        outs = []
        for i, (fusion, revert_proj) in enumerate(zip(self.fusion, self.revert_projs)):
            tmp = torch.cat((proj_cls[i], outs_b[(i + 1) % 2][:, 1:]), dim=1)
            tmp = revert_proj(fusion(tmp)[:, 0:1])
            outs.append(torch.cat((tmp, outs_b[i][:, 1:]), dim=1))
        return outs


def timm_like(name="crossvit_tiny_240", **kw):
    """A crossvit_fast model whose attention, fusion and multi-scale blocks are replaced by timm-layout modules."""
    torch.manual_seed(0)
    model = crossvit_fast.create_model(name, backend="reference", **kw)
    for ms in model.blocks:
        for seq in ms.blocks:
            for blk in seq:
                old = blk.attn
                blk.attn = TimmAttention(old.qkv.in_features, old.num_heads)
                blk.attn.qkv, blk.attn.proj = old.qkv, old.proj
    model.blocks = nn.ModuleList([TimmMultiScaleBlock(ms) for ms in model.blocks])
    return model


def _kinds(model):
    return {type(m).__name__ for m in model.modules()}


def test_optimize_timm_layout_keeps_state_and_output_then_reverts():
    model = timm_like().eval()
    sd = {k: v for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 240, 240, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        want = model(x)
    assert {"TimmAttention", "TimmMultiScaleBlock"} <= _kinds(model)

    crossvit_fast.optimize(model, backend="reference")
    assert not {"TimmAttention", "TimmCrossAttentionBlock", "TimmMultiScaleBlock"} & _kinds(model)
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == list(sd)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)

    crossvit_fast.revert(model)
    assert {"TimmAttention", "TimmCrossAttentionBlock", "TimmMultiScaleBlock"} <= _kinds(model)
    assert [id(p) for p in model.parameters()] == params
    with torch.no_grad():
        assert torch.equal(model(x), want)
    with pytest.raises(ValueError, match="not optimized"):
        crossvit_fast.revert(model)


def test_optimizer_keeps_working_across_optimize():
    model = timm_like(num_classes=5, img_size=96).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([0, 3])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    crossvit_fast.optimize(model, backend="reference")
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_own_model_and_dtypes():
    model = crossvit_fast.create_model("crossvit_tiny_240", backend="reference").eval()
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        want = model(x)
    crossvit_fast.optimize(model)  # auto: "torch" (what timm runs) on a CPU-only machine, fused where verified
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
        for dt in (torch.bfloat16, torch.float16):
            out = copy.deepcopy(model).to(dt)(x.to(dt))
            assert out.dtype == dt and torch.isfinite(out).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x)).all()
    crossvit_fast.revert(model)


def test_optimize_refuses_what_is_not_crossvit():
    with pytest.raises(ValueError, match="found no CrossViT"):
        crossvit_fast.optimize(nn.Sequential(nn.Linear(3, 3)))


def test_compile_fullgraph_has_no_graph_break():
    model = timm_like().eval()
    crossvit_fast.optimize(model, backend="reference")
    x = torch.randn(1, 3, 240, 240)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def _ddp_worker(rank, world, init_file, x, y, state, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = timm_like(num_classes=4, img_size=96)
    model.load_state_dict(state)
    crossvit_fast.optimize(model, backend="reference")
    ddp = DDP(model)
    shard = slice(rank * 2, rank * 2 + 2)
    F.cross_entropy(ddp(x[shard]), y[shard]).backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.named_parameters()}, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def test_ddp_gradients_equal_a_single_process(tmp_path):
    import torch.multiprocessing as mp

    model = timm_like(num_classes=4, img_size=96)
    state = model.state_dict()
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 2, 3])
    crossvit_fast.optimize(model, backend="reference")
    F.cross_entropy(model(x), y).backward()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, y, state, str(tmp_path)), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "ddp.pt")
    for k, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[k], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_reduce_overhead():
    model = crossvit_fast.optimize(timm_like().cuda().eval(), backend="triton")
    x = torch.randn(2, 3, 240, 240, device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        want = model(x)
        for _ in range(3):  # record, then replay the graph
            got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA parity tests cover it")
@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_optimize_to_triton_in_the_interpreter(name, monkeypatch):
    from crossvit_fast.testing import assert_within_rule, fill_like_fixtures_

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = fill_like_fixtures_(timm_like(name).eval(), 0)
    x = torch.randn(1, 3, 240, 240, dtype=torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x)
        ref32 = model(x.float())
        crossvit_fast.optimize(model, backend="triton")
        assert {b for v in model.backends.values() for b in v} == {"triton"}
        assert_within_rule(model(x.float()), want, ref32, what=f"optimized {name} logits")


# --- train/eval flags ----------------------------------------------------------------------------------------------
def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_optimize_and_revert_keep_every_mode(backend):
    model = timm_like(attn_drop_rate=0.1, drop_rate=0.1).eval()
    crossvit_fast.optimize(model, backend=backend)
    assert not any(_modes(model).values()), [n for n, t in _modes(model).items() if t]
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout in eval
    crossvit_fast.revert(model)
    assert not any(_modes(model).values())

    # train -> optimize -> eval -> revert: everything in eval, the originals included
    model.train()
    crossvit_fast.optimize(model, backend=backend)
    assert all(_modes(model).values())
    model.eval()
    crossvit_fast.revert(model)
    assert not any(_modes(model).values()), [n for n, t in _modes(model).items() if t]
    # and the other way round
    crossvit_fast.optimize(model, backend=backend)
    model.train()
    crossvit_fast.revert(model)
    assert all(_modes(model).values())


def test_optimize_keeps_a_mixed_mode():
    model = timm_like().train()
    model.blocks[0].eval()  # a frozen stage
    crossvit_fast.optimize(model, backend="reference")
    modes = _modes(model)
    assert not any(t for n, t in modes.items() if n.startswith("blocks.0"))
    assert all(t for n, t in modes.items() if n.startswith("blocks.1"))
    crossvit_fast.revert(model)
    modes = _modes(model)
    assert not any(t for n, t in modes.items() if n.startswith("blocks.0"))
    assert all(t for n, t in modes.items() if n.startswith("blocks.1"))


def test_reset_classifier_keeps_the_mode():
    model = crossvit_fast.create_model("crossvit_tiny_240", img_size=96).eval()
    model.reset_classifier(10)
    assert not any(m.training for m in model.modules())
    model.train()
    model.reset_classifier(0)
    assert all(m.training for m in model.modules())


# --- what optimize reports; never slower: what timm runs where nothing is fused ------------------------------------
def test_optimize_says_which_ops_run_fused(monkeypatch):
    monkeypatch.delenv("CROSSVIT_FAST_BACKEND", raising=False)
    model = timm_like()
    out = crossvit_fast.optimize(model)
    assert out is model
    fused = out.crossvit_fast_ops
    assert fused == crossvit_fast.op_backends(model)
    assert set(fused) == {"self_attention", "cls_cross_attention", "layer_norm", "linear"}
    if not torch.cuda.is_available():  # auto: nothing GPU-verified runs here, so all "torch"
        assert fused == {"self_attention": {"torch": 15}, "cls_cross_attention": {"torch": 6},
                         "layer_norm": {"torch": 15}, "linear": {"torch": 15}}
    from crossvit_fast.backend import describe_op_backends

    lines = describe_op_backends(fused)
    assert len(lines) == 4 and all(("fused (triton)" in l) or ("not fused: torch" in l) for l in lines)
    crossvit_fast.optimize(model, backend="reference")
    assert model.crossvit_fast_ops["self_attention"] == {"reference": 15}
    crossvit_fast.revert(model)
    assert not hasattr(model, "crossvit_fast_ops")


def test_torch_backend_runs_sdpa_and_the_reference_runs_explicit_math(monkeypatch):
    """"torch" (auto's non-fused path) runs F.scaled_dot_product_attention as timm does; "reference" never does."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    ref = crossvit_fast.create_model("crossvit_tiny_240", img_size=96, backend="reference").double().eval()
    fast = crossvit_fast.create_model("crossvit_tiny_240", img_size=96, backend="torch").double().eval()
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        want = ref(x)
        assert not calls
        got = fast(x)
    assert len(calls) == 15
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_optimize_refuses_a_gated_attention():
    """timm's Attention has an optional output gate (gated=True): not CrossViT's, never silently dropped."""
    model = timm_like(img_size=96)
    attn = model.blocks[2].blocks[1][-1].attn  # the last one: every other attention is swapped before it
    attn.gate = nn.Linear(192, 192)
    with pytest.raises(ValueError, match="gate"):
        crossvit_fast.optimize(model, backend="reference")
    # nothing half-way: every module before the gated one is back as it was
    assert {"TimmAttention", "TimmMultiScaleBlock"} <= _kinds(model)
    assert not {"Attention", "CrossAttentionBlock", "MultiScaleBlock"} & _kinds(model)
    assert not hasattr(model, "_crossvit_fast_swaps")
