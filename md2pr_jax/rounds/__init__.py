"""The host-side round controller: the false-negative filter's numerics (`filtering`), one
function per stage (`stages`) and the runner that composes them into the pipeline, teacher and
student modes (`runner`). The workdir layout they use is `md2pr_jax.layout`."""
