"""The bf16 check: a bf16 base on a CPU that emulates bf16 products warns before it trains."""

from __future__ import annotations

import pytest

from svdtune import hardware


@pytest.mark.parametrize(("flags", "emulated"), [({"avx2", "fma"}, True), ({"avx2", "avx512_bf16"}, False),
                                                 ({"amx_bf16"}, False), ({"asimd", "bf16"}, False), (None, False)])
def test_bf16_is_emulated_only_on_a_cpu_whose_flags_name_no_bf16_unit(monkeypatch, flags, emulated) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.bf16_emulated("cpu") is emulated
    assert hardware.bf16_emulated("cuda") is False, "a GPU is not judged by the CPU's flags"
    if emulated:
        with pytest.warns(UserWarning, match="no bf16 matrix units.*Train in float32"):
            assert "training on a bf16 base" in hardware.slow_bf16_warning("cpu", "training on a bf16 base")
    else:
        assert hardware.slow_bf16_warning("cpu", "training on a bf16 base") is None


def test_cpu_flags_reads_the_flags_line_of_this_machine() -> None:
    flags = hardware.cpu_flags()
    assert flags is None or (isinstance(flags, set) and all(isinstance(f, str) for f in flags))
    assert hardware.bf16_units() == sorted(hardware.BF16_FLAGS & (flags or set()))
