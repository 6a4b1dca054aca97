"""Training behaviour: every parameter gets a gradient, dropout/drop-path differ in train and eval, checkpointing."""

import pytest
import torch

import crossvit_fast


def _tiny(**kw):
    torch.manual_seed(0)
    return crossvit_fast.create_model("crossvit_tiny_240", backend="reference", num_classes=10, **kw)


def test_one_training_step_reaches_every_parameter():
    model = _tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(2, 3, 240, 240), torch.tensor([1, 7])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []
    opt.step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]
    assert unchanged == []


def test_dropout_and_drop_path_act_in_train_only():
    model = _tiny(drop_rate=0.3, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)
    x = torch.randn(4, 3, 240, 240)
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x), model(x)
    assert torch.equal(e1, e2)
    model.train()
    with torch.no_grad():
        t1, t2 = model(x), model(x)
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, e1)
    # drop path rates follow timm's linear rule over the 3 x M large-branch depth
    rates = [m.drop_prob for m in model.modules() if isinstance(m, crossvit_fast.layers.DropPath)]
    assert max(rates) == pytest.approx(0.3) and min(rates) > 0.0


def test_drop_path_zeroes_whole_samples_and_rescales():
    dp = crossvit_fast.layers.DropPath(0.5).train()
    out = dp(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert abs(out.mean().item() - 1.0) < 0.1
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 240, 240, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        model = _tiny().double().eval()
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-12)


def _fused_op_call(op, dev):
    """A small differentiable call of one fused op: (function of its inputs, the inputs)."""
    r = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
    C, H = 32, 2
    if op == "layer_norm":
        from crossvit_fast.ops.layer_norm import layer_norm
        return lambda x, w, b: layer_norm(x, w, b), (r(2, 5, C), r(C), r(C))
    if op == "self_attention":
        from crossvit_fast.ops.self_attention import self_attention
        return lambda qkv: self_attention(qkv, H), (r(2, 7, 3 * C),)
    if op == "cls_cross_attention":
        from crossvit_fast.ops.cls_cross_attention import cls_cross_attention
        return (lambda c, t, *p: cls_cross_attention(c, t, *p, num_heads=H),
                (r(2, 1, C), r(2, 6, C), r(C), r(C), *[r(C, C) if i % 2 == 0 else r(C) for i in range(8)]))
    if op == "linear":
        from crossvit_fast.ops.linear import linear
        return lambda x, w, b, lw, lb: linear(x, w, b, lw, lb, gelu=True), (r(2, 5, C), r(48, C), r(48), r(C), r(C))
    if op == "block_half":
        from crossvit_fast.ops.block import block_half
        return (lambda x, lw, lb, w1, b1, w2, b2: block_half(x, lw, lb, w1, b1, w2, b2, num_heads=H),
                (r(2, 5, C), r(C), r(C), r(3 * C, C), r(3 * C), r(C, C), r(C)))
    raise AssertionError(op)


@pytest.mark.skipif(not crossvit_fast.backend.triton_status()[0], reason="fused path cannot run here")
@pytest.mark.parametrize("op", ["layer_norm", "self_attention", "cls_cross_attention", "linear", "block_half"])
def test_fused_op_double_backward_refused_in_our_words(op):
    """A gradient penalty through a fused op: the first-order gradient with ``create_graph=True`` is the plain
    gradient; the backward through it raises crossvit_fast's message, which names the way out (backend='torch')."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    f, args = _fused_op_call(op, dev)
    loss = lambda: f(*args).float().square().sum()  # noqa: E731
    plain = torch.autograd.grad(loss(), args)
    graphed = torch.autograd.grad(loss(), args, create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())
    penalty = sum(g.float().square().sum() for g in graphed)
    with pytest.raises(RuntimeError, match=rf"crossvit_fast: the fused {op} op has no double backward.*backend='torch'"):
        penalty.backward()
