# v5p-256 (128 chips as a 4x4x8 torus, 32 hosts, 95 GiB HBM each): MAGNeT medium (~1.5 B), 30 s segments
# (T = 1500), the reference global batch 192. The batch axes (data x fsdp) must divide the batch and each mesh axis
# must be a product of torus axes: fsdp 32 (4x8) carries 6 samples per group, tensor 4 splits the 24 heads;
# bfloat16 compute. Compile check: 60.5 GiB of 95 per chip without remat (as here); with
# --config.model.remat=True 3.6 GiB, at about a third more compute per step.
#   launch/tpu_vm.sh train NAME ZONE v5p-256 launch/recipes/v5p-256_medium.sh -- --workdir=gs://... ...
#   (. launch/recipes/v5p-256_medium.sh; python -m magnet_jax.compile_check --topology=$TOPOLOGY "${RECIPE_FLAGS[@]}")
TOPOLOGY=v5p-256
RECIPE_FLAGS=(
  --config=configs/magnet.py:size=medium,duration=30
  --config.mesh.data=1 --config.mesh.fsdp=32 --config.mesh.tensor=4
  --config.data.batch_size=192
  --config.model.dtype=bfloat16
)
