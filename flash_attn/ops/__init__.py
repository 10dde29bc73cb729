"""The ops, one package each (``attention``, ``layer_norm``, ``rotary``, ``cross_entropy``,
``linear_cross_entropy``, ``mlp``): ``api.py``, ``function.py``, ``reference.py`` and the Triton
kernels in ``triton/``. Shared by all of them: ``backend.py`` (which backend serves an input),
``launch.py`` (launch plans, the device guard), ``plans.py`` (call signatures and the caches
of what each resolved to) and ``custom_op.py`` (custom ops whose eager calls skip the
dispatcher). ``triton/`` holds flash-attn 2.x's import paths (re-exports).
"""
