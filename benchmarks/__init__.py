"""Measurements of loraserve against a peer in the same run; results in RESULTS.md.

Each script runs as a module from the repository root, `python -m benchmarks.<name>`
(offline_throughput, adapter_scaling, serving, ray_scaling, kernels, lora_cpu), so it
imports its helpers (synthetic.py, results_md.py) as `benchmarks.*` without touching
sys.path.
"""
