"""Conversion between the released Kimi Linear checkpoint layout and ours (installed as kimi_linear_conversion)."""
