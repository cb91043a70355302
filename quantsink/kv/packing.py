"""Bit-packing of b-bit integer codes into uint8, along the last dimension, in planes: the n codes
are cut into 8 / b planes of consecutive codes (3 bits: 8 planes in 24-bit words), and byte (word)
j holds code j of every plane. 2 and 4 bits pack 4 and 2 codes per byte, 3 bits 8 codes in 3
bytes, 8 bits are the bytes themselves. Unpacking is one shift and mask per plane over the
whole tensor, each writing a contiguous slab, so a cache layer unpacks all its codes in a few
vectorised calls per kind."""
from __future__ import annotations

import torch

PACKED_BITS = (2, 3, 4, 8)
# planes (codes per word) and bytes per word: 3-bit codes fill 24-bit words exactly
_WORD = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def packed_bytes(codes: int, bits: int) -> int:
    """Bytes that `codes` codes of `bits` bits take once packed (whole words)."""
    planes, word_bytes = _WORD[bits]
    return -(-codes // planes) * word_bytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes in [0, 2^bits) -> (..., packed_bytes(n, bits)) uint8; the last
    plane is padded with zero codes."""
    if bits not in _WORD:
        raise ValueError(f"cannot pack {bits}-bit codes: pick one of {PACKED_BITS}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    planes, word_bytes = _WORD[bits]
    length = codes.shape[-1]
    padding = -length % planes
    if padding:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], padding)], dim=-1)
    split = codes.reshape(*codes.shape[:-1], planes, -1).to(torch.int32)
    word = sum(split[..., plane, :] << (plane * bits) for plane in range(planes))
    if word_bytes == 1:
        return word.to(torch.uint8)
    # 3 bits: each 24-bit word as 3 byte planes, low byte first
    return torch.cat([(word >> shift) & 0xFF for shift in (0, 8, 16)], dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """The inverse of `pack`: (..., packed_bytes(length, bits)) uint8 -> (..., length) uint8 codes."""
    if bits == 8:
        return packed[..., :length]
    planes, word_bytes = _WORD[bits]
    mask = (1 << bits) - 1
    if word_bytes == 1:
        words = packed
    else:
        low, middle, high = packed.to(torch.int32).chunk(3, dim=-1)
        words = low | (middle << 8) | (high << 16)
    size = words.shape[-1]
    codes = torch.empty(*words.shape[:-1], planes * size, dtype=torch.uint8, device=packed.device)
    for plane in range(planes):
        torch.bitwise_and(words >> (plane * bits) if plane else words, mask, out=codes[..., plane * size : (plane + 1) * size])
    return codes if codes.shape[-1] == length else codes[..., :length]
