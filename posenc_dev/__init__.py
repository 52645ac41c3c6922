"""Development tools shared by the tests and the scripts; not part of the public API.

* ``sass``: reads sm_90 SASS without a GPU (load rounds, bytes in flight, instructions per byte);
* ``static_compile``: compiles every hot Triton kernel for sm_90 with the arguments a real launch would
  use and reports its static figures (``python -m posenc_dev.static_compile``, without
  ``TRITON_INTERPRET``).

A package of their own beside ``posenc_kernels`` (setup.py installs both), so that ``scripts/*``,
``tests/static/`` and the GPU check import them the ordinary way, with no ``sys.path`` edits. Importing this package imports nothing; ``static_compile`` needs Triton's
NVIDIA backend, ``sass`` only the standard library (and ``cuobjdump`` to read a cubin).
"""
