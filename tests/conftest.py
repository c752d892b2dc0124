"""For every test folder: the checkout root moved to the end of ``sys.path``.

``python -m pytest`` (unlike ``pytest``) puts the working directory first on ``sys.path``; from the
checkout root that exposes ``kernels/`` as a top-level ``kernels`` package, which shadows the PyPI
``kernels`` package transformers imports (``ImportError: cannot import name 'CUDAProperties' from
'kernels'`` in every BERT / MiniLM test). The project is installed (``kernels/`` is
``qat.kernels``), so behind site-packages the root shadows nothing; it stays on the path for
whatever else looks there.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_AT_ROOT = [p for p in sys.path if os.path.abspath(p or ".") == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _AT_ROOT] + _AT_ROOT  # after site-packages, not gone
