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
