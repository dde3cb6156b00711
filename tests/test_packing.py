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
