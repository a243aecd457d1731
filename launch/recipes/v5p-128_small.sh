# v5p-128 (64 chips, 16 hosts, 95 GiB HBM each): MAGNeT small (~420 M incl. heads), 10 s segments, the reference
# global batch 576 (9 per chip); params and optimizer state fully sharded (FSDP) over the slice; no remat needed
# (compile check: 17.9 GiB of 95 per chip; 3.2 GiB with --config.model.remat=True); bfloat16 compute.
#   launch/tpu_vm.sh train NAME ZONE v5p-128 launch/recipes/v5p-128_small.sh -- --workdir=gs://... ...
#   (. launch/recipes/v5p-128_small.sh; python -m magnet_jax.compile_check --topology=$TOPOLOGY "${RECIPE_FLAGS[@]}")
TOPOLOGY=v5p-128
RECIPE_FLAGS=(
  --config=configs/magnet.py:size=small,duration=10
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1
  --config.data.batch_size=576
  --config.model.dtype=bfloat16 --config.model.remat=False
)
