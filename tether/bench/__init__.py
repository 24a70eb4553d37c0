"""The benchmarks behind `tether bench` (DESIGN §9, §11); the command line only parses and prints.

- `pushpull.py`: `tether bench pushpull`, a shard's push and pull throughput against raw gRPC;
- `step.py`: `tether bench step`, the worker's gradient step against the task's own;
- `train.py`: `tether bench train`, a real run's steady-state update rate against the task's own
  step, and the CPU that bounds it;
- `timing.py`: the interleaved timing loop they share.

`benchmarks/` holds heavier one-off measurements (MongoDB recovery, a 55M-parameter model, Ray's
parameter-server example) as scripts over the same code.
"""
