"""DataLoader: llm.c's dataloader.h semantics (sequential, distributed, shuffled), resume, errors."""
import json
import os

import numpy as np
import pytest

from llmc_jax.formats.data import DataLoader
from llmc_jax.formats.rand import MT19937, random_permutation
from llmc_jax.formats.llmc_format import LLMCFormatError, write_shard

# The shards of the llm.c reference run below: token i of shard s is s*1000+i, so the first input
# token of a batch names its shard and offset.
REF_NTOK = (101, 70, 135, 90)


def make_shards(d, ntoks=REF_NTOK, prefix="shard_"):
    paths = []
    for s, n in enumerate(ntoks):
        p = os.path.join(d, f"{prefix}{s:04d}.bin")
        write_shard(p, s * 1000 + np.arange(n))
        paths.append(p)
    return paths


def windows(ntoks, B, T, P, rank, epochs):
    """The expected sequential (unshuffled) windows: shards in order, samples in order, tails dropped."""
    BT = B * T
    out = []
    for _ in range(epochs):
        for s, n in enumerate(ntoks):
            for k in range((n - 1) // (P * BT)):
                start = s * 1000 + k * P * BT + rank * BT
                out.append(np.arange(start, start + BT + 1))
    return out


@pytest.mark.parametrize("P", [1, 2])
def test_sequential_windows(tmp_path, P):
    make_shards(tmp_path)
    B, T = 2, 4
    loaders = [DataLoader(str(tmp_path / "shard_*.bin"), B, T, r, P, shuffle=False) for r in range(P)]
    per_epoch = sum((n - 1) // (P * B * T) for n in REF_NTOK)
    for r, loader in enumerate(loaders):
        assert loader.batches_per_epoch == per_epoch
        assert loader.num_tokens == sum(REF_NTOK)
        assert loader.num_usable_tokens == per_epoch * P * B * T
        expected = windows(REF_NTOK, B, T, P, r, epochs=3)  # 3 epochs: the wrap-around too
        for i, w in enumerate(expected):
            x, y = loader.next_batch()
            assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == (B, T) and y.shape == (B, T)
            np.testing.assert_array_equal(x.reshape(-1), w[:-1], err_msg=f"rank {r} batch {i}")
            np.testing.assert_array_equal(y.reshape(-1), w[1:], err_msg=f"rank {r} batch {i}")
        assert loader.epoch == 2


def test_tail_dropped_and_rank_offsets(tmp_path):
    # one shard of 2*2*3*2+1+5 tokens: 2 samples of P*B*T = 12 tokens, a 5-token tail (plus the +1) dropped
    p = make_shards(tmp_path, ntoks=(30,))[0]
    l0 = DataLoader([p], B=2, T=3, process_rank=0, num_processes=2, shuffle=False)
    l1 = DataLoader([p], B=2, T=3, process_rank=1, num_processes=2, shuffle=False)
    assert l0.batches_per_epoch == 2
    firsts = [(int(l0.next_batch()[0][0, 0]), int(l1.next_batch()[0][0, 0])) for _ in range(5)]
    assert firsts == [(0, 6), (12, 18), (0, 6), (12, 18), (0, 6)]


def test_list_of_paths_keeps_order_and_glob_sorts(tmp_path):
    paths = make_shards(tmp_path, ntoks=(9, 9, 9))
    rev = DataLoader(paths[::-1], B=1, T=8, shuffle=False)
    assert [int(rev.next_batch()[0][0, 0]) for _ in range(3)] == [2000, 1000, 0]
    glob = DataLoader(str(tmp_path / "*.bin"), B=1, T=8, shuffle=False)
    assert [int(glob.next_batch()[0][0, 0]) for _ in range(3)] == [0, 1000, 2000]
    assert isinstance(glob._tokens, np.memmap)  # shards are memory-mapped, not read in


# Reference numbers from llm.c itself (karpathy/llm.c at f1e2ace): a small C program compiled with
# -I llm.c/llmc that includes llmc/dataloader.h, writes shard_0000..0003.bin with REF_NTOK tokens
# (token i of shard s = s*1000+i), calls dataloader_init(&loader, "shard_????.bin", B, T, rank, P,
# should_shuffle=1) and prints loader.inputs[0] after each dataloader_next_batch().
LLMC_SHUFFLED_FIRST_TOKENS = {
    # (B, T, P, rank): first input token of the first N batches
    (2, 4, 1, 0): [
        1024, 1016, 1008, 1056, 1000, 1040, 1032, 1048, 32, 48, 8, 24, 64, 40, 16, 56, 72, 0, 88, 80,
        3016, 3000, 3008, 3056, 3032, 3048, 3080, 3072, 3040, 3024, 3064, 2088, 2064, 2040, 2024, 2112,
        2072, 2120, 2016, 2008, 2048, 2104, 2096, 2032, 2056, 2080, 2000, 1032, 1016, 1048, 1056, 1000,
        1024, 1008, 1040, 3016, 3008, 3024, 3056, 3048, 3000, 3064, 3072, 3040, 3080, 3032, 40, 64, 16,
        0, 88, 48, 80, 72, 56, 8, 32, 24, 2112, 2120, 2072, 2008, 2040, 2000, 2048, 2016, 2032, 2080,
        2096, 2056, 2104, 2024, 2064, 2088, 0, 56, 8, 48, 16, 24],
    (2, 4, 2, 0): [
        1048, 1016, 1000, 1032, 16, 0, 48, 32, 80, 64, 3048, 3016, 3000, 3032, 3064, 2048, 2000, 2080,
        2112, 2032, 2016, 2096, 2064, 1000, 1048, 1032, 1016, 2064, 2096, 2016, 2048, 2080, 2000, 2032,
        2112, 3016, 3000, 3032, 3048, 3064, 80, 48, 64, 32, 16, 0, 1048, 1016, 1000, 1032],
    (2, 4, 2, 1): [
        2104, 2088, 2120, 2056, 2008, 2040, 2072, 2024, 1040, 1008, 1024, 1056, 3008, 3040, 3024, 3056,
        3072, 40, 72, 8, 56, 24, 88, 3056, 3024, 3008, 3072, 3040, 2120, 2056, 2024, 2008, 2104, 2040,
        2088, 2072, 88, 8, 24, 72, 40, 56, 1040, 1008, 1056, 1024, 24, 72, 8, 56],
    (1, 3, 1, 0): [
        1030, 1039, 1045, 1024, 1027, 1003, 1036, 1021, 1042, 1015, 1057, 1009, 1033, 1054, 1048, 1066,
        1060, 1012, 1018, 1000, 1051, 1006, 1063, 54, 30, 81, 63, 69, 90, 24, 96, 60, 78, 42, 33, 3, 39,
        45, 27, 57],
}


@pytest.mark.parametrize("key", sorted(LLMC_SHUFFLED_FIRST_TOKENS))
def test_shuffled_matches_llmc(tmp_path, key):
    B, T, P, rank = key
    make_shards(tmp_path)
    loader = DataLoader(str(tmp_path / "shard_????.bin"), B, T, rank, P, shuffle=True)  # seed 42 = llm.c
    expected = LLMC_SHUFFLED_FIRST_TOKENS[key]
    got = []
    for _ in expected:
        x, y = loader.next_batch()
        start = int(x[0, 0])
        np.testing.assert_array_equal(x.reshape(-1), np.arange(start, start + B * T))  # contiguous window
        np.testing.assert_array_equal(y.reshape(-1), np.arange(start + 1, start + B * T + 1))
        got.append(start)
    assert got == expected


def test_mt19937_and_permutation_match_llmc():
    # rand.h's own comment (torch.manual_seed(137) agrees): the first five randint32 words.
    assert MT19937(137).randint32(5).tolist() == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]
    # From a C program that includes llm.c's llmc/rand.h: manual_seed(seed), init_identity_permutation,
    # random_permutation(n), then the first 5 entries, checksum cs = cs*1000003 + p[i] (mod 2**64) and the
    # next randint32 word (so the number of draws is checked too).
    for n, seed, first, checksum, nxt in [
            (7, 42, [3, 4, 0, 2, 6], 349699673452224787, 2571218620),
            (200000, 43, [46832, 198523, 770, 35509, 94831], 3932422439154775390, 1553097646)]:
        rng = MT19937(seed)
        p = random_permutation(list(range(n)), rng)
        cs = 0
        for v in p:
            cs = (cs * 1000003 + v) % (1 << 64)
        assert p[:5] == first and cs == checksum and int(rng.randint32(1)[0]) == nxt
        assert sorted(p) == list(range(n))


@pytest.mark.parametrize("P", [1, 2])
def test_shuffled_reads_every_slot_once_per_epoch(tmp_path, P):
    # As llm.c's dev/test/test_dataloader.c: over an epoch, across all ranks, every token of every
    # used sample is an input exactly once (and a target exactly once, shifted by one); tails never.
    ntoks = (141, 140, 77, 200)
    make_shards(tmp_path, ntoks)
    B, T = 2, 4
    loaders = [DataLoader(str(tmp_path / "*.bin"), B, T, r, P, shuffle=True, seed=7) for r in range(P)]
    per_epoch = loaders[0].batches_per_epoch
    for epoch in range(2):
        seen_x, seen_y = np.zeros(4000, int), np.zeros(4000, int)
        for loader in loaders:
            for _ in range(per_epoch):
                x, y = loader.next_batch()
                np.add.at(seen_x, x.reshape(-1), 1)
                np.add.at(seen_y, y.reshape(-1), 1)
        expect_x, expect_y = np.zeros(4000, int), np.zeros(4000, int)
        for s, n in enumerate(ntoks):
            used = (n - 1) // (P * B * T) * P * B * T
            expect_x[s * 1000:s * 1000 + used] = 1
            expect_y[s * 1000 + 1:s * 1000 + used + 1] = 1
        np.testing.assert_array_equal(seen_x, expect_x, err_msg=f"epoch {epoch}")
        np.testing.assert_array_equal(seen_y, expect_y, err_msg=f"epoch {epoch}")
        assert all(loader.current_sample_idx == loader.shard_num_samples for loader in loaders)


def test_shuffle_differs_between_epochs_and_seeds(tmp_path):
    make_shards(tmp_path, ntoks=(400, 400, 400))
    firsts = lambda l, n: [int(l.next_batch()[0][0, 0]) for _ in range(n)]  # noqa: E731
    a = DataLoader(str(tmp_path / "*.bin"), 1, 8, shuffle=True)
    e0, e1 = firsts(a, a.batches_per_epoch), firsts(a, a.batches_per_epoch)
    assert sorted(e0) == sorted(e1) and e0 != e1
    b = DataLoader(str(tmp_path / "*.bin"), 1, 8, shuffle=True, seed=1)
    assert firsts(b, 20) != e0[:20]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("skip", [0, 5, 11, 12, 30, 47, 60])  # mid-shard, shard ends, epoch ends
def test_state_dict_resume_continues_exactly(tmp_path, shuffle, skip):
    make_shards(tmp_path)
    args = (str(tmp_path / "shard_*.bin"), 2, 4)
    for P, rank in [(1, 0), (2, 1)]:
        a = DataLoader(*args, rank, P, shuffle=shuffle)
        for _ in range(skip):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))  # plain JSON-able values
        b = DataLoader(*args, rank, P, shuffle=shuffle)
        b.next_batch()  # b's own position must not matter
        b.load_state_dict(state)
        assert b.epoch == a.epoch
        for i in range(70):
            xa, ya = a.next_batch()
            xb, yb = b.next_batch()
            np.testing.assert_array_equal(xa, xb, err_msg=f"P={P} skip={skip} batch {i}")
            np.testing.assert_array_equal(ya, yb)
        assert a.state_dict() == b.state_dict()


def test_reset_restarts_sequential_loader(tmp_path):
    make_shards(tmp_path)
    loader = DataLoader(str(tmp_path / "*.bin"), 2, 4, shuffle=False)
    first = [loader.next_batch()[0] for _ in range(15)]
    loader.reset()
    for x in first:
        np.testing.assert_array_equal(loader.next_batch()[0], x)


def test_error_no_match(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(ValueError, match="no data shards match the pattern .*nothing_"):
        DataLoader(pattern, 2, 4)


def test_error_shard_too_small(tmp_path):
    paths = make_shards(tmp_path, ntoks=(100, 16))
    with pytest.raises(LLMCFormatError) as e:
        DataLoader(str(tmp_path / "*.bin"), B=2, T=4, process_rank=0, num_processes=2)
    msg = str(e.value)
    assert paths[1] in msg and "16 tokens" in msg and "17" in msg and "-b" in msg
    DataLoader(str(tmp_path / "*.bin"), B=3, T=5)  # 3*5+1 = 16 fits


def test_error_token_out_of_vocab(tmp_path):
    p = str(tmp_path / "a.bin")
    toks = np.arange(64) % 50
    toks[40] = 300
    write_shard(p, toks)
    DataLoader(p, 2, 4)  # no vocabulary given: not checked
    with pytest.raises(LLMCFormatError, match=r"token id 300 at position 40 .*vocab size 256"):
        DataLoader(p, 2, 4, vocab_size=256)


def test_error_bad_arguments_and_state(tmp_path):
    make_shards(tmp_path)
    pattern = str(tmp_path / "*.bin")
    with pytest.raises(ValueError, match="rank"):
        DataLoader(pattern, 2, 4, process_rank=2, num_processes=2)
    with pytest.raises(ValueError, match="positive"):
        DataLoader(pattern, 0, 4)
    state = DataLoader(pattern, 2, 4).state_dict()
    with pytest.raises(ValueError, match="B=2 .* B=1"):
        DataLoader(pattern, 1, 8).load_state_dict(state)
    make_shards(tmp_path, ntoks=(50,), prefix="zz_")
    with pytest.raises(ValueError, match="same data shards"):
        DataLoader(pattern, 2, 4).load_state_dict(state)
