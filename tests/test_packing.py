import pytest
import torch

from quantizers.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_pack_round_trip_and_exact_size(bits: int, count: int) -> None:
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count).long(), codes)


def test_pack_keeps_2d_order() -> None:
    codes = torch.arange(12).reshape(3, 4) % 8
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, 12).reshape(3, 4).long(), codes)


def test_pack_rejects_out_of_range_codes_and_widths() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_writes_the_documented_bit_stream(bits: int) -> None:
    # code i at bits [i*bits, (i+1)*bits) of one little-endian stream, least significant bit first
    codes = torch.randint(0, 1 << bits, (37,), generator=torch.Generator().manual_seed(bits))
    stream = [(int(c) >> b) & 1 for c in codes for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]
    assert pack_codes(codes, bits).tolist() == expected


def test_pack_takes_float_codes_and_rejects_negative_ones() -> None:
    assert torch.equal(unpack_codes(pack_codes(torch.tensor([[0.0, 3.0], [1.0, 2.0]]), 2), 2, 4).long(), torch.tensor([0, 3, 1, 2]))
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([-1.0]), 2)


def test_pack_takes_uint8_codes_at_every_width() -> None:
    for bits in range(1, 9):
        codes = torch.arange(1 << bits, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
