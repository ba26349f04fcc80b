"""The package's one dtype table: torch dtypes by their canonical names, and the subset the format stores.

:data:`ALL_DTYPES` maps every ``torch.dtype`` to its canonical name
(``"float32"``, never the alias ``"float"``); the object tree
(:mod:`torch_dtdr.tree`) and the DCP metadata schema
(:mod:`torch_dtdr.dcp`) name dtypes by it. :data:`DTYPES` is the subset a
DTDR container may hold as tensor data (docs/format.md, the index's
``dtype`` field), with :func:`dtype_name` for writing it. Sits on the
bottom floor with :mod:`torch_dtdr.errors`: it imports only torch.
"""

from __future__ import annotations

import torch

#: Every torch dtype by canonical name.
ALL_DTYPES: dict[str, torch.dtype] = {}
for _value in vars(torch).values():
    if isinstance(_value, torch.dtype):
        _text = str(_value)
        if _text.startswith("torch."):
            ALL_DTYPES.setdefault(_text[6:], _value)

#: Dtypes a DTDR container stores tensor data as (those this torch has), by the names the index uses.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in [
        "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    ]
    if isinstance(getattr(torch, name, None), torch.dtype)
}
#: The index name of each container dtype.
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The index name of a container dtype; TypeError for one a DTDR file cannot store."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"tensors of dtype {dtype} cannot be stored") from None
