"""What runs at training time: everything a rewritten model calls after ``transform``.

``ops`` (the unit-scaled ops, one module per op family) and ``fp8`` (static-scale FP8
matmuls) are called by the rewritten graphs; ``modules`` installs those graphs on the
model's own modules and runs them; ``init`` is u-muP's unit initialisation, ``optim``
its parameter groups and AdamW; ``names`` reads module names through wrappers.
Nothing here imports the compiler (``umup_fx.pipeline`` and the passes).
"""
