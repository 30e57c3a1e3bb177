"""Byte tokens from every input kind, the deterministic split, the cache, and the sampler."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanoresume import data as data_module
from nanoresume.data import BatchSampler, ResumableSampler, check_block_size, eval_offsets, load_tokens, windows
from nanoresume.errors import CheckpointError, DataError

TEXT = "héllo, wörld — bytes not characters ✓\n" * 20


def all_tokens(tokens) -> bytes:
    return bytes(np.concatenate([tokens.train, tokens.val]))


def test_a_text_file_becomes_exactly_its_utf8_bytes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    tokens = load_tokens(str(path), 0.1, str(tmp_path / "cache"))
    assert all_tokens(tokens) == TEXT.encode("utf-8")
    assert tokens.train.dtype == np.uint8
    assert str(path) in tokens.source


def test_a_folder_of_txt_files_is_read_in_sorted_order_and_other_files_are_ignored(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"BBBB" * 10)
    (folder / "a.txt").write_bytes(b"AAAA" * 10)
    (folder / "sub" / "c.txt").write_bytes(b"CCCC" * 10)
    (folder / "notes.md").write_bytes(b"ignored")
    tokens = load_tokens(str(folder), 0.1, str(tmp_path / "cache"))
    assert all_tokens(tokens) == b"AAAA" * 10 + b"BBBB" * 10 + b"CCCC" * 10


def test_a_bin_file_with_token_dtype_uint8_is_read_as_raw_byte_tokens(tmp_path):
    raw = bytes(range(256)) * 2
    (tmp_path / "t.bin").write_bytes(raw)
    assert all_tokens(load_tokens(str(tmp_path / "t.bin"), 0.1, token_dtype="uint8")) == raw


def test_an_npy_file_of_small_integers_is_read_as_byte_tokens(tmp_path):
    values = np.arange(300, dtype=np.int32) % 256
    np.save(tmp_path / "t.npy", values)
    tokens = load_tokens(str(tmp_path / "t.npy"), 0.1)
    assert list(all_tokens(tokens)) == values.tolist()


@pytest.mark.parametrize("bad", [np.array([1, 2, 256, 3] * 10, dtype=np.int64),
                                 np.array([1, -1, 2, 3] * 10, dtype=np.int16),
                                 np.array([0.5, 1.0] * 10, dtype=np.float32)])
def test_an_npy_file_with_values_that_are_not_bytes_is_refused_naming_data(tmp_path, bad):
    np.save(tmp_path / "t.npy", bad)
    with pytest.raises(DataError, match="--data"):
        load_tokens(str(tmp_path / "t.npy"), 0.1)


def test_the_split_is_deterministic_and_validation_is_the_last_fraction(tmp_path):
    raw = bytes(random.Random(0).randrange(256) for _ in range(1000))
    (tmp_path / "t.bin").write_bytes(raw)
    tokens = load_tokens(str(tmp_path / "t.bin"), 0.25, token_dtype="uint8")
    assert bytes(tokens.train) == raw[:750]
    assert bytes(tokens.val) == raw[750:]
    again = load_tokens(str(tmp_path / "t.bin"), 0.25, token_dtype="uint8")
    assert again.fingerprint == tokens.fingerprint
    assert bytes(again.val) == bytes(tokens.val)


def test_the_second_load_memory_maps_the_cache_without_writing_it_again(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    cache = tmp_path / "cache"
    first = load_tokens(str(path), 0.1, str(cache))
    cached = sorted(cache.glob("*.bin"))
    assert len(cached) == 1

    def no_writing(p, payload):
        raise AssertionError(f"cache {p} was written again although it is valid")

    monkeypatch.setattr(data_module, "write_file_atomically", no_writing)
    second = load_tokens(str(path), 0.1, str(cache), warn=pytest.fail)
    assert isinstance(second.train, np.memmap)
    assert os.path.samefile(second.train.filename, cached[0])
    assert second.fingerprint == first.fingerprint
    assert all_tokens(second) == TEXT.encode()


def test_changing_the_source_file_invalidates_the_cache(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    cache = str(tmp_path / "cache")
    before = load_tokens(str(path), 0.1, cache)
    path.write_text(TEXT + "one more line\n")
    after = load_tokens(str(path), 0.1, cache)
    assert all_tokens(after) == (TEXT + "one more line\n").encode()
    assert after.fingerprint != before.fingerprint


def test_a_same_size_edit_with_a_new_mtime_invalidates_the_cache(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * 500)
    cache = str(tmp_path / "cache")
    load_tokens(str(path), 0.1, cache)
    path.write_bytes(b"y" * 500)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert all_tokens(load_tokens(str(path), 0.1, cache)) == b"y" * 500


def test_a_same_size_edit_that_keeps_the_mtime_is_not_served_from_the_stale_cache(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * 500)
    cache = str(tmp_path / "cache")
    before = load_tokens(str(path), 0.1, cache)
    stat = path.stat()
    path.write_bytes(b"y" * 500)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the bytes differ
    after = load_tokens(str(path), 0.1, cache)
    assert all_tokens(after) == b"y" * 500
    assert after.fingerprint != before.fingerprint  # so a resume on the edited data is refused


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_damaged_cache_is_rebuilt_with_one_warning_instead_of_trusted(tmp_path, damage):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    cache = tmp_path / "cache"
    load_tokens(str(path), 0.1, str(cache))
    [cached] = cache.glob("*.bin")
    data = bytearray(cached.read_bytes())
    if damage == "truncate":
        del data[-10:]
    else:
        data[5] ^= 0xFF
    cached.write_bytes(bytes(data))
    warnings = []
    assert all_tokens(load_tokens(str(path), 0.1, str(cache), warn=warnings.append)) == TEXT.encode()
    assert len(warnings) == 1 and str(cached) in warnings[0] and "rebuilding" in warnings[0]
    assert cached.read_bytes() == TEXT.encode()


def test_an_unwritable_cache_folder_warns_once_and_the_tokens_are_still_right(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder should go")
    warnings = []
    tokens = load_tokens(str(path), 0.1, str(blocker / "cache"), warn=warnings.append)
    assert all_tokens(tokens) == TEXT.encode()
    assert len(warnings) == 1 and "cannot write the token cache" in warnings[0] and "--cache-dir" in warnings[0]


def test_temp_files_of_cache_writes_killed_midway_are_removed_with_a_warning(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (the kernel does not reuse it this soon)
    abandoned = [cache / f".tokens-v2-{'a' * 32}.bin.tmp.{dead.pid}",
                 cache / f".{'b' * 24}.bin.tmp.{dead.pid}"]  # the name the previous cache format used
    live = cache / f".tokens-v2-{'c' * 32}.bin.tmp.{os.getpid()}"  # a writer still at work
    unrelated = cache / "notes.tmp.1"
    for file in abandoned + [live, unrelated]:
        file.write_bytes(b"\0" * 1000)
    warnings = []
    load_tokens(str(path), 0.1, str(cache), warn=warnings.append)
    assert not any(f.exists() for f in abandoned)
    assert live.exists() and unrelated.exists()
    assert len(warnings) == 2 and all("interrupted write" in w for w in warnings)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_device_or_a_fifo_as_data_is_refused_at_once_instead_of_read_forever(tmp_path, kind):
    if kind == "device":
        target = "/dev/zero"
    else:
        target = str(tmp_path / "pipe")
        os.mkfifo(target)

    def hung(signum, frame):
        raise TimeoutError(f"--data {target} hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)  # the old code read /dev/zero until memory ran out and blocked forever on a FIFO
    try:
        with pytest.raises(DataError, match="not a regular file") as info:
            load_tokens(target, 0.1, str(tmp_path / "cache"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert f"--data {target}" in str(info.value)


def test_a_npy_file_that_is_not_numpy_is_named_as_such_without_advice_to_load_it_unsafely(tmp_path):
    garbage = tmp_path / "t.npy"
    garbage.write_bytes(b"these bytes are no array header" * 10)
    with pytest.raises(DataError) as info:
        load_tokens(str(garbage), 0.1)
    message = str(info.value)
    assert "not a NumPy .npy file" in message and "numpy.save" in message
    assert "allow_pickle" not in message and "unsafely" not in message


def test_an_empty_text_file_raises_data_error_naming_data(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="--data") as info:
        load_tokens(str(tmp_path / "empty.txt"), 0.1, str(tmp_path / "cache"))
    assert "no text" in str(info.value)


def test_an_empty_bin_file_and_a_folder_without_txt_files_raise_data_error(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="--data .*no text"):
        load_tokens(str(tmp_path / "empty.bin"), 0.1, token_dtype="uint8")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="--data .*no .txt files"):
        load_tokens(str(tmp_path / "folder"), 0.1)


def test_a_missing_path_raises_data_error_naming_data_and_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="--data") as info:
        load_tokens(str(missing), 0.1)
    assert str(missing) in str(info.value)


def test_a_block_size_larger_than_either_split_raises_naming_block_size(tmp_path):
    (tmp_path / "t.bin").write_bytes(bytes(200))
    tokens = load_tokens(str(tmp_path / "t.bin"), 0.1, token_dtype="uint8")  # 180 train, 20 val
    check_block_size(tokens, 19)
    with pytest.raises(DataError, match="--block-size 20 .*validation"):
        check_block_size(tokens, 20)
    with pytest.raises(DataError, match="--block-size 500 .*training"):
        check_block_size(tokens, 500)


# ---- nanoGPT's token files ---------------------------------------------------------------------

GPT2_IDS = np.array([15496, 11, 995, 0, 50256, 464, 2068, 7586] * 40, dtype=np.uint16)


def test_a_bin_file_without_token_dtype_is_refused_instead_of_read_as_bytes(tmp_path):
    GPT2_IDS.tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="--data .*train.bin.*--token-dtype uint8 .*--token-dtype uint16"):
        load_tokens(str(tmp_path / "train.bin"), 0.1)


def test_a_uint16_bin_file_reads_nanogpt_token_ids_exactly(tmp_path):
    GPT2_IDS.tofile(tmp_path / "ids.bin")  # what nanoGPT's prepare.py writes: little-endian uint16
    tokens = load_tokens(str(tmp_path / "ids.bin"), 0.25, token_dtype="uint16", vocab_size=50304)
    assert len(tokens.train) + len(tokens.val) == len(GPT2_IDS)  # not twice as many byte tokens
    assert np.concatenate([tokens.train, tokens.val]).tolist() == GPT2_IDS.tolist()
    x, y = windows(tokens.train, np.array([0]), 4)
    assert x.tolist() == [[15496, 11, 995, 0]] and y.tolist() == [[11, 995, 0, 50256]]


def test_the_same_bytes_read_as_another_dtype_are_not_the_same_data(tmp_path):
    (tmp_path / "t.bin").write_bytes(bytes(range(200)))
    as_bytes = load_tokens(str(tmp_path / "t.bin"), 0.1, token_dtype="uint8")
    as_ids = load_tokens(str(tmp_path / "t.bin"), 0.1, token_dtype="uint16", vocab_size=65536)
    assert as_bytes.fingerprint != as_ids.fingerprint


def test_a_folder_with_train_and_val_bin_keeps_their_split(tmp_path):
    GPT2_IDS[:300].tofile(tmp_path / "train.bin")
    GPT2_IDS[300:].tofile(tmp_path / "val.bin")
    (tmp_path / "notes.txt").write_text("not data")
    tokens = load_tokens(str(tmp_path), 0.5, token_dtype="uint16", vocab_size=50257)
    assert tokens.train.tolist() == GPT2_IDS[:300].tolist()  # --val-fraction does not re-split it
    assert tokens.val.tolist() == GPT2_IDS[300:].tolist()
    assert "train.bin + val.bin" in tokens.source


def test_a_folder_with_only_train_bin_is_refused_naming_the_missing_file(tmp_path):
    GPT2_IDS.tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="no val.bin"):
        load_tokens(str(tmp_path), 0.1, token_dtype="uint16", vocab_size=50304)


@pytest.mark.parametrize("content, flags, message", [
    (bytes(101), dict(token_dtype="uint16", vocab_size=50304), "101 bytes is not a whole number of uint16 tokens"),
    (GPT2_IDS.tobytes(), dict(token_dtype="uint16", vocab_size=50000), "token id 50,256.*vocabulary has 50,000"),
    (bytes(range(256)), dict(token_dtype="uint8", vocab_size=100), "token id 255.*vocabulary has 100"),
])
def test_a_bin_file_whose_size_or_values_do_not_fit_is_refused_with_one_line(tmp_path, content, flags, message):
    (tmp_path / "t.bin").write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_tokens(str(tmp_path / "t.bin"), 0.1, **flags)
    assert "\n" not in str(info.value)


def test_uint16_for_text_data_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(DataError, match="--token-dtype uint16 is for .bin token files"):
        load_tokens(str(tmp_path / "a.txt"), 0.1, str(tmp_path / "cache"), token_dtype="uint16", vocab_size=50304)


def test_a_meta_pkl_beside_the_data_is_never_unpickled(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": Payload()}))
    GPT2_IDS[:300].tofile(tmp_path / "train.bin")
    GPT2_IDS[300:].tofile(tmp_path / "val.bin")
    load_tokens(str(tmp_path), 0.1, token_dtype="uint16", vocab_size=50304)
    assert not (tmp_path / "pwned").exists()


def test_windows_pair_each_input_with_the_next_token_as_target():
    tokens = np.arange(100, dtype=np.uint8)
    x, y = windows(tokens, np.array([0, 10, 90]), 8)
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(x[1], torch.arange(10, 18))
    assert torch.equal(y[1], torch.arange(11, 19))
    assert y[2, -1].item() == 98


def draw(sampler, n, rank=0, world=1, accum=1):
    """The next ``n`` steps' offsets of one rank, each step's micro-batches joined."""
    return [np.concatenate(sampler.next_micro_batches(rank, world, accum)) for _ in range(n)]


def test_the_same_seed_gives_the_same_offsets():
    a, b = BatchSampler(1000, 16, 8, seed=7), BatchSampler(1000, 16, 8, seed=7)
    for x, y in zip(draw(a, 5), draw(b, 5)):
        assert np.array_equal(x, y)


def test_a_different_seed_gives_different_offsets():
    base = draw(BatchSampler(1000, 16, 8, seed=7), 3)
    other_seed = draw(BatchSampler(1000, 16, 8, seed=8), 3)
    assert not any(np.array_equal(x, y) for x, y in zip(base, other_seed))


@pytest.mark.parametrize("world, accum", [(2, 1), (4, 2), (8, 1), (1, 8)])
def test_every_world_size_and_accumulation_sees_the_same_windows_at_each_step(world, accum):
    """Step i's global batch depends on (seed, i) only: the ranks' micro-batches, put together in rank
    order, are exactly the one-process batch, so resuming on another world size keeps the data order."""
    single = draw(BatchSampler(5000, 16, 8, seed=11), 4)
    samplers = [BatchSampler(5000, 16, 8, seed=11) for _ in range(world)]
    for step in range(4):
        pieces = [np.concatenate(s.next_micro_batches(rank, world, accum)) for rank, s in enumerate(samplers)]
        assert all(len(p) == 8 // world for p in pieces)
        assert np.array_equal(np.concatenate(pieces), single[step])


def test_micro_batches_split_a_ranks_share_in_order():
    micro = BatchSampler(1000, 16, 12, seed=2).next_micro_batches(rank=1, world_size=2, grad_accum=3)
    whole = BatchSampler(1000, 16, 12, seed=2).step_offsets(0)
    assert [len(m) for m in micro] == [2, 2, 2]
    assert np.array_equal(np.concatenate(micro), whole[6:12])


def test_offsets_stay_inside_the_valid_window_range():
    sampler = BatchSampler(n_tokens=40, block_size=32, global_batch=64, seed=0)
    offsets = np.concatenate(draw(sampler, 20))
    assert offsets.min() >= 0 and offsets.max() <= 40 - 32 - 1
    assert set(offsets.tolist()) == set(range(8))


def test_load_state_dict_reproduces_the_batches_that_would_have_followed():
    original = BatchSampler(1000, 16, 8, seed=3)
    draw(original, 4)
    saved = original.state_dict()
    expected = draw(original, 3)

    restored = BatchSampler(1000, 16, 8, seed=99)  # wrong seed on purpose: the state must carry it
    restored.load_state_dict(saved)
    for x, y in zip(draw(restored, 3), expected):
        assert np.array_equal(x, y)
    assert restored.state_dict() == original.state_dict()


def test_the_sampler_does_not_touch_or_depend_on_global_rngs():
    np.random.seed(0)
    sampler = BatchSampler(1000, 16, 8, seed=3)
    first = draw(sampler, 1)[0]
    np.random.seed(12345)
    random.seed(12345)
    torch.manual_seed(12345)
    state = np.random.get_state()[1].copy()
    fresh = BatchSampler(1000, 16, 8, seed=3)
    assert np.array_equal(draw(fresh, 1)[0], first)
    assert np.array_equal(np.random.get_state()[1], state)


def test_eval_offsets_are_fixed_in_range_and_touch_no_global_rng():
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    batches = eval_offsets(n_tokens=500, block_size=32, n_batches=3, batch_size=4)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    flat = np.concatenate(batches)
    assert flat[0] == 0 and flat[-1] == 500 - 32 - 1
    assert all(np.array_equal(a, b) for a, b in zip(batches, eval_offsets(500, 32, 3, 4)))


# ---- ResumableSampler: batches of indices for any dataset ----------------------------------------


def test_resumable_sampler_visits_every_item_once_per_epoch_across_batch_boundaries():
    sampler = ResumableSampler(10, batch_size=4, seed=3)
    drawn = [i for step in range(5) for i in sampler.batch(step)]  # 20 indices: two epochs, batch 2 spans both
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # each epoch its own order


def test_resumable_sampler_batch_depends_only_on_seed_and_step():
    a, b = ResumableSampler(50, 8, seed=1), ResumableSampler(50, 8, seed=1)
    assert [a.batch(s) for s in range(12)] == [b.batch(s) for s in reversed(range(12))][::-1]
    assert list(itertools.islice(a.batches(7), 3)) == [b.batch(7), b.batch(8), b.batch(9)]
    assert ResumableSampler(50, 8, seed=2).batch(0) != a.batch(0)


def test_resumable_sampler_refuses_a_state_drawn_for_another_dataset_or_batch_size():
    saved = ResumableSampler(50, 8, seed=9).state_dict()
    sampler = ResumableSampler(50, 8, seed=0)
    sampler.load_state_dict(saved)
    assert sampler.seed == 9
    with pytest.raises(CheckpointError, match="drawn for 50 items in batches of 8"):
        ResumableSampler(51, 8).load_state_dict(saved)
