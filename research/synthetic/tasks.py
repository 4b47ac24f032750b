"""Generators for the three synthetic tasks of the Kimi Linear report (Figure 4): MQAR, Palindrome and Stack.

Every example is ``(input_ids, labels)``, both ``int64 [seq_len]``. ``labels[t]`` is the token the model must
produce at position ``t`` (predicted from positions ``< t``, the causal-LM convention of transformers, which shifts
by one inside the loss) and ``-100`` wherever nothing is asked: only answer tokens are trained and scored.

Token layout, shared by all tasks (``vocab_size`` V, ``num_stacks`` S)::

    0 PAD   1 SEP   2 PUSH   3 POP   4 .. 4+S-1 stack ids   4+S .. V-1 content tokens

* **MQAR** (multi-query associative recall)::

      k1 v1 k2 v2 ... kN vN SEP  [query region: N' "q a" pairs at random places, filler elsewhere]  PAD*

  Keys are distinct, drawn from the first half of the content tokens; values (any, repeats allowed) from the
  second half. Each query ``q`` is one of the context keys (each queried at most once) and is followed by its
  value ``a``, the labelled answer. Filler is random content tokens (``filler="random"``, as Zoology's MQAR) or
  PAD (``"blank"``). Defaults: ``num_pairs = seq_len // 8``, ``num_queries = num_pairs``.
* **Palindrome**: ``x1 .. xn SEP xn .. x1 PAD*`` with ``x`` uniform over the content tokens; the reversed half is
  labelled. Default ``n = (seq_len - 1) // 2`` (the whole length is used).
* **Stack**: ``seq_len // 3`` operations of three tokens on S independent stacks: ``PUSH id x`` pushes ``x`` on
  stack ``id``; ``POP id x`` pops stack ``id``, whose top was ``x`` -- that ``x`` is the labelled answer. An
  operation is a pop with probability ``pop_prob`` when some stack is non-empty (from a uniformly chosen non-empty
  stack), otherwise a push onto a uniformly chosen stack of a uniformly chosen content token.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a seed fixes every example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

PAD, SEP, PUSH, POP = 0, 1, 2, 3
FIRST_STACK_ID = 4
IGNORE = -100
TASKS = ("mqar", "palindrome", "stack")
FILLERS = ("random", "blank")
# spawn keys of the two random streams: training examples and the held-out evaluation set never share a stream
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass(frozen=True)
class TaskSpec:
    """One task at one length with all of its knobs; ``None`` knobs take their documented default in
    :meth:`resolved`.

    Attributes:
        task: ``"mqar"``, ``"palindrome"`` or ``"stack"``.
        seq_len: tokens per example (the paper's "training length").
        vocab_size: size of the whole vocabulary (special tokens, stack ids and content tokens).
        num_stacks: stacks of the Stack task (64 in the paper); their ids are reserved in every task.
        num_pairs: MQAR key-value pairs (default ``seq_len // 8``).
        num_queries: MQAR queries, at most ``num_pairs`` (default ``num_pairs``).
        filler: MQAR query-region filler, ``"random"`` content tokens or ``"blank"`` (PAD).
        palindrome_len: tokens to reverse (default ``(seq_len - 1) // 2``).
        pop_prob: Stack probability that an operation pops (when some stack is non-empty).
    """

    task: str
    seq_len: int
    vocab_size: int = 8192
    num_stacks: int = 64
    num_pairs: int | None = None
    num_queries: int | None = None
    filler: str = "random"
    palindrome_len: int | None = None
    pop_prob: float = 0.5

    # ------------------------------------------------------------------ layout
    @property
    def content_start(self) -> int:
        """First content token id (after PAD, SEP, PUSH, POP and the stack ids)."""
        return FIRST_STACK_ID + self.num_stacks

    @property
    def num_content(self) -> int:
        return self.vocab_size - self.content_start

    @property
    def num_keys(self) -> int:
        """MQAR key tokens: the first half of the content tokens (values are the rest)."""
        return self.num_content // 2

    # ------------------------------------------------------------------ validation
    def resolved(self) -> "TaskSpec":
        """A copy with every default filled in; raises one ``ValueError`` naming the first bad knob."""
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        _positive("seq_len", self.seq_len)
        _positive("num_stacks", self.num_stacks)
        _positive("vocab_size", self.vocab_size)
        if self.num_content < 4:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves {self.num_content} content tokens after the "
                f"{self.content_start} special and stack-id tokens; need at least 4"
            )
        spec = self
        if self.task == "mqar":
            pairs = self.seq_len // 8 if self.num_pairs is None else self.num_pairs
            queries = pairs if self.num_queries is None else self.num_queries
            spec = dataclasses.replace(self, num_pairs=pairs, num_queries=queries)
            _positive("num_pairs", pairs)
            _positive("num_queries", queries)
            if queries > pairs:
                raise ValueError(f"num_queries={queries} exceeds num_pairs={pairs} (each key is queried at most once)")
            if pairs > self.num_keys:
                raise ValueError(
                    f"num_pairs={pairs} exceeds the {self.num_keys} distinct key tokens of vocab_size="
                    f"{self.vocab_size}; raise vocab_size"
                )
            slots = (self.seq_len - 2 * pairs - 1) // 2
            if queries > slots:
                raise ValueError(
                    f"num_pairs={pairs} and num_queries={queries} need {2 * pairs + 1 + 2 * queries} tokens "
                    f"> seq_len={self.seq_len}"
                )
            if self.filler not in FILLERS:
                raise ValueError(f"filler={self.filler!r} must be one of {FILLERS}")
        elif self.task == "palindrome":
            length = (self.seq_len - 1) // 2 if self.palindrome_len is None else self.palindrome_len
            spec = dataclasses.replace(self, palindrome_len=length)
            _positive("palindrome_len", length)
            if 2 * length + 1 > self.seq_len:
                raise ValueError(f"palindrome_len={length} needs {2 * length + 1} tokens > seq_len={self.seq_len}")
        else:
            if self.seq_len < 3:
                raise ValueError(f"seq_len={self.seq_len}: a Stack example needs at least one 3-token operation")
            if not 0.0 <= self.pop_prob <= 1.0:
                raise ValueError(f"pop_prob={self.pop_prob} must be in [0, 1]")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The resolved knobs, for the run record."""
        out = dataclasses.asdict(self.resolved())
        keep = {"mqar": ("num_pairs", "num_queries", "filler"), "palindrome": ("palindrome_len",),
                "stack": ("num_stacks", "pop_prob")}[self.task]
        drop = {"num_pairs", "num_queries", "filler", "palindrome_len", "pop_prob"} - set(keep)
        return {k: v for k, v in out.items() if k not in drop}

    # ------------------------------------------------------------------ sampling
    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One ``(input_ids, labels)`` pair of ``int64 [seq_len]`` arrays (call on a :meth:`resolved` spec)."""
        return _SAMPLERS[self.task](self, rng)

    def batch(self, size: int, seed: int) -> dict[str, torch.Tensor]:
        """A fixed held-out batch: ``{"input_ids", "labels"}`` of shape ``[size, seq_len]``, from a random stream
        that the training stream of any seed never uses."""
        spec = self.resolved()
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_EVAL_STREAM,)))
        pairs = [spec.sample(rng) for _ in range(size)]
        return {
            "input_ids": torch.from_numpy(np.stack([p[0] for p in pairs])),
            "labels": torch.from_numpy(np.stack([p[1] for p in pairs])),
        }


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _blank(spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    return np.full(spec.seq_len, PAD, dtype=np.int64), np.full(spec.seq_len, IGNORE, dtype=np.int64)


def sample_mqar(spec: TaskSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``k1 v1 .. kN vN SEP`` then the query region (see the module docstring)."""
    ids, labels = _blank(spec)
    n, m, c0 = spec.num_pairs, spec.num_queries, spec.content_start
    keys = rng.choice(spec.num_keys, size=n, replace=False) + c0
    values = rng.integers(c0 + spec.num_keys, spec.vocab_size, size=n)
    ids[0 : 2 * n : 2] = keys
    ids[1 : 2 * n : 2] = values
    ids[2 * n] = SEP
    start = 2 * n + 1
    if spec.filler == "random":
        ids[start:] = rng.integers(c0, spec.vocab_size, size=spec.seq_len - start)
    slots = np.sort(rng.choice((spec.seq_len - start) // 2, size=m, replace=False))
    asked = rng.choice(n, size=m, replace=False)
    where = start + 2 * slots
    ids[where] = keys[asked]
    ids[where + 1] = values[asked]
    labels[where + 1] = values[asked]
    return ids, labels


def sample_palindrome(spec: TaskSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``x1 .. xn SEP xn .. x1`` with the reversed half labelled."""
    ids, labels = _blank(spec)
    n = spec.palindrome_len
    tokens = rng.integers(spec.content_start, spec.vocab_size, size=n)
    ids[:n] = tokens
    ids[n] = SEP
    ids[n + 1 : 2 * n + 1] = tokens[::-1]
    labels[n + 1 : 2 * n + 1] = tokens[::-1]
    return ids, labels


def sample_stack(spec: TaskSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``seq_len // 3`` PUSH / POP operations on ``num_stacks`` stacks; popped values are labelled."""
    ids, labels = _blank(spec)
    num_ops = spec.seq_len // 3
    coins = (rng.random(num_ops) < spec.pop_prob).tolist()
    picks = rng.random(num_ops).tolist()
    targets = rng.integers(spec.num_stacks, size=num_ops).tolist()
    pushed = rng.integers(spec.content_start, spec.vocab_size, size=num_ops).tolist()
    stacks: list[list[int]] = [[] for _ in range(spec.num_stacks)]
    nonempty: list[int] = []  # ids of non-empty stacks, with their index in ``slot``
    slot = [-1] * spec.num_stacks
    out_ids = [PAD] * (3 * num_ops)
    answers = []
    for op in range(num_ops):
        base = 3 * op
        if nonempty and coins[op]:
            sid = nonempty[int(picks[op] * len(nonempty))]
            value = stacks[sid].pop()
            if not stacks[sid]:  # swap-remove from the non-empty list
                i, last = slot[sid], nonempty[-1]
                nonempty[i], slot[last] = last, i
                nonempty.pop()
                slot[sid] = -1
            out_ids[base] = POP
            answers.append(base + 2)
        else:
            sid, value = targets[op], pushed[op]
            if not stacks[sid]:
                slot[sid] = len(nonempty)
                nonempty.append(sid)
            stacks[sid].append(value)
            out_ids[base] = PUSH
        out_ids[base + 1] = FIRST_STACK_ID + sid
        out_ids[base + 2] = value
    ids[: 3 * num_ops] = out_ids
    labels[answers] = ids[answers]
    return ids, labels


_SAMPLERS = {"mqar": sample_mqar, "palindrome": sample_palindrome, "stack": sample_stack}


class TaskStream(IterableDataset):
    """An endless, seeded stream of training examples (``{"input_ids", "labels"}`` int64 tensors).

    Each DataLoader worker draws from its own random stream (``SeedSequence(seed, spawn_key=(0, worker))``), so
    the data are a deterministic function of ``seed`` and the number of workers.
    """

    def __init__(self, spec: TaskSpec, seed: int) -> None:
        super().__init__()
        self.spec = spec.resolved()
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_TRAIN_STREAM, worker)))
        while True:
            ids, labels = self.spec.sample(rng)
            yield {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
