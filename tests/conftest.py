"""Shared fixtures: tiny configs and random native-transformers checkpoints built locally (no hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

KDA, MLA = "linear_attention", "full_attention"


def load_script(path: Path, name: str):  # noqa: ANN201 - the module
    """Import a script that is not part of a package (``examples/...``) as module ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))  # Triton's CPU interpreter runs the kernels' tests on CPU
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def kernel_module(name: str):  # noqa: ANN201 - the module
    """``modeling_kimi_linear.<name>`` (a Triton kernel module) where its kernels can run - a GPU, or Triton's
    interpreter on CPU tensors - else the test skips."""
    import importlib

    pytest.importorskip("triton")
    if KERNEL_DEVICE == "cpu" and not INTERPRET:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    return importlib.import_module(f"modeling_kimi_linear.{name}")


@pytest.fixture(scope="module")
def interpreter_loops_with_numpy_2_4():
    """Triton 3.6's interpreter turns a loop bound into a Python int with ``int(array_of_shape_1)``, which numpy
    >= 2.4 refuses (triton-lang/triton#9171, fixed after 3.6): read the one element explicitly while these tests
    run. Nothing outside the interpreter is touched."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # noqa: ANN001
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = original


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch's compile-time choices, then launches it."""

    def __init__(self, kernel, *keys: str) -> None:  # noqa: ANN001
        self.kernel, self.keys, self.seen = kernel, keys, []

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        def launch(*args, **kwargs):  # noqa: ANN202
            self.seen.append(tuple(kwargs[k] for k in self.keys))
            return self.kernel[grid](*args, **kwargs)

        return launch


SM90_COMPILE = r"""
import json, subprocess, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
{setup}
if "PDL" in names:  # as launched on a Hopper GPU (modeling_kimi_linear/pdl.py)
    const.setdefault("PDL", True)
    signature["PDL"] = "constexpr"
    options = {{**options, "launch_pdl": const["PDL"]}}
src = ASTSource(fn=fn, signature=signature, constexprs={{(names.index(n),): v for n, v in const.items()}}, attrs=attrs)
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
ptx = kernel.asm["ptx"].splitlines()
memory = [i for i, line in enumerate(ptx) if line.strip().startswith(("ld.global", "st.global", "cp.async", "atom.",
                                                                      "red.", "@"))
          and any(op in line for op in ("ld.global", "st.global", "cp.async", "atom.", "red."))]
waits = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
pdl = {{"pdl": const.get("PDL", False), "first_memory": min(memory, default=-1), "first_wait": min(waits, default=-1),
       "waits": len(waits), "signals": sum("griddepcontrol.launch_dependents" in line for line in ptx)}}
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
usage = ""
if tool.exists():
    Path("kernel.cubin").write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([str(tool), "--dump-resource-usage", "kernel.cubin"], capture_output=True, text=True).stdout
print(json.dumps({{"usage": usage, **pdl}}))
"""


def assert_compiles_for_sm90_without_spills(tmp_path: Path, setup: str, *argv: str, spills_ok: bool = False) -> None:
    """Triton's interpreter runs Python, not the compiler: compile a kernel for an H100 / H200 (sm_90, no GPU
    needed) in a fresh process without ``TRITON_INTERPRET``, and check that ptxas keeps it in registers (no
    local-memory spills; checked where triton ships cuobjdump). A kernel with a ``PDL`` switch is compiled as a
    Hopper launch uses it (:mod:`modeling_kimi_linear.pdl`), and its PTX must wait for the previous kernel before
    its first global load, store or atomic (a weight prefetch may come before). ``setup`` is Python that defines
    ``fn`` (the kernel), ``names`` (its argument names), ``const`` (constexpr values by name), ``signature``,
    ``attrs`` and ``options`` for ``triton.compile``; ``argv`` reaches it as ``sys.argv[1:]``. ``spills_ok`` checks
    only that it compiles (a kernel whose measured-fastest tile spills)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-c", SM90_COMPILE.format(setup=setup), *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    usage = report["usage"]
    if usage and not spills_ok:
        assert "STACK:0 " in usage, usage
    if report["pdl"]:  # modeling_kimi_linear/pdl.py's rules 1-2: signal, then wait before any memory access
        assert report["signals"] >= 1 and report["waits"] >= 1, report
        assert 0 <= report["first_wait"] < report["first_memory"], report


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny_native_kwargs(layer_types: list[str] | None = None, **overrides) -> dict:
    """Keyword arguments for transformers' native ``KimiLinearConfig`` at toy width."""
    layer_types = layer_types or [KDA, KDA, KDA, MLA]
    n = len(layer_types)
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, num_local_experts=8, num_experts_per_tok=2, linear_head_dim=16, linear_num_heads=4,
        layer_types=layer_types, mlp_layer_types=["dense"] + ["sparse"] * (n - 1),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs


def make_native_model(layer_types: list[str] | None = None, seed: int = 0, **overrides):
    """A random native ``transformers.KimiLinearForCausalLM`` (fp32, eval mode)."""
    from transformers import KimiLinearConfig as NativeConfig
    from transformers import KimiLinearForCausalLM as NativeModel

    torch.manual_seed(seed)
    model = NativeModel(NativeConfig(**tiny_native_kwargs(layer_types, **overrides))).eval()
    with torch.no_grad():  # non-trivial A_log / dt_bias / norms so that parity tests see every parameter
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_released_dir(native_dir: Path, out_dir: Path) -> Path:
    """Rewrite a native-saved directory into the released Moonshot layout (dense MLP as ``mlp.*``, config with
    ``linear_attn_config`` and Moonshot's ``auto_map``)."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(native_dir / "model.safetensors"))
    cfg = json.loads((native_dir / "config.json").read_text())
    renamed = {}
    for key, value in tensors.items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if layer is not None and cfg["mlp_layer_types"][int(layer)] == "dense":
            key = key.replace(".block_sparse_moe.", ".mlp.")
        renamed[key] = value
    save_file(renamed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    n = cfg["num_hidden_layers"]
    released = {k: v for k, v in cfg.items() if k not in ("layer_types", "mlp_layer_types", "linear_head_dim",
                                                          "linear_num_heads", "linear_conv_kernel_dim", "qk_head_dim")}
    released["linear_attn_config"] = {
        "full_attn_layers": [i + 1 for i in range(n) if cfg["layer_types"][i] == MLA],
        "kda_layers": [i + 1 for i in range(n) if cfg["layer_types"][i] == KDA],
        "head_dim": cfg["linear_head_dim"], "num_heads": cfg["linear_num_heads"],
        "short_conv_kernel_size": cfg["linear_conv_kernel_dim"],
    }
    released["first_k_dense_replace"] = cfg["mlp_layer_types"].index("sparse")
    released["moe_layer_freq"] = 1
    released["mla_use_nope"] = True
    released["moe_router_activation_func"] = "sigmoid"
    released["auto_map"] = {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    }
    (out_dir / "config.json").write_text(json.dumps(released, indent=2))
    return out_dir


@pytest.fixture
def native_model():
    return make_native_model()


@pytest.fixture
def native_dir(tmp_path: Path, native_model) -> Path:
    path = tmp_path / "native"
    native_model.save_pretrained(path)
    return path


@pytest.fixture
def released_dir(tmp_path: Path, native_dir: Path) -> Path:
    return to_released_dir(native_dir, tmp_path / "released")
