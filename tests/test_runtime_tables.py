"""Host table lookups against numpy references built from the same random data."""

import numpy as np
import pytest

from gemma_runtime.manifest import HostTable, ManifestError
from gemma_runtime.tables import HostTableReader


def test_float32_lookup(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 5)).astype(np.float32)
    header = b"HDR!" * 3  # an unaligned-looking offset must still work
    (tmp_path / "t.bin").write_bytes(header + table.tobytes())
    spec = HostTable("t.bin", "float32", (10, 5), data_offset=len(header))
    reader = HostTableReader.open(tmp_path, "embed_tokens", spec)
    ids = np.array([3, 0, 9, 3], np.int64)
    out = reader.lookup(ids)
    assert out.dtype == np.float32 and out.shape == (4, 5)
    np.testing.assert_array_equal(out, table[ids])
    with pytest.raises(ValueError, match="token id 10"):
        reader.lookup(np.array([10]))


def test_int8_per_row_lookup(tmp_path):
    rng = np.random.default_rng(1)
    real = rng.standard_normal((12, 6)).astype(np.float32)
    scales = (np.abs(real).max(1) / 127).astype(np.float32)
    q = np.clip(np.round(real / scales[:, None]), -127, 127).astype(np.int8)
    data = q.tobytes()
    (tmp_path / "q.bin").write_bytes(data + scales.tobytes())
    spec = HostTable("q.bin", "int8", (12, 6), 0, "per_row", "float32", len(data))
    reader = HostTableReader.open(tmp_path, "embed_tokens", spec)
    ids = np.array([11, 2, 5])
    out = reader.lookup(ids)
    np.testing.assert_allclose(out, q[ids].astype(np.float32) * scales[ids, None], rtol=0, atol=0)
    # and the dequantized rows are close to the originals (the scales are really applied)
    np.testing.assert_allclose(out, real[ids], atol=scales.max())


def test_per_layer_ids_past_its_vocab_read_row_0(tmp_path):
    table = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    (tmp_path / "p.bin").write_bytes(table.tobytes())
    reader = HostTableReader.open(tmp_path, "per_layer", HostTable("p.bin", "float32", (4, 6)), row0_from=3)
    np.testing.assert_array_equal(reader.lookup(np.array([1, 3, 2, 100])), table[[1, 0, 2, 0]])


@pytest.mark.parametrize(
    "spec, match",
    [
        (HostTable("x.bin", "int4", (2, 2)), "dtype 'int4'"),
        (HostTable("x.bin", "int8", (2, 2)), "dtype 'int8' without a scale"),
        (HostTable("x.bin", "int8", (2, 2), 0, "per_block", "float32", 4), "scale layout 'per_block'"),
        (HostTable("x.bin", "int8", (2, 2), 0, "per_row", "float32", None), "scale_offset"),
        (HostTable("x.bin", "float32", (4, 4)), "holds 16 bytes"),
    ],
)
def test_bad_layouts_are_clear_errors(tmp_path, spec, match):
    (tmp_path / "x.bin").write_bytes(bytes(16))
    with pytest.raises(ManifestError, match=match):
        HostTableReader.open(tmp_path, "embed_tokens", spec)
