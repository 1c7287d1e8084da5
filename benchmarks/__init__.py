"""Speed, memory and scaling of CRL: crl-ops' native kernels, its pure-PyTorch reference, a per-class
loop implementation and pytorch-metric-learning's losses, measured side by side (`python -m benchmarks`)."""
