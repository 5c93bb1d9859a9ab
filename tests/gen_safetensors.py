#!/usr/bin/python3
"""Write and dump safetensors files independently of cki's C++ code.

The tests use this script as a second implementation of the format: files it
writes must load in cki with the values below, and files cki writes must dump
here with the values cki was given. It needs only the standard library and
numpy (Debian's python3-numpy).

Usage:
  gen_safetensors.py write OUT [--no-pad]   write every dtype with known values
  gen_safetensors.py dump FILE [--aligned]  print a file's tensors as JSON; with
                                            --aligned, also require the padded
                                            header and aligned tensors cki writes
"""

import json
import math
import struct
import sys

import numpy as np

# Element size and numpy type of each dtype; BF16 and F8 are handled as raw bits.
DTYPES = {
    "BOOL": (1, np.bool_),
    "U8": (1, np.uint8),
    "I8": (1, np.int8),
    "U16": (2, np.uint16),
    "I16": (2, np.int16),
    "U32": (4, np.uint32),
    "I32": (4, np.int32),
    "U64": (8, np.uint64),
    "I64": (8, np.int64),
    "F8_E4M3": (1, np.uint8),
    "F8_E5M2": (1, np.uint8),
    "F16": (2, np.float16),
    "BF16": (2, np.uint16),
    "F32": (4, np.float32),
    "F64": (8, np.float64),
}


def float32_to_bfloat16_bits(values):
    """Round float32 values to bfloat16 bits, nearest with ties to even."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = 0x7FFF + ((bits >> 16) & 1)
    return ((bits + rounding) >> 16).astype(np.uint16)


def known_tensors():
    """Return name -> (dtype, shape, little-endian bytes) with the values the tests expect."""
    steps = (np.arange(6) - 2) * 0.75
    tensors = {
        "f16": ("F16", [2, 3], steps.astype("<f2")),
        "bf16": ("BF16", [2, 3], float32_to_bfloat16_bits(steps).astype("<u2")),
        "f32": ("F32", [2, 3], steps.astype("<f4")),
        "f64": ("F64", [2, 3], steps.astype("<f8")),
        "f16_special": ("F16", [6], np.array([65504, -65504, 2.0**-24, -0.0, 1 / 3, math.inf]).astype("<f2")),
        "bf16_special": ("BF16", [5], float32_to_bfloat16_bits(
            [1 / 3, 3.3895313892515355e38, -(2.0**-133), 1 + 2.0**-8, 1 + 3 * 2.0**-8]).astype("<u2")),
        "scalar": ("F32", [], np.array([7.5], dtype="<f4")),
        "empty": ("F32", [0, 4], np.zeros(0, dtype="<f4")),
        "bool": ("BOOL", [2, 3], np.array([1, 0, 1, 1, 0, 0], dtype=np.bool_)),
        "u8": ("U8", [2, 3], np.arange(250, 256, dtype="<u1")),
        "i8": ("I8", [2, 3], np.arange(-3, 3, dtype="<i1")),
        "u16": ("U16", [2, 3], np.arange(65530, 65536, dtype="<u2")),
        "i16": ("I16", [2, 3], np.array([-32768, -1, 0, 1, 2, 32767], dtype="<i2")),
        "u32": ("U32", [2, 3], np.arange(2**32 - 6, 2**32, dtype="<u4")),
        "i32": ("I32", [2, 3], np.array([-2**31, -1, 0, 1, 2, 2**31 - 1], dtype="<i4")),
        "u64": ("U64", [2, 3], np.array([2**64 - 6 + i for i in range(6)], dtype="<u8")),
        "i64": ("I64", [2, 3], np.array([-2**63, -1, 0, 1, 2, 2**63 - 1], dtype="<i8")),
        "f8_e4m3": ("F8_E4M3", [2, 3], np.array([0x00, 0x38, 0x40, 0x7E, 0x80, 0xB8], dtype="<u1")),
        "f8_e5m2": ("F8_E5M2", [2, 3], np.array([0x00, 0x3C, 0x40, 0x7B, 0x80, 0xBC], dtype="<u1")),
    }
    return {name: (dtype, shape, array.tobytes()) for name, (dtype, shape, array) in tensors.items()}


def write(path, pad):
    """Write the known tensors in name order, header padded to 8 bytes unless pad is false."""
    tensors = known_tensors()
    header = {"__metadata__": {"format": "pt", "writer": "gen_safetensors.py"}}
    offset = 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if pad:
        text += b" " * (-len(text) % 8)
    elif len(text) % 8 == 0:
        text += b" "
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name in sorted(tensors):
            out.write(tensors[name][2])


def decode(dtype, data):
    """Return the elements of raw little-endian bytes as JSON-friendly numbers."""
    if dtype == "BF16":
        values = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype in ("F8_E4M3", "F8_E5M2"):
        values = np.frombuffer(data, dtype=np.uint8)
    else:
        values = np.frombuffer(data, dtype=np.dtype(DTYPES[dtype][1]).newbyteorder("<"))
    result = []
    for value in values.tolist():
        if isinstance(value, float) and not math.isfinite(value):
            result.append(str(value))
        elif isinstance(value, bool):
            result.append(int(value))
        else:
            result.append(value)
    return result


def dump(path, aligned):
    """Check the file's layout and print its metadata and tensors as JSON."""
    with open(path, "rb") as source:
        blob = source.read()
    (length,) = struct.unpack("<Q", blob[:8])
    if aligned and length % 8 != 0:
        raise SystemExit(f"{path}: header length {length} is not a multiple of 8")
    header = json.loads(blob[8:8 + length].decode("utf-8"))
    data = blob[8 + length:]
    metadata = header.pop("__metadata__", {})
    end = 0
    tensors = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if begin != end:
            raise SystemExit(f"{path}: tensor {name} starts at {begin}, expected {end}")
        size = DTYPES[entry["dtype"]][0]
        if aligned and begin % size != 0:
            raise SystemExit(f"{path}: tensor {name} at offset {begin} is not aligned to {size} bytes")
        if (stop - begin) != size * math.prod(entry["shape"]):
            raise SystemExit(f"{path}: tensor {name} has {stop - begin} bytes for shape {entry['shape']}")
        tensors[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "values": decode(entry["dtype"], data[begin:stop])}
        end = stop
    if end != len(data):
        raise SystemExit(f"{path}: data section has {len(data)} bytes, tensors end at {end}")
    json.dump({"metadata": metadata, "tensors": tensors}, sys.stdout)


def main(argv):
    if len(argv) >= 3 and argv[1] == "write":
        write(argv[2], pad="--no-pad" not in argv[3:])
    elif len(argv) >= 3 and argv[1] == "dump":
        dump(argv[2], aligned="--aligned" in argv[3:])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
