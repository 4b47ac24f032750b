"""research/synthetic: the task generators against brute-force solvers written here, answer-only evaluation against
full-logit accuracy, tiny CPU training runs of every task whose loss falls, the time budget, plots/tables and the
sweep planner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # research/ is not an installed package; plain `pytest` does not add the root
    sys.path.insert(0, str(ROOT))

from research.synthetic import plot as synth_plot  # noqa: E402
from research.synthetic import sweep as synth_sweep  # noqa: E402
from research.synthetic import train as synth_train  # noqa: E402
from research.synthetic.evaluation import evaluate  # noqa: E402
from research.synthetic.tasks import TaskSpec, TaskStream  # noqa: E402

# token ids as documented in tasks.py, written literally here
PAD, SEP, PUSH, POP, FIRST_ID = 0, 1, 2, 3, 4


# ------------------------------------------------------------------------------------------- brute-force solvers
def check_mqar(spec: TaskSpec, ids: list[int], labels: list[int]) -> None:
    sep = ids.index(SEP)
    context = ids[:sep]
    keys, values = context[0::2], context[1::2]
    c0 = FIRST_ID + spec.num_stacks
    half = (spec.vocab_size - c0) // 2
    assert len(keys) == spec.num_pairs and len(set(keys)) == len(keys)
    assert all(c0 <= k < c0 + half for k in keys) and all(c0 + half <= v < spec.vocab_size for v in values)
    asked = [p for p, lab in enumerate(labels) if lab != -100]
    assert len(asked) == spec.num_queries
    queried = []
    for p in asked:
        assert p > sep + 1
        key = ids[p - 1]
        # brute force: scan the context for the key
        matches = [i for i in range(0, sep, 2) if ids[i] == key]
        assert len(matches) == 1, "the query must be a context key"
        assert labels[p] == ids[matches[0] + 1] == ids[p]
        queried.append(key)
    assert len(set(queried)) == len(queried)
    for p in range(sep + 1, len(ids)):
        assert ids[p] not in (SEP, PUSH, POP)


def check_palindrome(spec: TaskSpec, ids: list[int], labels: list[int]) -> None:
    n = spec.palindrome_len
    assert ids[n] == SEP and SEP not in ids[:n]
    expected = [-100] * len(ids)
    expected[n + 1 : 2 * n + 1] = list(reversed(ids[:n]))
    assert labels == expected
    assert ids[n + 1 : 2 * n + 1] == list(reversed(ids[:n]))
    assert all(t == PAD for t in ids[2 * n + 1 :])


def check_stack(spec: TaskSpec, ids: list[int], labels: list[int]) -> None:
    stacks: dict[int, list[int]] = {}
    expected = [-100] * len(ids)
    ops = len(ids) // 3
    for op in range(ops):
        kind, sid, value = ids[3 * op : 3 * op + 3]
        assert FIRST_ID <= sid < FIRST_ID + spec.num_stacks
        if kind == PUSH:
            stacks.setdefault(sid, []).append(value)
        else:
            assert kind == POP
            assert stacks.get(sid), "pop from an empty stack"
            top = stacks[sid].pop()
            assert value == top
            expected[3 * op + 2] = top
    assert all(t == PAD for t in ids[3 * ops :])
    assert labels == expected


CHECKS = {"mqar": check_mqar, "palindrome": check_palindrome, "stack": check_stack}


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec("mqar", 1024),
        TaskSpec("mqar", 2048),
        TaskSpec("mqar", 101, vocab_size=200, num_stacks=8, num_pairs=10, num_queries=7, filler="blank"),
        TaskSpec("palindrome", 1024),
        TaskSpec("palindrome", 64, vocab_size=40, num_stacks=4, palindrome_len=20),
        TaskSpec("stack", 1024),
        TaskSpec("stack", 100, vocab_size=30, num_stacks=3, pop_prob=0.7),
    ],
    ids=lambda s: f"{s.task}-{s.seq_len}",
)
def test_generators_agree_with_brute_force(spec):
    spec = spec.resolved()
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids, labels = spec.sample(rng)
        assert ids.shape == labels.shape == (spec.seq_len,) and ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < spec.vocab_size
        CHECKS[spec.task](spec, ids.tolist(), labels.tolist())


def test_documented_defaults():
    assert TaskSpec("mqar", 1024).resolved().num_pairs == 128
    assert TaskSpec("mqar", 1024).resolved().num_queries == 128
    assert TaskSpec("palindrome", 2048).resolved().palindrome_len == 1023
    spec = TaskSpec("stack", 1024).resolved()
    assert (spec.num_stacks, spec.pop_prob, spec.vocab_size) == (64, 0.5, 8192)
    _, labels = spec.sample(np.random.default_rng(1))
    assert 0 < (labels != -100).sum() <= 1024 // 3


@pytest.mark.parametrize(
    "spec, field",
    [
        (TaskSpec("mqar", 64, num_pairs=5, num_queries=6), "num_queries"),
        (TaskSpec("mqar", 64, num_pairs=40), "num_pairs"),
        (TaskSpec("mqar", 2048, vocab_size=300), "num_pairs"),
        (TaskSpec("mqar", 64, filler="zeros"), "filler"),
        (TaskSpec("palindrome", 10, palindrome_len=5), "palindrome_len"),
        (TaskSpec("stack", 2), "seq_len"),
        (TaskSpec("stack", 30, pop_prob=1.5), "pop_prob"),
        (TaskSpec("copy", 30), "task"),
        (TaskSpec("stack", 30, vocab_size=70), "vocab_size"),
    ],
)
def test_bad_knobs_raise_one_error_naming_them(spec, field):
    with pytest.raises(ValueError, match=field):
        spec.resolved()


def test_streams_are_seeded_and_disjoint_from_the_eval_set():
    spec = TaskSpec("mqar", 64, vocab_size=200, num_stacks=4)
    first = lambda seed: next(iter(TaskStream(spec, seed)))["input_ids"]  # noqa: E731
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))
    a, b = spec.batch(8, 11), spec.batch(8, 11)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(spec.batch(8, 12)["input_ids"], a["input_ids"])
    stream = iter(TaskStream(spec, 11))
    train_rows = torch.stack([next(stream)["input_ids"] for _ in range(8)])
    assert not any(torch.equal(r, e) for r in train_rows for e in a["input_ids"])


# ------------------------------------------------------------------------------------------------ evaluation
def test_answer_only_evaluation_equals_full_logits():
    torch.manual_seed(0)
    config = synth_train.build_config(40, "channel", hidden_size=32, num_heads=2, head_dim=16, intermediate_size=48,
                                      backend="torch")
    from modeling_kimi_linear import KimiLinearForCausalLM

    model = KimiLinearForCausalLM(config).eval()
    spec = TaskSpec("stack", 30, vocab_size=40, num_stacks=4)
    batch = spec.batch(12, 0)
    got = evaluate(model, batch, batch_size=5)
    with torch.no_grad():
        logits = model(batch["input_ids"], use_cache=False).logits
    pred, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    mask = target != -100
    acc = ((pred == target) & mask).sum().item() / mask.sum().item()
    seq = sum(bool(((pred[i] == target[i]) | ~mask[i]).all()) for i in range(12) if mask[i].any())
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], target[mask]).item()
    assert got["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert got["seq_accuracy"] == pytest.approx(seq / int(mask.any(1).sum()), abs=1e-9)
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert not model.training


# --------------------------------------------------------------------------------------------- tiny training
TINY = ["--vocab-size", "24", "--num-stacks", "4", "--hidden-size", "32", "--head-dim", "16", "--num-heads", "2",
        "--intermediate-size", "64", "--batch-size", "16", "--eval-every", "10", "--eval-size", "32",
        "--lr", "1e-2", "--warmup-steps", "5", "--device", "cpu", "--cpu-threads", "1", "--quiet"]
# task: (seq_len, gate, number of possible answers: MQAR values / palindrome and stack content tokens)
TASK_SETUP = {"mqar": (16, "channel", 8), "palindrome": (12, "head", 16), "stack": (24, "channel", 16)}
STEPS = 30


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_runs")
    records = {}
    for task, (seq_len, gate, _) in TASK_SETUP.items():
        records[task] = synth_train.main(["--task", task, "--seq-len", str(seq_len), "--steps", str(STEPS),
                                          "--gate", gate, "--out", str(root / task), *TINY])
    return root, records


@pytest.mark.parametrize("task", list(TASK_SETUP))
def test_tiny_training_loss_falls(tiny_runs, task):
    root, records = tiny_runs
    _, gate, _ = TASK_SETUP[task]
    rows = read_rows(root / task)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert rows[0]["loss"] is None and all(r["loss"] is not None for r in rows[1:])
    # held-out answer loss starts near ln(vocab size) and falls; the training loss falls too
    assert abs(rows[0]["eval_loss"] - math.log(24)) < 0.3
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.4
    assert rows[-1]["loss"] < rows[1]["loss"] - 0.2
    final = json.loads((root / task / "final.json").read_text())
    assert final == json.loads(json.dumps(records[task]))
    assert final["steps_done"] == STEPS and final["stopped_by"] == "max_steps" and final["gate"] == gate
    assert final["final"]["accuracy"] == rows[-1]["accuracy"]
    assert final["best"]["accuracy"] == max(r["accuracy"] for r in rows)
    assert final["environment"]["kda_kernels"] == "torch"
    assert final["model"]["config"]["linear_attn_config"]["kda_layers"] == [1, 2]
    assert final["model"]["config"]["linear_attn_config"]["full_attn_layers"] == []
    assert not (root / task / "trainer").exists()


@pytest.mark.slow
@pytest.mark.parametrize("task, steps", [("mqar", 80), ("palindrome", 60), ("stack", 60)])
def test_tiny_training_uses_the_context(tmp_path, task, steps):
    """Longer: the held-out loss drops clearly below ln(#possible answers), which no context-free guess reaches."""
    seq_len, gate, answers = TASK_SETUP[task]
    synth_train.main(["--task", task, "--seq-len", str(seq_len), "--steps", str(steps), "--gate", gate,
                      "--out", str(tmp_path), *TINY])
    rows = read_rows(tmp_path)
    assert rows[-1]["eval_loss"] < math.log(answers) - 0.15
    assert rows[-1]["accuracy"] > 1.5 / answers


def test_gate_parameter_counts_recorded(tiny_runs):
    _, records = tiny_runs
    hidden, dim, heads, layers = 32, 16, 2, 2
    chan = records["mqar"]["model"]["parameters"]["forget_gate"]
    head = records["palindrome"]["model"]["parameters"]["forget_gate"]
    assert chan == layers * (hidden * dim + dim * heads * dim + heads * dim + heads)
    assert head == layers * (hidden * dim + dim * heads + heads + heads)


def test_plots_and_tables(tiny_runs, tmp_path):
    root, _ = tiny_runs
    written = synth_plot.main([str(root), "--out", str(tmp_path)])
    names = sorted(p.name for p in written)
    assert names == sorted(["accuracy_mqar_L16.png", "accuracy_palindrome_L12.png", "accuracy_stack_L24.png",
                            "accuracy_vs_steps.png", "results.md"])
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| mqar | 16 | channel | 0.01 | 30 | max_steps |" in md
    assert "| palindrome | 12 | head | 0.01 | 30 | max_steps |" in md
    empty = tmp_path / "no_runs_here"
    empty.mkdir()
    with pytest.raises(SystemExit):
        synth_plot.main([str(empty), "--out", str(tmp_path)])


def test_time_budget_stops_training(tmp_path):
    out = tmp_path / "budget"
    record = synth_train.main(["--task", "stack", "--seq-len", "24", "--steps", "100000", "--gate", "head",
                               "--time-budget", "6", "--out", str(out), *TINY])
    assert record["stopped_by"] == "time_budget"
    assert 0 < record["steps_done"] < 100000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == record["steps_done"]
    assert record["wall_seconds"] < 6 + 10  # stopped near the budget (generous for a busy CPU)


def test_cli_errors_and_refusal_to_overwrite(tmp_path, tiny_runs, capsys):
    root, _ = tiny_runs
    with pytest.raises(SystemExit):
        synth_train.main(["--task", "mqar", "--seq-len", "64", "--num-pairs", "40", "--out", str(tmp_path)])
    assert "num_pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth_train.main(["--task", "stack", "--seq-len", "24", "--out", str(root / "stack"), *TINY])
    assert "final.json exists" in capsys.readouterr().err


def test_train_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "research.synthetic.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--task", "--seq-len", "--gate", "--lr", "--steps", "--out", "--time-budget"):
        assert flag in out.stdout


# ---------------------------------------------------------------------------------------------------- sweep
def test_sweep_plan(tmp_path, capsys):
    runs = synth_sweep.main(["--out", str(tmp_path), "--tasks", "mqar", "stack", "--seq-lens", "1024", "2048",
                             "--lrs", "1e-4", "5e-4", "--gpus", "0", "1", "--per-gpu", "3", "--time-budget", "480",
                             "--dry-run", "--", "--batch-size", "64"])
    assert len(runs) == 2 * 2 * 2 * 2
    assert len({r.name for r in runs}) == len(runs)
    assert [r.seq_len for r in runs[:8]] == [2048] * 8  # longest first
    first = runs[0]
    assert first.name == "mqar_L2048_channel_lr1e-04"
    assert first.args[-2:] == ["--batch-size", "64"] and "--gate" in first.args
    printed = capsys.readouterr().out
    assert printed.count("python -m research.synthetic.train") == 16
    with pytest.raises(SystemExit):
        synth_sweep.main(["--out", str(tmp_path), "--time-budget", "10", "--dry-run", "--", "--lr", "1"])


@pytest.mark.slow
def test_sweep_runs_on_cpu(tmp_path):
    # the sweep sets --lr, --device and --quiet itself
    extra = [a for i, a in enumerate(TINY) if a not in ("--device", "--quiet", "--lr")
             and TINY[i - 1] not in ("--device", "--lr")]
    runs = synth_sweep.main(["--out", str(tmp_path), "--tasks", "stack", "--seq-lens", "24", "--lrs", "1e-2",
                             "--gpus", "cpu", "--per-gpu", "2", "--time-budget", "300", "--min-run-seconds", "5",
                             "--steps", "10", "--plot", "--", *extra])
    assert [r.status for r in runs] == ["done", "done"]
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["returncode"] for r in summary["runs"]] == [0, 0]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "accuracy_vs_steps.png").is_file()
    # a second sweep finds the finished runs and does nothing
    again = synth_sweep.main(["--out", str(tmp_path), "--tasks", "stack", "--seq-lens", "24", "--lrs", "1e-2",
                              "--gpus", "cpu", "--time-budget", "300", "--steps", "10", "--", *extra])
    assert [r.status for r in again] == ["finished-before", "finished-before"]
