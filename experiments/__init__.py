"""One-question experiments that shaped the `shapes` recipe: run each as a module from the
repository root, e.g. `python -m experiments.stage2_where --model DIR`. Their recorded answers
are in docs/experiments.md."""
