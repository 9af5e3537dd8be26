"""Training loop: exact resume, interrupts, stale checkpoints, NaN guard, pruning, DDP on gloo."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_core import training
from diffusion_core.checkpoint import list_checkpoints, load_checkpoint
from diffusion_core.distributed import DistInfo
from diffusion_core.processes import make_process
from diffusion_core.training import (
    BatchSampler,
    TrainConfig,
    lr_at,
    native_bf16,
    resolve_precision,
    train,
)
from diffusion_core.unet import UNet

_WORKER_PATH = Path(__file__).with_name("_ddp_worker.py")
_spec = importlib.util.spec_from_file_location("_ddp_worker", _WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

CPU = DistInfo.single("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets run fastest (and least disturbed by other processes) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**worker.CONFIG, "steps": steps, "p_uncond": 0.25, **kw})


def _run(tmp: Path, steps: int, net=None, config_hash: str = "h", **kw):
    images, labels = worker.data()
    net = net if net is not None else worker.unet()
    cfg = _cfg(steps, **kw.pop("cfg", {}))
    return train(
        net,
        make_process("vp"),
        images,
        labels,
        cfg,
        checkpoint_dir=tmp,
        config_hash=config_hash,
        dist=CPU,
        progress=False,
        **kw,
    )


def _weights(path: Path) -> dict:
    m = load_checkpoint(path)
    return {"model": m["model"], "ema": m["ema"]}


def _assert_equal_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


# ----------------------------------------------------------------------------- pure pieces


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match="prediction"):
        TrainConfig(prediction="score")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="keep_last"):
        TrainConfig(keep_last=0)


def test_lr_warmup_is_linear_then_constant():
    assert [lr_at(k, 1.0, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 3e-4, 0) == 3e-4


def test_lr_decays_to_zero_after_the_warmup():
    # warm-up of 2 steps, then 4 decaying steps: u = 0, 1/4, 2/4, 3/4
    linear = [lr_at(k, 1.0, 2, "linear", 6) for k in range(6)]
    assert linear == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cosine = [lr_at(k, 2.0, 0, "cosine", 4) for k in range(4)]
    assert cosine == pytest.approx([2.0, 1.0 + math.cos(math.pi / 4), 1.0,
                                    1.0 - math.cos(math.pi / 4)])
    assert lr_at(10, 1.0, 2, "none", 6) == 1.0
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")


def _conv_output_dtypes(net: torch.nn.Module) -> set:
    """Register hooks that collect the dtypes of every convolution's output in ``net``."""
    seen: set = set()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    return seen


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    # the convolutions compute in bf16 under bf16 and in fp32 otherwise: a bf16 mode that
    # silently runs fp32 (no autocast) fails here, whatever the losses
    net32, net16 = worker.unet(), worker.unet()
    dtypes32, dtypes16 = _conv_output_dtypes(net32), _conv_output_dtypes(net16)
    fp32 = _run(tmp_path / "a", 3, net=net32)
    bf16 = _run(tmp_path / "b", 3, net=net16, cfg={"mixed_precision": "bf16"})
    assert dtypes32 == {torch.float32}
    assert dtypes16 == {torch.bfloat16}, f"bf16 mode computed convolutions in {dtypes16}"
    assert math.isfinite(bf16.loss)
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.1)


@pytest.mark.parametrize(("avx512_bf16", "amx"), [(True, False), (False, True), (False, False)])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx):
    cpu, native = torch.device("cpu"), avx512_bf16 or amx
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16(cpu) is native
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    # explicit choices are kept whatever the CPU
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="needs CUDA or the CPU"):
        resolve_precision("bf16", torch.device("meta"))
    assert resolve_precision("auto", torch.device("meta")) == "fp32"


def test_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    _run(tmp_path / "b", 1, cfg={"mixed_precision": "bf16"})
    warned = [ln for ln in capsys.readouterr().out.splitlines() if "native bf16" in ln]
    assert len(warned) == 1 and "use 'auto' or 'fp32'" in warned[0]
    _run(tmp_path / "a", 1, cfg={"mixed_precision": "auto"})  # auto: fp32 here, no warning
    assert "native bf16" not in capsys.readouterr().out


def test_global_batch_is_the_same_for_any_world_size():
    n, b = 37, 8  # 4 full batches per epoch, 5 items dropped
    single = BatchSampler(n, b, seed=1)
    shards = [BatchSampler(n, b, seed=1, rank=r, world_size=4) for r in range(4)]
    for step in range(10):
        merged = torch.cat([s.local_batch(step) for s in shards])
        assert torch.equal(merged, single.global_batch(step))
    epoch0 = torch.cat([single.global_batch(k) for k in range(4)])
    assert epoch0.unique().numel() == 32  # a permutation, without repeats, last batch dropped
    assert not torch.equal(single.permutation(0), single.permutation(1))


def test_batch_must_divide_by_world_size_and_fit_the_data():
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        BatchSampler(100, 8, seed=0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="larger than the dataset"):
        BatchSampler(4, 8, seed=0)


def test_train_rejects_bad_inputs(tmp_path):
    images, labels = worker.data()
    dist3 = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    kw = dict(checkpoint_dir=tmp_path, config_hash="h", progress=False)
    with pytest.raises(ValueError, match="world size 3"):
        train(worker.unet(), make_process("vp"), images, labels, _cfg(1), dist=dist3, **kw)
    uncond = UNet(in_channels=1, image_size=4, base_channels=8, channel_mults=(1,),
                  num_res_blocks=1, attention_resolutions=(), num_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="p_uncond"):
        train(uncond, make_process("vp"), images, labels, _cfg(1), dist=CPU, **kw)
    meta = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    with pytest.raises(ValueError, match="bf16"):
        cfg = _cfg(1, mixed_precision="bf16")
        train(worker.unet(), make_process("vp"), images, labels, cfg, dist=meta, **kw)
    assert list_checkpoints(tmp_path) == []


# ------------------------------------------------------------------------ resume and files


def test_resume_is_bit_identical_to_one_unbroken_run(tmp_path):
    logs_a, logs_b = [], []
    full = _run(tmp_path / "a", 6, on_log=lambda s, m: logs_a.append((s, m)))
    half = _run(tmp_path / "b", 3, on_log=lambda s, m: logs_b.append((s, m)))
    assert (half.step, half.resumed) == (3, False)
    rest = _run(tmp_path / "b", 6, on_log=lambda s, m: logs_b.append((s, m)))
    assert (rest.step, rest.resumed, rest.interrupted) == (6, True, False)
    assert rest.loss == full.loss
    assert logs_a == logs_b and [s for s, _ in logs_a] == list(range(1, 7))
    _assert_equal_weights(_weights(full.model_path), _weights(rest.model_path))
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(rest.checkpoint)
    assert a["ema_updates"] == b["ema_updates"] == 6
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _sums(state: dict) -> tuple[float, float]:
    """Sum and sum of absolute values (float64) over every tensor of a state dict."""
    return (sum(float(v.double().sum()) for v in state.values()),
            sum(float(v.double().abs().sum()) for v in state.values()))


def test_five_steps_of_a_tiny_unet_give_the_recorded_numbers(tmp_path):
    """Pins the numbers of a fixed seed (recorded before the loop was split into named
    functions): the loss of every step and the sums of the raw, EMA and guide weights. Any change
    to the order of random draws, the optimiser, the EMA or the guide snapshot moves them."""
    logs = []
    res = _run(tmp_path, 5, cfg={"guide_at": 0.4}, on_log=lambda s, m: logs.append(m["loss"]))
    assert logs == pytest.approx([0.7429720163345337, 0.8153170347213745, 0.7865129113197327,
                                  0.6549901366233826, 0.6977399587631226], rel=1e-6)
    m = load_checkpoint(res.model_path)
    assert _sums(m["model"]) == pytest.approx((107.5736157020583, 927.1808559358615), rel=1e-6)
    assert _sums(m["ema"]) == pytest.approx((110.36096298826033, 920.8394458990961), rel=1e-6)
    assert m["guide"]["step"] == 2
    assert _sums(m["guide"]["ema"])[0] == pytest.approx(121.59719176447452, rel=1e-6)


def test_weighting_log_normal_t_and_power_ema_resume_bit_identically(tmp_path):
    opts = {"cfg": {"loss_weighting": "min_snr", "t_sampling": "log_normal", "ema_std": 0.1,
                    "prediction": "v"}}
    full = _run(tmp_path / "a", 4, **opts)
    _run(tmp_path / "b", 2, **opts)
    rest = _run(tmp_path / "b", 4, **opts)
    assert rest.resumed and rest.loss == full.loss and math.isfinite(full.loss)
    _assert_equal_weights(_weights(full.model_path), _weights(rest.model_path))
    plain = _run(tmp_path / "c", 4)
    assert plain.loss != full.loss  # the options change what is trained


def test_model_file_rebuilds_the_network(tmp_path):
    res = _run(tmp_path, 2)
    m = load_checkpoint(res.model_path)  # weights_only=True
    assert res.model_path == tmp_path / "model.pt"
    assert m["step"] == 2 and m["prediction"] == "eps" and m["process"]["name"] == "vp"
    net = UNet(**m["model_config"])
    net.load_state_dict(m["ema"])
    net.load_state_dict(m["model"])
    assert m["config_hash"] == "h"


def test_guide_snapshot_is_the_ema_at_its_step_and_survives_a_resume(tmp_path):
    """guide_at = 0.5 of 6 steps keeps the EMA after step 3: the EMA of a 3-step run (no lr
    decay, so the first 3 steps are the same), also when the run resumes past that step."""
    short = _run(tmp_path / "short", 3)
    full = _run(tmp_path / "full", 6, cfg={"guide_at": 0.5})
    m = load_checkpoint(full.model_path)
    assert m["guide"]["step"] == 3
    expected = load_checkpoint(short.model_path)["ema"]
    assert all(torch.equal(m["guide"]["ema"][k], expected[k]) for k in expected)
    assert not all(torch.equal(m["ema"][k], expected[k]) for k in expected)  # not an alias
    _run(tmp_path / "resumed", 4, cfg={"guide_at": 0.5})  # stops after the snapshot...
    rest = _run(tmp_path / "resumed", 6, cfg={"guide_at": 0.5})  # ...and carries it on
    assert rest.resumed
    again = load_checkpoint(rest.model_path)["guide"]  # steps=4 put the snapshot at step 2,
    assert again["step"] == 2  # and the file says so
    assert not all(torch.equal(again["ema"][k], expected[k]) for k in expected)
    _run(tmp_path / "same", 4, cfg={"guide_at": 0.75})  # the snapshot step is 3 either way
    same = load_checkpoint(_run(tmp_path / "same", 6, cfg={"guide_at": 0.5}).model_path)
    assert all(torch.equal(same["guide"]["ema"][k], expected[k]) for k in expected)
    plain = load_checkpoint(_run(tmp_path / "plain", 2).model_path)
    assert "guide" not in plain


def test_sigint_stops_after_the_step_saves_and_resumes_exactly(tmp_path):
    full = _run(tmp_path / "a", 6)

    def interrupt(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    stopped = _run(tmp_path / "b", 6, on_log=interrupt)
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert stopped.interrupted and stopped.signal == signal.SIGINT
    assert stopped.step == 3 and stopped.model_path is None  # step 3 was finished, then saved
    assert stopped.checkpoint == tmp_path / "b" / "ckpt-00000003.pt"
    assert not (tmp_path / "b" / "model.pt").exists()
    rest = _run(tmp_path / "b", 6)
    assert rest.resumed and not rest.interrupted and rest.step == 6
    _assert_equal_weights(_weights(full.model_path), _weights(rest.model_path))


def test_checkpoint_with_another_hash_is_moved_aside_not_continued(tmp_path, capsys):
    fresh = _run(tmp_path / "fresh", 2, config_hash="new")
    old = _run(tmp_path / "run", 4, config_hash="old")
    old_files = sorted(p.name for _, p in list_checkpoints(tmp_path / "run"))
    res = _run(tmp_path / "run", 2, config_hash="new")
    assert not res.resumed and res.step == 2
    assert "config hash old, not new" in capsys.readouterr().out
    stale = tmp_path / "run" / "stale-old"
    assert sorted(p.name for _, p in list_checkpoints(stale)) == old_files
    assert load_checkpoint(stale / "model.pt")["step"] == old.step
    _assert_equal_weights(_weights(fresh.model_path), _weights(res.model_path))


def test_stale_checkpoints_can_go_outside_the_checkpoint_folder(tmp_path):
    _run(tmp_path / "ck", 2, config_hash="old")
    res = _run(tmp_path / "ck", 2, config_hash="new", archive_dir=tmp_path / "stale")
    assert not res.resumed
    assert [s for s, _ in list_checkpoints(tmp_path / "stale" / "stale-old")] == [2]
    assert not any(p.is_dir() for p in (tmp_path / "ck").iterdir())  # nothing left to cache


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write that fails with ENOSPC stops training with that OSError; the checkpoint before
    it is intact, no temporary file is left, and a re-run resumes from it."""
    full = _run(tmp_path / "a", 4)
    _run(tmp_path / "b", 2)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _run(tmp_path / "b", 4)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt-00000002.pt", "model.pt"]
    assert load_checkpoint(tmp_path / "b" / "ckpt-00000002.pt")["step"] == 2
    res = _run(tmp_path / "b", 4)
    assert res.resumed and res.step == 4
    _assert_equal_weights(_weights(full.model_path), _weights(res.model_path))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    _run(tmp_path, 7, cfg={"checkpoint_every": 2, "keep_last": 2})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 7]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    full = _run(tmp_path / "a", 6)
    _run(tmp_path / "b", 4, cfg={"keep_last": 3})
    newest = tmp_path / "b" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    res = _run(tmp_path / "b", 6)
    assert res.resumed
    assert (tmp_path / "b" / "corrupt" / "ckpt-00000004.pt").exists()
    _assert_equal_weights(_weights(full.model_path), _weights(res.model_path))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tmp_path):
    net = worker.unet()
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        return out * math.nan if calls["n"] == 3 else out

    net.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match="at step 3"):
        _run(tmp_path, 6, net=net, cfg={"checkpoint_every": 1})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    good = load_checkpoint(tmp_path / "ckpt-00000002.pt")
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    assert not (tmp_path / "model.pt").exists()


# ------------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One torchrun launch of two gloo processes running the worker's scenarios."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(_WORKER_PATH), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _results(out: Path) -> list[dict]:
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(2)]


def test_ddp_on_gloo_matches_one_process_on_the_same_global_batch(ddp_run, tmp_path):
    r0, r1 = _results(ddp_run)
    assert r0["dist"]["world_size"] == r1["dist"]["world_size"] == 2
    assert (r0["dist"]["is_main"], r1["dist"]["is_main"]) == (True, False)
    images, labels = worker.data()
    cfg = TrainConfig(steps=worker.STEPS, prediction="x0", **worker.CONFIG)
    ref = train(
        worker.ClassMean(init_seed=0),
        make_process("vp"),
        images,
        labels,
        cfg,
        checkpoint_dir=tmp_path,
        config_hash="m",
        dist=CPU,
        progress=False,
    )
    ddp = load_checkpoint(ddp_run / "mean" / "model.pt")
    one = load_checkpoint(ref.model_path)
    for part in ("model", "ema"):
        for k in one[part]:
            torch.testing.assert_close(ddp[part][k], one[part][k], rtol=1e-5, atol=1e-6)
    assert r0["mean"]["loss"] == pytest.approx(ref.loss, rel=1e-5)


def test_ddp_checkpoint_holds_every_ranks_rng(ddp_run):
    ck = load_checkpoint(ddp_run / "full" / "ckpt-00000006.pt")
    ranks = ck["rng"]["ranks"]
    assert ck["rng"]["world_size"] == 2 and len(ranks) == 2
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])


def test_ddp_signal_on_one_rank_stops_all_and_resume_matches(ddp_run):
    r0, r1 = _results(ddp_run)
    for r in (r0, r1):
        assert r["interrupted"]["interrupted"] and r["interrupted"]["signal"] == signal.SIGTERM
        assert r["interrupted"]["step"] == worker.STOP_AT
        assert r["resumed"]["resumed"] and r["resumed"]["step"] == worker.STEPS
    _assert_equal_weights(
        _weights(ddp_run / "full" / "model.pt"), _weights(ddp_run / "resume" / "model.pt")
    )


def test_compile_auto_means_one_cuda_device_only():
    from diffusion_core.training import use_compile

    auto = TrainConfig(compile="auto")
    assert use_compile(auto, torch.device("cuda"), 1)
    assert not use_compile(auto, torch.device("cuda"), 2)  # DDP: not measured, stays eager
    assert not use_compile(auto, torch.device("cpu"), 1)
    assert use_compile(TrainConfig(compile=True), torch.device("cpu"), 1)
    assert not use_compile(TrainConfig(compile=False), torch.device("cuda"), 1)
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="sometimes")
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig(compile_mode="fast")
