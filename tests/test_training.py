"""Training on CPU: the shifted cross-entropy, gradient checkpointing, packed documents, and a short Trainer run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.presets import load_preset


def tiny(seed: int = 0) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(load_preset("tiny"))


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_loss_is_the_shifted_cross_entropy_with_ignore_index():
    model = tiny().eval()
    x = ids(2, 40)
    labels = x.clone()
    labels[0, :10] = -100
    out = model(x, labels=labels, use_cache=False)
    logits = out.logits.float()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    # gradient accumulation: with num_items_in_batch the loss is a sum divided by that count
    n = int((labels[:, 1:] != -100).sum())
    out = model(x, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(2 * n))
    assert torch.allclose(out.loss, expected / 2, atol=1e-6)


def _grads(model: KimiLinearForCausalLM, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x, labels=x, use_cache=False, **kwargs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    x = ids(2, 70)
    plain = _grads(model, x)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _grads(model, x)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_packed_documents_train_like_separate_documents():
    """Loss and gradients of a packed batch (restarting position_ids) equal those of the documents run separately
    (sum of token losses, so the two normalisations agree)."""
    model = tiny().train()
    docs = [ids(1, n, seed=n) for n in (30, 65, 17)]
    packed = torch.cat(docs, 1)
    labels = packed.clone()
    starts = [0, 30, 95]
    labels[0, starts] = -100  # no token predicts a document's first token across a boundary
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    total = sum(d.shape[1] - 1 for d in docs)

    model.zero_grad(set_to_none=True)
    # as Trainer calls it (DataCollatorWithFlattening): no use_cache argument; a training forward keeps no cache
    loss = model(packed, labels=labels, position_ids=position_ids, num_items_in_batch=torch.tensor(total)).loss
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    separate = sum(model(d, labels=d, use_cache=False, num_items_in_batch=torch.tensor(total)).loss for d in docs)
    separate.backward()
    assert torch.allclose(loss, separate, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_trainer_fits_a_repeating_pattern(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Repeats(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict:
            row = torch.arange(3, 3 + 32) % 20 + 3 + (i % 4)
            return {"input_ids": row, "labels": row.clone()}

    model = tiny()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Repeats())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 25
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, f"loss did not fall: {losses[:5]} ... {losses[-5:]}"


def test_router_balance_loss_is_added_when_asked():
    model = tiny().train()
    model.config.router_aux_loss_coef = 0.01
    x = ids(2, 30)
    plain = model(x, labels=x, use_cache=False)
    assert plain.aux_loss is None and plain.router_logits is None
    out = model(x, labels=x, use_cache=False, output_router_logits=True)
    gates = [layer.block_sparse_moe.gate for layer in model.model.layers if hasattr(layer, "block_sparse_moe")]
    assert len(out.router_logits) == len(gates) == 3
    # independent computation: E * sum_e (share of routing slots of e) * (mean normalised score of e)
    per_layer = []
    for gate, logits in zip(gates, out.router_logits):
        scores = torch.sigmoid(logits)
        chosen = (scores + gate.e_score_correction_bias).topk(gate.top_k, -1).indices
        share = torch.stack([(chosen == e).float().sum() for e in range(gate.num_experts)]) / chosen.numel()
        per_layer.append(gate.num_experts * (share * (scores / scores.sum(-1, keepdim=True)).mean(0)).sum())
    expected_aux = torch.stack(per_layer).mean()
    assert torch.allclose(out.aux_loss, expected_aux, atol=1e-6)
    assert torch.allclose(out.loss, plain.loss + 0.01 * expected_aux, atol=1e-6)
    out.loss.backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates)


def test_router_correction_bias_is_not_trained():
    """The bias-corrected routing weights depend on e_score_correction_bias, yet an optimizer step leaves it alone."""
    model = tiny().train()
    gate = model.model.layers[1].block_sparse_moe.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, gate.num_experts))
    before_bias, before_weight = gate.e_score_correction_bias.clone(), gate.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(2, 30)
    model(x, labels=x, use_cache=False).loss.backward()
    optimizer.step()
    assert gate.e_score_correction_bias.grad is None
    assert torch.equal(gate.e_score_correction_bias, before_bias)
    assert not torch.equal(gate.weight, before_weight)


def test_evaluation_after_fused_optimizer_steps_sees_the_new_weights():
    """Fused optimizers (Trainer's default adamw_torch_fused) update parameters without bumping their version
    counters: nothing in an inference forward may cache tensors derived from the weights across steps."""
    model = tiny()
    x = ids(2, 24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(3):
        model.eval()
        with torch.no_grad():
            inference = model(x, use_cache=False).logits
        tracked = model(x, use_cache=False).logits.detach()
        assert (inference - tracked).abs().max().item() <= 1e-5
        model.train()
        model(x, labels=x, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
