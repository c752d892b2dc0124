"""For every test folder: the checkout root off ``sys.path``.

``python -m pytest`` (unlike ``pytest``) puts the working directory first on ``sys.path``; from the
checkout root that exposes ``kernels/`` as a top-level ``kernels`` package, which shadows the PyPI
``kernels`` package transformers imports (``ImportError: cannot import name 'CUDAProperties' from
'kernels'`` in every BERT / MiniLM test). Nothing here needs the root on the path: the project is
installed (``kernels/`` is ``qat.kernels``) and the tests are imported by file
(``--import-mode=importlib``), so both commands now see the same packages.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]
