"""CPU checks of the kernel tuning object (run in CI): it is frozen and validated, it owns every
compile-time value the CUDA sources read (they keep no defaults), and a non-default tuning compiles
through NVRTC into a module of its own."""

import dataclasses
import pathlib
import re

import pytest

from qat.kernels import cupy_backend
from qat.kernels.tuning import DEFAULT_TUNING, ByDtype, KernelTuning

#: what cupy_backend._options passes besides the tuning's defines (the instantiation and block size)
_INSTANTIATION = {"QAT_DTYPE", "QAT_OTYPE", "QAT_VEC", "QAT_THREADS"}


def _sources() -> str:
    return "\n".join(p.read_text() for p in sorted(cupy_backend._CSRC.iterdir()) if p.suffix in (".cu", ".cuh"))


def _code(text: str) -> str:
    """The sources without comments."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _macros_read_from_outside() -> set:
    code = _code(_sources())
    used = set(re.findall(r"\bQAT_[A-Z0-9_]+\b", code))
    defined = set(re.findall(r"#\s*define\s+(QAT_[A-Z0-9_]+)", code))
    return used - defined


def _nvrtc():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # noqa: BLE001 - the library is missing or cannot be loaded
        pytest.skip(f"NVRTC is not installed ({exc}); install nvidia-cuda-nvrtc-cu12")


def _names(options) -> set:
    return {o[2:].split("=", 1)[0] for o in options if o.startswith("-D")}


def test_tuning_is_frozen_and_hashable():
    t = KernelTuning()
    assert t == DEFAULT_TUNING and hash(t) == hash(DEFAULT_TUNING)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.tile_threads = 64  # type: ignore[misc]
    t2 = dataclasses.replace(t, tile_lsq=(2, 2, 2))
    assert isinstance(t2.tile_lsq, ByDtype) and t2 != t and t2.changes() == {"tile_lsq": ByDtype(2, 2, 2)}
    assert DEFAULT_TUNING.changes() == {}


@pytest.mark.parametrize(
    "bad",
    [dict(tile_threads=96 + 1), dict(tile_lsq=(3, 2, 2)), dict(fwd_tile=(8, 0, 0)), dict(grp_loads_lsq=3),
     dict(elementwise_waves=0), dict(cols_rows_lsq=0), dict(fwd_tile_threads=512)],
    ids=lambda d: next(iter(d)),
)
def test_invalid_tuning_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        dataclasses.replace(DEFAULT_TUNING, **bad)


def test_every_field_is_documented():
    text = (pathlib.Path(cupy_backend.__file__).parent / "tuning.py").read_text()
    for f in dataclasses.fields(KernelTuning):
        assert re.search(rf"\n    {f.name}: [^\n]+\n    \"\"\"", text), f"{f.name} has no docstring"


def test_defines_cover_every_macro_the_sources_read():
    """The sources read exactly the instantiation macros and the tuning's device fields, and keep no
    default of their own for any of them (one owner: KernelTuning)."""
    read = _macros_read_from_outside()
    for code in (0, 1, 2):
        tuned = _names(DEFAULT_TUNING.defines(code))
        assert read == _INSTANTIATION | tuned, (read ^ (_INSTANTIATION | tuned))
        assert _names(cupy_backend._options(code, 1, DEFAULT_TUNING.defines(code))) == read
    assert not re.search(r"#\s*ifndef\s+QAT_", _code(_sources())), "a source keeps a default of its own"
    assert DEFAULT_TUNING.defines(0) != DEFAULT_TUNING.defines(1)  # lsq_min_blocks: 4 in fp32, 3 in 16-bit


def test_missing_define_is_an_error():
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(cupy_backend._source("reduce.cu"), "reduce.cu", [], [])
    try:
        opts = [o for o in cupy_backend._options(0, 4, DEFAULT_TUNING.defines(0)) if "QAT_COLS_ROWS_LSQ" not in o]
        with pytest.raises(nvrtc.NVRTCError):
            nvrtc.compileProgram(prog, [*opts, "--gpu-architecture=compute_90"])
        assert "set by cupy_backend" in nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_non_default_tuning_compiles_to_another_module():
    """A device field changes the defines, hence the compile cache's key and the code NVRTC emits; a
    host field changes neither (no recompile)."""
    _nvrtc()
    other = dataclasses.replace(DEFAULT_TUNING, cols_rows_lsq=2, rows_loads_minmax=4, lsq_min_blocks=(2, 2, 2))
    host_only = dataclasses.replace(DEFAULT_TUNING, tile_threads=64, poison_outputs=True)
    key = cupy_backend._cache_key("reduce.cu", 0, 4, DEFAULT_TUNING)
    assert cupy_backend._cache_key("reduce.cu", 0, 4, other) != key
    assert cupy_backend._cache_key("reduce.cu", 0, 4, host_only) == key
    ptx_default, _ = cupy_backend._compile("reduce.cu", 0, 4, "compute_90", DEFAULT_TUNING)
    ptx_other, size = cupy_backend._compile("reduce.cu", 0, 4, "compute_90", other)
    assert size > 0 and ptx_other != ptx_default
    assert ".minnctapersm 2" in ptx_other and ".minnctapersm 2" not in ptx_default


def test_use_tuning_swaps_and_restores():
    assert cupy_backend.current_tuning() is DEFAULT_TUNING
    with cupy_backend.use_tuning(tile_threads=64) as t:
        assert cupy_backend.current_tuning() is t and t.tile_threads == 64
        with cupy_backend.use_tuning(poison_outputs=True) as t2:
            assert t2.tile_threads == 64 and t2.poison_outputs
        assert cupy_backend.current_tuning() is t
    assert cupy_backend.current_tuning() is DEFAULT_TUNING
    with pytest.raises(TypeError):
        with cupy_backend.use_tuning({"tile_threads": 64}):  # type: ignore[arg-type]
            pass


def test_tuning_from_applies_literals_and_names_bad_items():
    from qat.kernels.tuning import tuning_from

    t = tuning_from(["param_block=False", "tile_lsq=(2,2,2)"])
    assert t.changes() == {"param_block": False, "tile_lsq": (2, 2, 2)}
    for bad, match in ((["nope=1"], "not a KernelTuning field"), (["tile_lsq=x"], "Python literal"),
                       (["param_block=0"], "param_block a bool"), (["param_block"], "not a KernelTuning field")):
        with pytest.raises(ValueError, match=match):
            tuning_from(bad)
