"""llm.c's rand.h randomness that must match bit for bit: MT19937 seeded as torch.manual_seed /
llm.c's manual_seed, and its Fisher-Yates permutation (used by the data loader's shuffling and,
through llmc_init, by the random init)."""
from __future__ import annotations

from typing import Any

import numpy as np


def mt19937_key(seed: int) -> np.ndarray:
    """The 624-word MT19937 state that torch.manual_seed / llm.c's manual_seed build (init_genrand)."""
    key = np.empty(624, dtype=np.uint32)
    x = int(seed) & 0xFFFFFFFF
    key[0] = x
    for j in range(1, 624):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        key[j] = x
    return key


class MT19937:
    """Raw 32-bit MT19937 outputs (llm.c's `randint32`), seeded like torch.manual_seed(seed).

    Backed by numpy's MT19937 bit generator with the torch/llm.c key installed directly, and position
    624 so the first draw regenerates the whole state first (llm.c's `left_ = 1`). `random_raw` yields
    the untempered-then-tempered 32-bit words unchanged, i.e. exactly genrand_int32.
    """

    def __init__(self, seed: int):
        self._bg = np.random.MT19937()
        self.set_state({"key": mt19937_key(seed).tolist(), "pos": 624})

    def randint32(self, n: int) -> np.ndarray:
        """The next n outputs as uint32."""
        if n <= 0:
            return np.zeros(0, dtype=np.uint32)
        return self._bg.random_raw(n).astype(np.uint32)

    def get_state(self) -> dict[str, Any]:
        st = self._bg.state["state"]
        return {"key": [int(v) for v in st["key"]], "pos": int(st["pos"])}

    def set_state(self, state: dict[str, Any]) -> None:
        key = np.asarray(state["key"], dtype=np.uint32)
        pos = int(state["pos"])
        if key.shape != (624,) or not 0 <= pos <= 624:
            raise ValueError("bad MT19937 state: need 'key' of 624 uint32 words and 0 <= 'pos' <= 624")
        self._bg.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}


def random_permutation(data: list[int], rng: MT19937) -> list[int]:
    """llm.c's `random_permutation`, in place on `data` (and returned): Fisher-Yates from the top,
    j = randint32 % (i+1) for i = n-1 .. 1 (n-1 draws; none for n <= 1)."""
    n = len(data)
    if n <= 1:
        return data
    words = rng.randint32(n - 1)  # words[k] is the draw for i = n-1-k
    # j for every i at once (exact integer math), then the sequential swaps.
    js = (words.astype(np.int64) % np.arange(n, 1, -1, dtype=np.int64)).tolist()
    for i, j in zip(range(n - 1, 0, -1), js):
        data[i], data[j] = data[j], data[i]
    return data
