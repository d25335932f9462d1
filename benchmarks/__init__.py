"""The maintained benchmarks: run each as a module from the repository root, e.g.
`python -m benchmarks.stage1_quality`. Each writes its section of docs/RESULTS.md."""
