"""One process of the multi-process input pipeline check (started by tests/test_multihost.py through
launch/multihost_local.sh): writes this process's NumPy batches and, from process 0, the global batches that
`make_array_from_process_local_data` assembled (gathered back to the host), as `.npz` files under `--output`.

  python tests/multihost_pipeline.py --distributed --files='codes/*.array_record' --t5=DIR --output=DIR
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.magnet import get_config  # noqa: E402
from magnet_jax import sharding  # noqa: E402
from magnet_jax.cli import define_distributed_flags, initialize_distributed  # noqa: E402
from magnet_jax.data import input_pipeline  # noqa: E402
from magnet_jax.data.tokenizer import TextTokenizer  # noqa: E402

BATCHES = 2


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    initialize_distributed("multihost_pipeline")
    config = get_config("size=tiny")
    config.data.train_files, config.conditioner.t5 = FLAGS.files, FLAGS.t5
    config.data.segment_seconds, config.conditioner.max_length = 1.0, 16
    settings = input_pipeline.PipelineConfig.from_config(config, train=True)
    tokenizer = TextTokenizer(FLAGS.t5, max_length=16, word_dropout=config.conditioner.word_dropout)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    batch_sharding = sharding.batch_sharding(mesh, sharding.logical_rules(config))
    local = input_pipeline.make_iterator(settings, tokenizer)
    global_ = input_pipeline.make_iterator(settings, tokenizer, sharding=batch_sharding)
    i, n = jax.process_index(), jax.process_count()
    for b in range(BATCHES):
        np.savez(os.path.join(FLAGS.output, f"local-{b}-p{i}-of-{n}.npz"), **next(local))
        gathered = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in next(global_).items()}
        if i == 0:
            np.savez(os.path.join(FLAGS.output, f"global-{b}-of-{n}.npz"), **gathered)


if __name__ == "__main__":
    define_distributed_flags()
    flags.DEFINE_string("files", None, "shard glob", required=True)
    flags.DEFINE_string("t5", None, "text encoder directory", required=True)
    flags.DEFINE_string("output", None, "directory for the .npz batches", required=True)
    app.run(main)
