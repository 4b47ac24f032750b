"""Check that FSDP2 training gives what the same training gives in one process: loss and every parameter, each step.

    torchrun --nproc-per-node 2 examples/multi_gpu/fsdp_check.py                 # GPUs with nccl, else CPU with gloo
    torchrun --nproc-per-node 2 examples/multi_gpu/fsdp_check.py --cpu --steps 4

Every process builds the same randomly initialised preset model (``--preset``, default ``tiny``) in float32 and keeps
two copies: one sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) the way ``fsdp.yaml`` asks accelerate
to do it - each ``KimiDecoderLayer`` its own unit, then the whole model, parameters resharded after the forward -
and one left whole. Each step draws one global batch of ``world * --batch-size`` equal-length random sequences; the
sharded copy trains on this process's share of the rows, the whole copy on every row, both with AdamW. Equal lengths
give every process as many labelled tokens, so the mean of the processes' mean losses (FSDP averages gradients over
processes) is the whole batch's mean loss and the two runs compute the same update.

After every step the sharded parameters are gathered (``DTensor.full_tensor``) and compared with the whole copy's;
the losses are compared after averaging over processes. Process 0 prints each step's largest differences and the
parameter that holds the largest; the exit status is 1 when any difference is above ``--tol`` (default 1e-5).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

if not __package__:  # run as a script from a checkout: make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import available_presets, load_preset  # noqa: E402


def largest_difference(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[float, str]:
    """``(max |a - b|, name)`` over ``(name, a, b)`` triples: the largest elementwise difference and where it is."""
    worst, where = 0.0, "-"
    for name, a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        diff = (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0
        if diff > worst or (math.isnan(diff) and not math.isnan(worst)):  # NaN counts as the largest
            worst, where = diff, name
    return worst, where


def within(differences: Iterable[float], tol: float) -> bool:
    """True when every difference is a number no larger than ``tol``."""
    return all(d <= tol for d in differences)  # False for NaN


def shard(model: torch.nn.Module, mesh) -> None:  # noqa: ANN001
    """FSDP2 as examples/multi_gpu/fsdp.yaml configures accelerate: one unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=available_presets())
    parser.add_argument("--steps", type=int, default=5, help="training steps, each compared")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--seq-len", type=int, default=48, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--tol", type=float, default=1e-5, help="largest allowed difference (loss and parameters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="CPU and gloo even where GPUs are present")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run it with torchrun, e.g. torchrun --nproc-per-node 2 examples/multi_gpu/fsdp_check.py")

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    use_cuda = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mesh = init_device_mesh(device.type, (world,))
        torch.manual_seed(args.seed)  # the same weights in every process
        whole = KimiLinearForCausalLM(load_preset(args.preset)).to(device).train()
        sharded = copy.deepcopy(whole)
        shard(sharded, mesh)
        names = [name for name, _ in whole.named_parameters()]
        if names != [name for name, _ in sharded.named_parameters()]:
            raise RuntimeError("sharding changed the parameter names")
        opt_whole = torch.optim.AdamW(whole.parameters(), lr=args.lr, weight_decay=0.01)
        opt_sharded = torch.optim.AdamW(sharded.parameters(), lr=args.lr, weight_decay=0.01)
        data = torch.Generator().manual_seed(args.seed + 1)
        rows = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        if rank == 0:
            print(f"FSDP2 over {world} processes ({device.type}, {dist.get_backend()}), preset {args.preset}, float32, "
                  f"{args.steps} steps of {world} x {args.batch_size} sequences of {args.seq_len} tokens", flush=True)
            print("step | loss (one process) | |loss difference| | max |parameter difference| | where", flush=True)
        worst: list[float] = []
        for step in range(1, args.steps + 1):
            batch = torch.randint(3, whole.config.vocab_size, (world * args.batch_size, args.seq_len),
                                  generator=data).to(device)
            loss_whole = whole(input_ids=batch, labels=batch, use_cache=False).loss
            loss_whole.backward()
            opt_whole.step()
            opt_whole.zero_grad(set_to_none=True)

            mine = batch[rows]
            loss = sharded(input_ids=mine, labels=mine, use_cache=False).loss
            loss.backward()
            opt_sharded.step()
            opt_sharded.zero_grad(set_to_none=True)

            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # every process sees the same numbers from here on
            mean_loss /= world
            loss_diff = (mean_loss - loss_whole.detach()).abs().item()
            gathered = ((name, p.full_tensor(), q) for (name, p), (_, q) in
                        zip(sharded.named_parameters(), whole.named_parameters()))
            param_diff, where = largest_difference(gathered)
            worst += [loss_diff, param_diff]
            if rank == 0:
                print(f"{step:4d} | {loss_whole.item():.6f} | {loss_diff:.3e} | {param_diff:.3e} | {where}", flush=True)
        ok = within(worst, args.tol)
        if rank == 0:
            print(f"largest difference {max(worst):.3e} (tolerance {args.tol:g}): {'PASS' if ok else 'FAIL'}",
                  flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
