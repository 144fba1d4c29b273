"""FloatFormat constants against ml_dtypes, name lookup and validation."""

import jax.numpy as jnp
import ml_dtypes
import pytest

from unitscale_jax.precision import (
    BF16,
    E4M3,
    E4M3_FNUZ,
    E5M2,
    E5M2_FNUZ,
    FP16,
    FP32,
    FloatFormat,
    get_format,
)

from ._probes import NAMED_FORMATS


@pytest.mark.parametrize("fmt", NAMED_FORMATS + [FP32], ids=str)
def test_constants_match_ml_dtypes_finfo(fmt):
    info = ml_dtypes.finfo(fmt.dtype)
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.mantissa_bits == info.nmant
    assert fmt.bits == info.bits


def test_named_maxima_and_variants():
    assert (E4M3.max, E5M2.max, E4M3_FNUZ.max, E5M2_FNUZ.max) == (448.0, 57344.0, 240.0, 57344.0)
    assert FP16.max == 65504.0
    assert E5M2.has_inf and not E4M3.has_inf and not E4M3_FNUZ.has_inf
    assert not E4M3_FNUZ.has_negative_zero and not E5M2_FNUZ.has_negative_zero
    assert E4M3.has_negative_zero and E5M2.has_negative_zero
    assert FP32.is_float32 and not BF16.is_float32


def test_reference_fpformat_ranges_equal_fnuz():
    # unit_scaling.formats.FPFormat(e, m): max = 2^(2^(e-1)-1) * (2 - 2^-m),
    # min normal 2^(1-2^(e-1)).
    for fmt, (e, m) in ((E4M3_FNUZ, (4, 3)), (E5M2_FNUZ, (5, 2))):
        assert fmt.max == 2 ** (2 ** (e - 1) - 1) * (2 - 2.0**-m)
        assert fmt.min_normal == 2.0 ** (1 - 2 ** (e - 1))


def test_get_format_names_and_dtypes():
    assert get_format("float8_e4m3fn") is E4M3
    assert get_format("E5M2") is E5M2
    assert get_format(jnp.float8_e4m3fnuz) is E4M3_FNUZ
    assert get_format(jnp.bfloat16) is BF16
    assert get_format("half") is FP16
    assert get_format(E5M2_FNUZ) is E5M2_FNUZ
    with pytest.raises(ValueError, match="Unknown format"):
        get_format("e3m4")
    with pytest.raises(TypeError, match="float format"):
        get_format(jnp.int8)


def test_custom_format_and_validation():
    e3m2 = FloatFormat("e3m2", 3, 2, 3, "ieee")
    assert e3m2.max == 2.0**3 * 1.75 and e3m2.min_subnormal == 2.0**-4 and e3m2.dtype is None
    with pytest.raises(ValueError, match="variant"):
        FloatFormat("x", 4, 3, 7, "fnz")
    with pytest.raises(ValueError, match="exponent_bits"):
        FloatFormat("x", 9, 3, 7)
    with pytest.raises(ValueError, match="mantissa_bits"):
        FloatFormat("x", 4, 0, 7)
    with pytest.raises(ValueError, match="float32"):
        FloatFormat("x", 8, 3, 100)
    assert hash(E4M3) == hash(FloatFormat("e4m3fn", 4, 3, 7, "fn", jnp.float8_e4m3fn))
