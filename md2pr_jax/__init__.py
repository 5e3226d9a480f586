"""md2pr_jax: MD2PR dense retrievers (multi-level distillation) in JAX/Flax, from one CPU host to a TPU pod."""

__version__ = "0.1.0"

import os as _os

# gcsfs (epath's gs:// backend) probes every bucket's type through the Storage Control gRPC API
# unless this is false; a bucket whose type it cannot learn (an emulator, no permission) is
# probed again, with retries, on every open. md2pr needs none of the zonal/HNS features behind
# it (it never renames in a bucket), so it is off unless set. Read when gcsfs is imported.
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
