"""The synthetic effects world: a benchmark for the method, kept apart from it (it imports the method, never the
other way round). `world` renders procedural clips of motions and looks, `judge` is the independent effect
classifier, `pretrain` trains a small frozen backbone on the world, `baselines` trains one ordinary LoRA per
effect, `evaluation` scores generated videos, `dataset` writes clips + manifests for the jobs."""
