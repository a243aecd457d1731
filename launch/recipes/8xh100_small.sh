# One node of 8 x H100 80 GB: MAGNeT small, 10 s segments, the reference global batch 576 as 4 accumulated
# microbatches of 144 (18 per GPU), FSDP over the 8 GPUs, rematerialized blocks, bfloat16 compute (compile check,
# simulated on CPU: ~15 GiB of 80 per GPU).
# N nodes (slurm --nodes=N): add --config.mesh.dcn_data=N (data parallel across nodes, FSDP within each) and lower
# --config.optim.grad_accum_steps so that 576 / (8 N x accumulation) stays a whole number per GPU.
#   sbatch launch/slurm_gpu.sbatch launch/recipes/8xh100_small.sh -- --workdir=/shared/runs/small ...
#   (. launch/recipes/8xh100_small.sh; python -m magnet_jax.compile_check --topology=$TOPOLOGY "${RECIPE_FLAGS[@]}")
TOPOLOGY=8xh100
RECIPE_FLAGS=(
  --config=configs/magnet.py:size=small,duration=10
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1
  --config.data.batch_size=576 --config.optim.grad_accum_steps=4
  --config.model.dtype=bfloat16 --config.model.remat=True
)
