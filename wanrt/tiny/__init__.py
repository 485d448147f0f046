"""The shipped trained tiny FLF2V model: synthetic data, training helpers and quality metrics.

`wanrt.models.tiny.cached("tiny")` returns the trained checkpoint under wanrt/assets/tiny;
scripts/train_tiny.py rebuilds it and scripts/eval_tiny.py measures it.
"""
