"""save_pretrained writes a self-contained checkpoint: the package's modules copied flat next to the weights and an
auto_map, so AutoModelForCausalLM(trust_remote_code=True) loads it where this package cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.presets import load_preset

LOADER = r"""
import json, os, sys
sys.modules["modeling_kimi_linear"] = None  # the installed package must not be importable
import torch
from transformers import AutoConfig, AutoModelForCausalLM
path, prompt = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
from transformers import AutoModel
base = AutoModel.from_pretrained(path, trust_remote_code=True)
copied = sorted(os.listdir(os.path.dirname(sys.modules[type(model).__module__].__file__)))
print(json.dumps({"files": copied, "module": type(model).__module__, "config": type(config).__module__, "tokens": out[0].tolist(),
                  "base": type(base).__module__ + "." + type(base).__name__}))
"""


def imported_modules(package: Path, roots: tuple[str, ...]) -> set[str]:
    """The package's modules that ``roots`` import, directly or not, in any form of relative import (``from .x
    import y``, ``from . import x``, inside functions too): every file a remote-code checkpoint needs."""
    needed, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in needed or not (package / f"{name}.py").is_file():
            continue
        needed.add(name)
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
    return {f"{name}.py" for name in needed}


def test_saved_checkpoint_loads_as_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(load_preset("tiny")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"modeling_kimi_linear.py", "configuration_kimi_linear.py", "kda_torch.py", "kernels.py"} <= files
    # the GPU-only modules (Triton kernels, pdl, recorded tuning) too, though this CPU run never imports them
    package = Path(sys.modules[KimiLinearForCausalLM.__module__].__file__).parent
    needed = imported_modules(package, ("modeling_kimi_linear", "configuration_kimi_linear"))
    assert {"moe_decode_triton.py", "pdl.py", "triton_tuning.py", "triton_tuned_configs.py"} <= needed
    assert needed <= files, f"missing from the checkpoint: {sorted(needed - files)}"
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_kimi_linear.KimiLinearForCausalLM"
    assert auto_map["AutoModel"] == "modeling_kimi_linear.KimiLinearModel"

    prompt = [5, 6, 7, 8, 9]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "ckpt"), json.dumps(prompt)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert needed <= set(got["files"]), f"not copied by transformers: {sorted(needed - set(got['files']))}"
    assert got["module"].startswith("transformers_modules.") and got["config"].startswith("transformers_modules.")
    assert got["tokens"] == expected[0].tolist()
    assert got["base"].startswith("transformers_modules.") and got["base"].endswith(".KimiLinearModel")


def test_shipped_tuning_records_are_a_literal_that_dump_can_extend():
    from modeling_kimi_linear import triton_tuning

    shipped = triton_tuning.read(triton_tuning.TUNED_FILE)  # ast.literal_eval of the module's RECORDS
    assert shipped == triton_tuning.SHIPPED and shipped, "triton_tuned_configs.py holds no records"
    assert all(" | fla " in machine and " | triton " in machine for machine in shipped)


def test_saving_a_model_loaded_from_a_released_layout_names_only_modules_it_writes(released_dir, tmp_path):
    """A config loaded from the release keeps Moonshot's auto_map (``modeling_kimi.KimiLinearModel``...); the saved
    folder must name only the modules written beside it, for ``AutoModel`` as for ``AutoModelForCausalLM``."""
    model = KimiLinearForCausalLM.from_pretrained(released_dir)
    model.save_pretrained(tmp_path / "out")
    auto_map = json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(auto_map)
    for key, value in auto_map.items():
        for reference in value if isinstance(value, list) else [value]:
            if reference is not None:
                module = reference.split("--")[-1].rsplit(".", 1)[0]
                assert (tmp_path / "out" / f"{module}.py").is_file(), f"{key}: {reference}"


def test_checkpoint_modules_require_only_the_packages_the_package_requires():
    """transformers refuses a remote-code checkpoint whose copied modules import a package that is not installed
    (imports inside a ``try`` excepted, wherever they are): every module a checkpoint carries may import only the
    standard library and what setup.cfg's install_requires brings (tokenizers comes with transformers)."""
    import configparser

    from transformers.dynamic_module_utils import get_imports

    package = Path(sys.modules[KimiLinearForCausalLM.__module__].__file__).parent
    setup = configparser.ConfigParser()
    setup.read(package.parent / "setup.cfg")
    required = {line.split(">")[0].split("=")[0].split("<")[0].strip()
                for line in setup["options"]["install_requires"].strip().splitlines()}
    allowed = set(sys.stdlib_module_names) | required | {"tokenizers"}
    for module in sorted(imported_modules(package, ("modeling_kimi_linear", "configuration_kimi_linear"))):
        extra = set(get_imports(str(package / module))) - allowed
        assert not extra, f"{module} imports {sorted(extra)} outside a try block"
