"""The package layout works however the checkout is put on the path."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_mapped_subpackages_import_without_the_editable_mapping(tmp_path):
    # as a legacy `setup.py develop` install or PYTHONPATH=<checkout> would: no editable finder
    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__ and 'editable' not in repr(f)]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "for m in [k for k in sys.modules if k == 'qat' or k.startswith('qat.')]: del sys.modules[m]\n"
        "import qat, qat.kernels, qat.kernels.reference, qat.callbacks, qat.recipes.digits\n"
        f"assert qat.kernels.__file__.startswith({str(ROOT / 'kernels')!r}), qat.kernels.__file__\n"
        "from qat.plan import available_presets\n"
        "assert 'w4a8' in available_presets()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
