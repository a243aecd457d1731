# v5e-256 (v5litepod-256: 256 chips as a 16x16 grid, 64 hosts, 16 GiB HBM each): MAGNeT small, 10 s segments.
# The reference batch 576 does not split over the grid (mesh axes must be 1, 16 or 256 chips), so this recipe uses
# 512 (2 per chip, FSDP over all chips) in one step, no remat (compile check: 6.1 GiB of 16 per chip; 2.5 GiB with
# --config.model.remat=True); bfloat16 compute.
#   launch/tpu_vm.sh train NAME ZONE v5litepod-256 launch/recipes/v5litepod-256_small.sh -- --workdir=gs://... ...
#   (. launch/recipes/v5litepod-256_small.sh; python -m magnet_jax.compile_check --topology=$TOPOLOGY "${RECIPE_FLAGS[@]}")
TOPOLOGY=v5litepod-256
RECIPE_FLAGS=(
  --config=configs/magnet.py:size=small,duration=10
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1
  --config.data.batch_size=512
  --config.model.dtype=bfloat16 --config.model.remat=False
)
