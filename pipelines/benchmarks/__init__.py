"""The benchmark items of `jobs/benchmark.py`, one module per item family, and what they share.

    measure.py   timing side by side, peak memory, a batch run's timeline, the machine, the markdown table
    fixtures.py  seeded backbones, checkpoints, reference clips and batch manifests to measure on
    context.py   the targets, the Context every item gets, and the report-row helpers
    lightlora.py items 2 (mixed-LoRA batching) and 3 (LightLoRA overhead)
    pipeline.py  items 1, 4 and 6 (the Ray batch job against the in-process loop, scaling)
    training.py  item 5 (ZeRO-2 training against the single-process loop)
    scale.py     item 7 (a resume of 100,000 rows on a local S3 server)

Nothing here asserts a number: benchmarks are not tests.
"""
