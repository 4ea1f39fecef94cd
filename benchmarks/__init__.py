"""chainrule's benchmark suite: `python -m benchmarks [--quick] [--sections ...] [--json PATH]`.

Every number is a ratio of contenders measured side by side in one process
(interleaved, warmed up, medians of many repeats), except the deep-chain
memory peaks, which are measured in one subprocess per contender.
"""
