"""The package's one autotuner (``crossvit_fast.kernels.tuning.Tuner``) on the CPU: the choice with a stand-in timer,
the disk cache of picks, the dispatch both tuned modules launch through; the block GEMMs' and the self-attention's
tuning keys and candidate lists; and the one switch that says when a tuned kernel may time candidates. The real
timing runs on CUDA (tests/test_linear.py, tests/test_self_attention.py)."""

import warnings

import pytest
import torch

kl = pytest.importorskip("crossvit_fast.kernels.linear", reason="triton is not installed")
from crossvit_fast.kernels import self_attention as ksa  # noqa: E402
from crossvit_fast.kernels import tuning  # noqa: E402



CANDS = [(64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4)]


@pytest.fixture
def fake_tuner(monkeypatch):
    """A fresh :class:`Tuner` outside CUDA: a stand-in timer (ms per config), a record of the launches, and the
    module flags it is called with (``state``: tuning on, disk cache off)."""
    from triton.runtime.errors import OutOfResources

    tuner = tuning.Tuner("linear", lambda: (), skippable=(kl.CublasUnsupported,))
    state.update(tuner=tuner, enabled=True, disk=False)
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    ms = {CANDS[0]: 0.30, CANDS[1]: 0.20, CANDS[2]: 0.10}
    launches, timed = [], []

    def bench(fn):
        timed.append(len(launches))
        fn()
        cfg = launches[-1]
        if cfg == CANDS[2] and "oor" in timed_flags:
            raise OutOfResources(300000, 232448, "shared memory")
        if cfg == CANDS[1] and "ptxas" in timed_flags:
            from triton.runtime.errors import PTXASError

            raise PTXASError("ptxas failed")
        if cfg == CANDS[2] and "cublas" in timed_flags:
            raise kl.CublasUnsupported("no such cuBLAS GEMM here")
        if "oom" in timed_flags:
            raise torch.cuda.OutOfMemoryError("no room for the L2-flush buffer")
        return ms[cfg]

    timed_flags = set()
    tuner.timer = bench
    yield launches, timed, timed_flags
    state.clear()


state = {}


def _launch(launch, key, default, cands, may_tune=True, fallbacks=None):
    return state["tuner"].launch(launch, key, default, cands, torch.device("cpu"), lambda: may_tune,
                                 enabled=state["enabled"], disk_cache=state["disk"], fallbacks=fallbacks)


def _tune(launches, key=("k",), may_tune=True):
    return _launch(launches.append, key, CANDS[0], CANDS, may_tune)


def _picks():
    return state["tuner"].picks()


def test_tuner_takes_the_fastest_remembers_it_and_ends_with_its_launch(fake_tuner):
    launches, timed, _ = fake_tuner
    assert _tune(launches) == CANDS[2]
    assert launches == CANDS + [CANDS[2]] and len(timed) == 3  # each timed once, then the winner's own launch
    assert _picks() == {("k",): CANDS[2]}
    launches.clear()
    assert _tune(launches) == CANDS[2] and launches == [CANDS[2]] and len(timed) == 3  # remembered: no timing
    assert _tune(launches, key=("other",)) == CANDS[2] and len(timed) == 6  # another key is timed afresh


def test_tuner_skips_a_config_out_of_resources(fake_tuner):
    launches, _, flags = fake_tuner
    flags.add("oor")
    assert _tune(launches) == CANDS[1]
    assert launches[-1] == CANDS[1]
    flags.add("ptxas")  # a candidate ptxas rejects is skipped too
    assert _tune(launches, key=("k2",)) == CANDS[0]


def test_tuner_skips_a_cublas_candidate_this_torch_cannot_run(fake_tuner):
    launches, _, flags = fake_tuner
    flags.add("cublas")
    assert _tune(launches) == CANDS[1] and launches[-1] == CANDS[1]


def test_tuner_out_of_memory_takes_the_default_untuned(fake_tuner):
    launches, _, flags = fake_tuner
    flags.add("oom")
    assert _tune(launches) == CANDS[0] and launches[-1] == CANDS[0] and not _picks()


@pytest.mark.parametrize("why", ["autotune-off", "capturing", "output-aliases-input"])
def test_tuner_uses_the_default_or_the_tuned_config_without_timing(fake_tuner, monkeypatch, why):
    launches, timed, _ = fake_tuner
    if why == "autotune-off":
        state["enabled"] = False
    if why == "capturing":
        monkeypatch.setattr(tuning, "capturing", lambda device: True)
    may = why != "output-aliases-input"
    assert _tune(launches, may_tune=may) == CANDS[0] and launches == [CANDS[0]] and not timed
    state["tuner"].chosen[("k",)] = CANDS[1]  # tuned before (e.g. the warm-up of a CUDA-graph capture)
    assert _tune(launches, may_tune=may) == CANDS[1] and launches[-1] == CANDS[1] and not timed


@pytest.mark.parametrize("autotune", [False, True], ids=["autotune-off", "capturing"])
def test_default_tile_that_does_not_fit_this_gpu_takes_the_first_candidate_that_does(fake_tuner, monkeypatch,
                                                                                     autotune):
    """A 16-bit default tile needs 115 KB of shared memory, more than sm_86 / sm_89 parts have: untuned launches
    (autotune off, or a capture before any tuning) take the first candidate that launches, for the key from then on."""
    from triton.runtime.errors import OutOfResources

    launches, timed, _ = fake_tuner
    state["enabled"] = autotune
    monkeypatch.setattr(tuning, "capturing", lambda device: autotune)
    too_big = {CANDS[0], CANDS[1]}

    def launch(c):
        launches.append(c)
        if c in too_big:
            raise OutOfResources(115456, 101376, "shared memory")

    def tune():
        return _launch(launch, ("k",), CANDS[0], CANDS, fallbacks=lambda: CANDS)

    assert tune() == CANDS[2] and launches == CANDS and not timed
    assert _picks() == {("k",): CANDS[2]}
    launches.clear()
    assert tune() == CANDS[2] and launches == [CANDS[2]]
    state["tuner"].chosen.clear()
    too_big.add(CANDS[2])
    with pytest.raises(OutOfResources, match="115456"):  # nothing fits: the default's own error
        tune()
    assert not _picks()


@pytest.fixture
def disk_tuner(fake_tuner, monkeypatch, tmp_path):
    """``fake_tuner`` with the disk cache on, in a fresh Triton cache dir, under a stand-in environment."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuner = state["tuner"]
    state["disk"] = True
    tuner.disk_on = lambda device, disk_cache: disk_cache
    env = {"fingerprint": "sm_90 / triton / torch / source"}
    tuner.fingerprint = lambda index: env["fingerprint"]
    return fake_tuner + (tmp_path, env)


def _autotune_files(root):
    return sorted(root.rglob("*.autotune.json"))


def _new_process():
    state["tuner"].chosen.clear()


def test_tuner_pick_on_disk_is_loaded_by_the_next_process_without_timing(disk_tuner):
    import json

    launches, timed, _, root, _ = disk_tuner
    assert _tune(launches, key=("fwd", 4)) == CANDS[2] and len(timed) == 3
    (f,) = _autotune_files(root)
    assert f.name == "crossvit_fast-linear-fwd.autotune.json"
    record = json.loads(f.read_text())
    assert tuple(record["chosen"]) == CANDS[2] and record["key"] == repr(("fwd",))  # no device index
    assert {tuple(c): t for c, t in record["times_ms"]} == {CANDS[0]: 0.30, CANDS[1]: 0.20, CANDS[2]: 0.10}
    _new_process()
    launches.clear()
    assert _tune(launches, key=("fwd", 4)) == CANDS[2]
    assert launches == [CANDS[2]] and len(timed) == 3  # loaded: one launch, nothing timed
    assert _picks() == {("fwd", 4): CANDS[2]}
    _new_process()
    assert _tune(launches, key=("fwd", 5)) == CANDS[2] and len(timed) == 3  # another GPU of the same model


def test_tuner_disk_pick_of_another_environment_or_candidate_list_is_not_used(disk_tuner):
    launches, timed, _, root, env = disk_tuner
    _tune(launches)
    _new_process()
    env["fingerprint"] = "another Triton, torch, GPU model or kernel source"
    _tune(launches)
    assert len(timed) == 6 and len(_autotune_files(root)) == 2
    _new_process()
    got = _launch(launches.append, ("k",), CANDS[0], CANDS[:2])
    assert got == CANDS[1] and len(timed) == 8 and len(_autotune_files(root)) == 3


def test_tuner_reads_no_disk_pick_while_capturing_or_with_autotune_off(disk_tuner, monkeypatch):
    launches, timed, _, _, _ = disk_tuner
    _tune(launches)
    _new_process()
    monkeypatch.setattr(tuning, "capturing", lambda device: True)  # a capture must not load an unlaunched kernel
    assert _tune(launches) == CANDS[0] and len(timed) == 3 and not _picks()
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    state["enabled"] = False
    assert _tune(launches) == CANDS[0] and not _picks()
    state["enabled"] = True
    assert _tune(launches, may_tune=False) == CANDS[2] and len(timed) == 3  # an aliased output: loaded, not timed


def test_tuner_disk_cache_off_writes_nothing(disk_tuner, monkeypatch):
    launches, timed, _, root, _ = disk_tuner
    state["disk"] = False
    _tune(launches)
    _new_process()
    _tune(launches)
    assert len(timed) == 6 and not _autotune_files(root)


@pytest.mark.parametrize("damage", ["not-json", "no-chosen", "no-such-candidate"])
def test_tuner_damaged_disk_pick_warns_once_and_is_timed_again(disk_tuner, damage):
    import json

    launches, timed, _, root, _ = disk_tuner
    _tune(launches)
    (f,) = _autotune_files(root)
    text = {"not-json": "{truncated", "no-chosen": json.dumps({"key": "k"}),
            "no-such-candidate": json.dumps({"chosen": [1, 2, 3, 4, 5]})}[damage]
    f.write_text(text)
    _new_process()
    with pytest.warns(RuntimeWarning, match="autotune pick"):
        assert _tune(launches) == CANDS[2]
    assert len(timed) == 6 and json.loads(f.read_text())["chosen"] == list(CANDS[2])  # timed, written again
    f.write_text(text)
    _new_process()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        _tune(launches)


def test_tuner_disk_write_failure_warns_once_and_keeps_the_pick(disk_tuner, monkeypatch):
    launches, timed, _, root, _ = disk_tuner

    class ReadOnly:
        def __init__(self, key):
            pass

        def get_file(self, name):
            return None

        def put(self, data, name, binary=True):
            raise PermissionError("read-only file system")

    state["tuner"].disk_entry = lambda key: (ReadOnly, "x.autotune.json")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert _tune(launches) == CANDS[2]
    assert _picks() == {("k",): CANDS[2]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _tune(launches, key=("k2",))


def test_tuner_disk_cache_that_cannot_be_keyed_warns_and_times(disk_tuner, monkeypatch):
    launches, timed, _, root, _ = disk_tuner

    def broken(index):
        raise RuntimeError("no driver")

    state["tuner"].fingerprint = broken
    with pytest.warns(RuntimeWarning, match="cannot (read|write)") as record:
        assert _tune(launches) == CANDS[2]
    assert sorted(str(w.message).split(":")[1].split("(")[0].strip() for w in record) == [
        "cannot read a cached autotune pick", "cannot write an autotune pick to the disk cache"]
    assert len(timed) == 3 and not _autotune_files(root) and _picks() == {("k",): CANDS[2]}


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False), ("false", False), ("", False)])
def test_autotune_cache_env(monkeypatch, value, on):
    from crossvit_fast.config import ENV_AUTOTUNE_CACHE, autotune_cache_from_env

    if value is None:
        monkeypatch.delenv(ENV_AUTOTUNE_CACHE, raising=False)
    else:
        monkeypatch.setenv(ENV_AUTOTUNE_CACHE, value)
    assert autotune_cache_from_env() is on


def test_tune_key_buckets_rows_and_names_shapes_flags_dtypes_layouts():
    x = torch.randn(2, 7, 16)
    w = torch.randn(32, 16, dtype=torch.float16)
    o = torch.empty(2, 7, 32, dtype=torch.float16)

    def key(M, N=32, K=16, flags=(True,), xs=x):
        return kl._tune_key("fwd", M, N, K, flags, [xs, w], [o])

    assert key(100) == key(128) != key(129)
    assert key(100) != key(100, N=48) and key(100) != key(100, K=8) and key(100) != key(100, flags=(False,))
    assert key(100) != key(100, xs=x.half()) and key(100) != key(100, xs=x.transpose(0, 2))


def test_shares_storage():
    a = torch.randn(4, 8)
    assert tuning.shares_storage([a], [torch.randn(4, 8), a]) and tuning.shares_storage([a[:, 2:]], [a])
    assert not tuning.shares_storage([a], [a.clone(), None])


def test_every_default_tile_is_a_tuning_candidate_and_compiled_ahead_of_time():
    for name, cfg in kl.CONFIGS.items():
        assert cfg in kl.TUNE_CONFIGS["fp32" if name == "fp32" else "16bit"], name
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cands = kl.tune_configs(dtype)
        assert len(set(cands)) == len(cands)
        for ln in (False, True):
            fwd = kl.fwd_candidates(dtype, ln)
            if dtype == torch.float32:
                assert fwd == cands
            else:  # 16-bit: a LayerNorm GEMM is always the LayerNorm kernel + the GEMM (no prologue), or cuBLAS
                assert fwd == ([c + (kl.LN_FIRST,) for c in cands] if ln else cands) + [kl.CUBLAS]
            compiled = {c["config"] for c in kl.aot_cases() if c["dtype"] == dtype and c["kernel"] == "fwd"
                        and bool(c.get("ln")) == ln}
            assert compiled == set(fwd)
        dgrad = kl.dgrad_candidates(dtype)
        if dtype == torch.float32:
            assert dgrad == cands
        else:  # 16-bit: dz formed once per element first (the dz kernel), then the GEMM, or cuBLAS
            assert dgrad == [c + (kl.DZ_PASS,) for c in cands] + [kl.DZ_FIRST]
            assert kl.dgrad_candidates(dtype, dz_pass=False) == cands + [kl.DZ_FIRST]
            f32 = kl.dgrad_candidates(dtype, torch.float32)  # cuBLAS writes a float32 da from 16-bit operands
            assert f32 == [c for c in dgrad if c == kl.DZ_FIRST or not kl._serializes(c)] and len(f32) < len(dgrad)
        compiled = {c["config"] for c in kl.aot_cases() if c["dtype"] == dtype and c["kernel"] == "dgrad"}
        assert compiled == set(dgrad) | set(kl.dgrad_candidates(dtype, torch.float32))
    assert kl.dgrad_candidates(torch.float16, torch.bfloat16) == [c + (kl.DZ_PASS,) for c in
                                                                   kl.tune_configs(torch.float16)]
    assert kl.config_name((128, 64, 32, 4, 3)) == "128x64x32/w4/s3"
    assert kl.config_name((128, 64, 32, 4, 3, kl.LN_FIRST)) == "ln+128x64x32/w4/s3"
    assert kl.config_name((128, 64, 32, 4, 3, kl.DZ_PASS)) == "dz+128x64x32/w4/s3"
    assert kl.config_name(kl.DZ_FIRST) == "dz+cublas" and kl.config_name(kl.CUBLAS) == "cublas"


def test_candidates_from_the_static_reading(monkeypatch):
    """The tiles of the sm_90 reading (kernels/linear.py, TUNE_CONFIGS): four 16-bit tiles; a 16-bit LayerNorm
    GEMM's key times them as LN_FIRST and cuBLAS (5, was 17), a dgrad key dz-first tiles and DZ_FIRST (5, 4 for a
    float32 da; was 9); the default of a GEMM that stores the float32 accumulator as is (a float32 da, a float32
    output without epilogue) is never a tile whose wgmma loop ptxas serializes there."""
    bf = torch.bfloat16
    assert len(kl.tune_configs(bf)) == 4 and len(kl.fwd_candidates(bf, True)) == 5
    assert len(kl.fwd_candidates(bf, False)) == 5 and len(kl.fwd_candidates(torch.float32, True)) == 1
    assert len(kl.dgrad_candidates(bf, bf)) == 5 and len(kl.dgrad_candidates(bf, torch.float32)) == 4
    assert all(not kl._serializes(c) for c in kl.fwd_candidates(bf, False, f32_store=True) if c != kl.CUBLAS)
    assert kl._serializes(kl.CONFIGS["16bit-large"]) and not kl._serializes(kl.CONFIGS["16bit-small"])
    monkeypatch.setattr(kl, "_INTERPRETED", False)  # pick_config's CUDA rule
    M = 256 * 401
    assert kl.pick_config(M, 1344, bf) == kl.CONFIGS["16bit-large"]
    assert kl.pick_config(M, 448, bf, f32_store=True) == kl.CONFIGS["16bit-small"]
    assert kl.pick_config(M, 448, torch.float32, f32_store=True) == kl.CONFIGS["fp32"]


def test_both_tuned_modules_launch_through_one_tuner_class():
    """One implementation: the block GEMMs and the self-attention each hold a :class:`Tuner`; their disk entries
    differ only by the module's name."""
    assert type(kl.TUNER) is tuning.Tuner and type(ksa.TUNER) is tuning.Tuner and kl.TUNER is not ksa.TUNER
    assert kl.TUNER.disk_entry(("fwd", 1))[1] == "crossvit_fast-linear-fwd.autotune.json"
    assert ksa.TUNER.disk_entry(("dq", 1))[1] == "crossvit_fast-self_attention-dq.autotune.json"
    assert not hasattr(ksa, "_fwd_tuned")  # no triton.autotune wrapper left


def test_dispatch_explicit_interpreted_compile_only_and_tuned(fake_tuner):
    launches, timed, _ = fake_tuner
    tuner = state["tuner"]

    def dispatch(**kw):
        args = dict(config=None, interpreted=None, compile_only=False, enabled=True, disk_cache=False,
                    key_of=lambda: ("k",), default_of=lambda: CANDS[0], candidates=lambda: CANDS,
                    device=torch.device("cpu"), may_tune=lambda: True)
        args.update(kw)
        return tuner.dispatch(launches.append, **args)

    assert dispatch(config=CANDS[1]) == CANDS[1] and launches == [CANDS[1]]
    assert dispatch(interpreted=(1, 2)) == (1, 2) and launches[-1] == (1, 2) and not timed
    launches.clear()
    assert dispatch(compile_only=True) == CANDS[0] and launches == CANDS and not timed  # every candidate compiled
    launches.clear()
    with tuning.pinned():  # pinned: only the default is compiled
        assert dispatch(compile_only=True) == CANDS[0] and launches == [CANDS[0]]
    launches.clear()
    assert dispatch() == CANDS[2] and len(timed) == 3 and _picks() == {("k",): CANDS[2]}


def test_self_attention_launches_its_candidates_through_the_tuner(fake_tuner, monkeypatch):
    """Outside the interpreter (a stand-in kernel here), a self-attention launch times each candidate of its key with
    the raw kernel's own launch options, remembers the fastest under ``(kernel, N_BUCKET, H, D, dtype[, WRITE_LO],
    device index)`` and launches it; a capture (or a pinned block) takes the remembered tile without timing."""
    launches, timed, _ = fake_tuner
    tuner = state["tuner"]
    cands = ksa.candidates("fwd", torch.float16, 32)
    assert len(cands) > 1 and all(len(c) == 4 for c in cands)
    ms = {c: 1.0 + i for i, c in enumerate(cands)}
    ms[cands[-1]] = 0.5
    tuner.timer = lambda fn: (fn(), ms[launches[-1]])[1]

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, enable_fp_fusion, **meta):
                assert grid({"BLOCK_M": BLOCK_M}) == (7,) and meta == {"BLOCK_D": 32, "DOT_PRECISION": "tf32"}
                launches.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
            return run

    monkeypatch.setattr(ksa, "TUNER", tuner)
    monkeypatch.setattr(ksa, "_KERNELS", {"fwd": Kernel()})
    monkeypatch.setattr(ksa, "_INTERPRETED", False)
    monkeypatch.setattr(ksa, "AUTOTUNE", True)
    key = (512, 7, 32, torch.float16, True)
    meta = {"BLOCK_D": 32, "DOT_PRECISION": "tf32"}
    ksa._launch("fwd", lambda m: (7,), (), meta, key, torch.device("cpu"), None)
    assert launches == cands + [cands[-1]] and _picks() == {("fwd",) + key + (None,): cands[-1]}
    launches.clear()
    with tuning.pinned():
        ksa._launch("fwd", lambda m: (7,), (), meta, key, torch.device("cpu"), None)
        ksa._launch("fwd", lambda m: (7,), (), meta, key[:2] + (64,) + key[3:], torch.device("cpu"), None)
    assert launches == [cands[-1], ksa._defaults("fwd", False, 32)]


def test_self_attention_candidates_per_dtype_and_head_dim():
    """Every (kernel, dtype, head dim) keeps at least one tile, all tl.dot-sized (>= 16), from the dtype's set;
    float16 and bfloat16 at 64 columns drop the forward tile that spills there; each default is a candidate or the
    fallback."""
    for name in ("fwd", "dkdv", "dq"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for D in ksa.SUPPORTED_HEAD_DIMS:
                block_d = ksa._next_pow2(D)
                kept = ksa.candidates(name, dtype, block_d)
                assert kept, (name, dtype, D)
                tiles = ksa._tiles_32(block_d)[name] if dtype == torch.float32 else ksa._TILES_16[name]
                for t in kept:
                    assert t in tiles and t[0] >= 16 and t[1] >= 16
                    if dtype != torch.float32 and block_d == 64:
                        assert t not in ksa._SPILL_16_D64[name]
