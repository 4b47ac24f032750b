"""fla's short-convolution and gated-norm kernels against our PyTorch references, on a CPU, through Triton's
interpreter: checks the calling conventions (state layout, padding, packing, gradients) where no GPU is lent.

Needs triton, which CI and the development install leave out; use a separate environment:

    python -m venv --system-site-packages /tmp/vtri && /tmp/vtri/bin/pip install triton==3.6.0
    /tmp/vtri/bin/python bench/fla_interpret_check.py

Tiny fp32 shapes (the interpreter runs kernels element by element in numpy). Prints max abs differences; the GPU
numbers at full width come from ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # before torch and triton are imported (an importing process is left as it is)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

if not __package__:  # run as a script from a checkout: make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_kimi_linear.kda_fla import gated_rms_norm_fla, short_conv_fla  # noqa: E402  (imports fla lazily)
from modeling_kimi_linear.norms import gated_rms_normalize  # noqa: E402
from modeling_kimi_linear.short_conv_torch import positions_in_documents, short_conv_torch  # noqa: E402


def use_interpreter() -> None:
    """Check that Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported,
    which running this file as a script does) and make the autotuner take the first config instead of timing them
    on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("run this check as a script (python bench/fla_interpret_check.py) or with "
                           "TRITON_INTERPRET=1 set before Python starts: Triton reads it when it is imported")
    from triton.runtime import autotuner

    autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [1.0, 1.0, 1.0]


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    print(f"{name:45s} max abs diff {(a - b).abs().max().item():.2e}")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    use_interpreter()
    torch.manual_seed(0)
    channels, width = 16, 4
    w = torch.randn(channels, width)
    for seqlen in (37, 2):
        x = torch.randn(2, seqlen, channels)
        for state in (None, torch.randn(2, channels, width - 1)):
            (y_f, s_f), (y_t, s_t) = short_conv_fla(x, w, state), short_conv_torch(x, w, state)
            report(f"conv T={seqlen} state={state is not None} output", y_f, y_t)
            report(f"conv T={seqlen} state={state is not None} final state", s_f, s_t)
    x = torch.randn(2, 20, channels)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :7] = False
    (y_f, s_f), (y_t, s_t) = short_conv_fla(x, w, None, token_mask=mask), short_conv_torch(x, w, None, mask)
    report("conv left-padded output", y_f, y_t)
    report("conv left-padded final state", s_f, s_t)
    xp = torch.randn(1, 30, channels)
    cu = torch.tensor([0, 11, 12, 30], dtype=torch.int32)
    y_f, s_f = short_conv_fla(xp, w, None, cu_seqlens=cu)
    y_t, _ = short_conv_torch(xp, w, None, pos_in_doc=positions_in_documents(cu.long(), 30))
    report("conv packed documents output", y_f, y_t)
    print(f"{'conv packed documents: no state returned':45s} {s_f is None}")
    x = torch.randn(2, 23, channels, requires_grad=True)
    wg = w.clone().requires_grad_()
    probe = torch.linspace(-1, 1, channels)
    grads = []
    for fn in (short_conv_fla, short_conv_torch):
        (fn(x, wg, None)[0] * probe).sum().backward()
        grads.append((x.grad, wg.grad))
        x.grad = wg.grad = None
    report("conv gradient wrt x", grads[0][0], grads[1][0])
    report("conv gradient wrt weight", grads[0][1], grads[1][1])
    o, g, nw = torch.randn(3, 5, 2, 16), torch.randn(3, 5, 2, 16), torch.randn(16)
    report("gated RMS norm output", gated_rms_norm_fla(o, g, nw, 1e-5), gated_rms_normalize(o, g, nw, 1e-5))
    print("gated RMS norm gradients: not run (fla's backward kernel does not run under the interpreter)")


if __name__ == "__main__":
    main()
