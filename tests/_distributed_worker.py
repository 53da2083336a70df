"""One rank of tests/test_distributed.py: probe a slice, merge, write the result (rank 0)."""

import sys

import mlx.core as mx

import mlx_abliteration  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.distributed import probe_prompts_distributed, world

model_dir, prompts_file, out_file = sys.argv[1:4]
group = world()
prompts = open(prompts_file).read().splitlines()
model, tokenizer, _ = load_model(model_dir)
stats = probe_prompts_distributed(model, tokenizer, prompts, batch_size=3, group=group)
lone = probe_prompts_distributed(model, tokenizer, prompts[:1], group=group)  # rank 0 gets no prompt
arrays = {"mean": stats.mean, "m2": stats.m2, "count": mx.array([stats.count]), "size": mx.array([group.size()])}
arrays.update({"lone_mean": lone.mean, "lone_count": mx.array([lone.count])})
mx.save_safetensors(f"{out_file}.rank{group.rank()}.safetensors", arrays)
