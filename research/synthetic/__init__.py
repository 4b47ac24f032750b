"""Synthetic recall / state-tracking tasks of the Kimi Linear report (Figure 4: MQAR, Palindrome, Stack) and the
scripts that train the package's model on them, to compare KDA's per-channel forget gate with Gated DeltaNet's
per-head one (``kda_gate_granularity``). See ``README.md`` in this folder."""
