"""md2pr_jax: MD2PR dense retrievers (multi-level distillation) in JAX/Flax, from one CPU host to a TPU pod."""

__version__ = "0.1.0"

import os as _os

# gcsfs (epath's gs:// backend) asks the Storage Control gRPC API for a bucket's type (zonal,
# hierarchical) before opens, writes and renames, unless this is false; while it cannot learn
# it (an emulator, no gRPC credentials) it asks again every time: 200 failed probes for 40
# writes and reads against fake-gcs-server here, and where the call hangs instead of failing,
# each waits out the probe's retries (up to a minute; issue 20 saw renames wait minutes).
# md2pr uses none of those features (it never renames in a bucket), so they are off unless the
# variable is set. gcsfs reads it when it is imported.
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
