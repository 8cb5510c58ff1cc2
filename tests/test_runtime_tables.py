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


# ---- int4 per row, written here from the layout in manifest.HostTable's docstring ---------------


def _int4_reference(real: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(packed rows, scales, dequantized rows): q = round(x / s) in [-8, 7] with a signed scale
    s = -x_p / 8 (x_p the row's value of largest magnitude, on -8); byte j of a row holds column 2j
    in its low nibble and 2j + 1 in its high nibble (0 past an odd end)."""
    peak = real[np.arange(len(real)), np.abs(real).argmax(1)]
    scales = (-peak / 8).astype(np.float32)
    q = np.clip(np.rint(real / np.where(scales != 0, scales, 1)[:, None]), -8, 7).astype(np.int64)
    rows, cols = q.shape
    packed = bytearray()
    for r in range(rows):
        for j in range(0, cols, 2):
            low = q[r, j] & 0xF
            high = q[r, j + 1] & 0xF if j + 1 < cols else 0
            packed.append(low | high << 4)
    return bytes(packed), scales, q.astype(np.float32) * scales[:, None]


def _int4_table(tmp_path, real: np.ndarray) -> tuple[HostTableReader, np.ndarray]:
    packed, scales, want = _int4_reference(real)
    offset = len(packed) + (-len(packed) % 64)
    (tmp_path / "q4.bin").write_bytes(packed + bytes(offset - len(packed)) + scales.tobytes())
    rows, cols = real.shape
    spec = HostTable("q4.bin", "int4", (rows, cols), 0, "per_row", "float32", offset, row_bytes=(cols + 1) // 2)
    return HostTableReader.open(tmp_path, "embed_tokens", spec), want


@pytest.mark.parametrize("cols", [1, 5, 6, 7, 64])
def test_int4_per_row_lookup_equals_the_dequantized_rows(tmp_path, cols):
    rng = np.random.default_rng(cols)
    real = rng.standard_normal((13, cols)).astype(np.float32)
    real[4] = 0  # a zero row: scale 0, rows of zeros
    reader, want = _int4_table(tmp_path, real)
    ids = np.array([12, 0, 4, 7, 7, 3])
    np.testing.assert_array_equal(reader.lookup(ids), want[ids])
    out = np.full((len(ids), cols), np.nan, np.float32)  # the decode loop's preallocated rows
    assert reader.lookup(ids, out=out) is out
    np.testing.assert_array_equal(out, want[ids])
    strided = np.full((len(ids), 2 * cols), np.nan, np.float32)[:, ::2]  # a view that is not contiguous
    reader.lookup(ids, out=strided)
    np.testing.assert_array_equal(strided, want[ids])
    assert (np.abs(reader.lookup(ids) - real[ids]) <= np.abs(reader.scales[ids])[:, None] * (1 + 1e-6)).all()


def test_int4_decodes_every_nibble(tmp_path):
    """Each byte value 0..255 as a row of two columns: low nibble first, two's complement (-8..7)."""
    data = bytes(range(256))
    offset = len(data)
    scales = np.full(256, 0.5, np.float32)
    (tmp_path / "n.bin").write_bytes(data + scales.tobytes())
    reader = HostTableReader.open(tmp_path, "embed_tokens", HostTable("n.bin", "int4", (256, 2), 0, "per_row", "float32", offset, 1))
    signed = lambda v: v - 16 if v >= 8 else v  # noqa: E731
    want = np.array([[signed(b & 15), signed(b >> 4)] for b in range(256)], np.float32) * 0.5
    np.testing.assert_array_equal(reader.lookup(np.arange(256)), want)


def test_int4_lookup_allocates_only_its_output(tmp_path):
    """No packed or dequantized copy of the looked-up rows: with `out` given, a lookup of 128 rows of
    2048 columns (1 MiB of float32 out, 128 KiB packed) allocates a few KiB at most."""
    import tracemalloc

    rng = np.random.default_rng(5)
    reader, want = _int4_table(tmp_path, rng.standard_normal((256, 2048)).astype(np.float32))
    ids = rng.integers(0, 256, 128)
    out = np.empty((128, 2048), np.float32)
    reader.lookup(ids, out=out)  # warm up
    tracemalloc.start()
    reader.lookup(ids, out=out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(out, want[ids])
    assert peak < 32 * 1024, peak


@pytest.mark.parametrize(
    "spec, match",
    [
        (HostTable("x.bin", "int2", (2, 2), 0, "per_row", "float32", 4), r"dtype in \['int4', 'int8'\].*'int2'"),
        (HostTable("x.bin", "int4", (2, 5), 0, "per_row", "float32", 8, row_bytes=5), "take 3 bytes.*row_bytes=5"),
        (HostTable("x.bin", "int8", (2, 4), 0, "per_row", "float32", 8, row_bytes=2), "take 4 bytes.*row_bytes=2"),
        (HostTable("x.bin", "int4", (4, 8), 0, "per_row", "float32", 16), "holds 16 bytes but its layout needs 32"),
    ],
)
def test_bad_int4_layouts_are_clear_errors(tmp_path, spec, match):
    (tmp_path / "x.bin").write_bytes(bytes(16))
    with pytest.raises(ManifestError, match=match):
        HostTableReader.open(tmp_path, "embed_tokens", spec)


def test_table_inputs_are_the_tables_own_memory_and_bad_bindings_are_clear_errors(tmp_path):
    """manifest.table_inputs: "embed_tokens.data" / ".scales" are views of the mapped file (no copy);
    a binding to a table or part the export lacks is a ManifestError that names it."""
    from gemma_runtime.tables import table_input_arrays

    q = np.arange(12 * 6, dtype=np.int64).reshape(12, 6).astype(np.int8)
    scales = np.linspace(0.1, 1.2, 12, dtype=np.float32)
    (tmp_path / "q.bin").write_bytes(q.tobytes() + scales.tobytes())
    reader = HostTableReader.open(tmp_path, "embed_tokens", HostTable("q.bin", "int8", (12, 6), 0, "per_row", "float32", q.nbytes))
    (name_rows, rows), (name_scales, got_scales) = table_input_arrays(
        {"lm_head_rows": "embed_tokens.data", "lm_head_row_scales": "embed_tokens.scales"}, reader, None)
    assert (name_rows, name_scales) == ("lm_head_rows", "lm_head_row_scales")
    assert np.array_equal(rows, q) and np.array_equal(got_scales, scales)
    assert rows.base is not None and not rows.flags.writeable  # over the read-only map
    for ref, match in (("per_layer.data", "not a part .* of a host table of this export .embed_tokens."),
                       ("embed_tokens.rows", "not a part \\(data, scales\\)")):
        with pytest.raises(ManifestError, match=f"graph input 'x' is bound to '{ref}': {match}"):
            table_input_arrays({"x": ref}, reader, None)
