"""A minimal JPEG Lossless encoder (ITU T.81 process 14, first-order prediction: DICOM's JPEG Lossless SV1,
1.2.840.10008.1.2.4.70), so tests can write the transfer syntax hospital CT exports use most; pydicom has no
encoder for it. Greyscale, 16-bit samples, one fixed Huffman table, no restart markers.
"""

from __future__ import annotations

import struct

import numpy as np

PRECISION = 16
# one DC Huffman table: the 17 difference categories (SSSS 0..16) all get 5-bit codes 00000 .. 10000
_CODE_LENGTH = 5


def encode_frame(pixels: np.ndarray) -> bytes:
    """One JPEG Lossless SV1 frame of 2D integer ``pixels`` (int16 or uint16; signed values as their 16 bits)."""
    samples = np.asarray(pixels).astype(np.int64) & 0xFFFF  # the unsigned 16-bit pattern the codec sees
    rows, cols = samples.shape
    header = _sof3(rows, cols) + _dht() + _sos()
    return b"\xff\xd8" + header + _stuff(_scan_bits(samples)) + b"\xff\xd9"


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _sof3(rows: int, cols: int) -> bytes:
    # precision, lines, samples per line, 1 component: id 1, sampling 1x1, quantisation table 0 (unused)
    return _segment(0xFFC3, struct.pack(">BHHB", PRECISION, rows, cols, 1) + bytes([1, 0x11, 0]))


def _dht() -> bytes:
    counts = [0] * 16
    counts[_CODE_LENGTH - 1] = 17  # 17 codes of 5 bits
    return _segment(0xFFC4, bytes([0x00, *counts, *range(17)]))  # class 0 (DC / lossless), table 0


def _sos() -> bytes:
    # 1 component (id 1, table 0), Ss = predictor 1 (left), Se = 0, Ah/Al = 0 (no point transform)
    return _segment(0xFFDA, bytes([1, 1, 0x00, 1, 0, 0]))


def _predictions(samples: np.ndarray) -> np.ndarray:
    """T.81 H.1.2.1: first sample 2^(P-1); first row from the left; first column from above; else from the left."""
    pred = np.empty_like(samples)
    pred[0, 0] = 1 << (PRECISION - 1)
    pred[0, 1:] = samples[0, :-1]
    pred[1:, 0] = samples[:-1, 0]
    pred[1:, 1:] = samples[1:, :-1]
    return pred


def _scan_bits(samples: np.ndarray) -> list[int]:
    diffs = (samples - _predictions(samples)) % 65536  # modulo 2^16, then read as -32767 .. 32768
    diffs = np.where(diffs > 32768, diffs - 65536, diffs).ravel()
    bits: list[int] = []
    for diff in diffs.tolist():
        category = int(abs(diff)).bit_length()  # SSSS
        bits.extend((category >> shift) & 1 for shift in range(_CODE_LENGTH - 1, -1, -1))
        if 0 < category < 16:  # category 16 (difference 32768) carries no extra bits
            extra = diff if diff > 0 else diff + (1 << category) - 1
            bits.extend((extra >> shift) & 1 for shift in range(category - 1, -1, -1))
    return bits


def _stuff(bits: list[int]) -> bytes:
    """Pack bits MSB first, pad the last byte with 1s, and stuff a 0x00 after every 0xFF byte."""
    bits = bits + [1] * (-len(bits) % 8)
    packed = np.packbits(np.array(bits, dtype=np.uint8)).tobytes()
    return packed.replace(b"\xff", b"\xff\x00")
