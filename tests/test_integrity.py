"""Files that prove their integrity and belong together: content hashes on checkpoints, shards
and caches; operators tied to their teacher; resume keyed on content; stale temporary files;
one bench per output folder; factories that are trusted code and must return a problem."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sdekit
from sdekit._io import (
    _host,
    atomic_torch_save,
    atomic_write,
    clean_stale_temps,
    content_hash,
)
from sdekit.bench.problems import BenchError, gmm_problem, problem_from_factory
from sdekit.bench.runner import SweepConfig, run_sweep
from sdekit.cli.main import main as cli
from sdekit.distill import generate_trajectories, load_operator, load_trajectories
from sdekit.models import wrap
from sdekit.training import (
    CheckpointError,
    Trainer,
    load_checkpoint,
    load_model,
    recipe,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ROOT = Path(__file__).resolve().parents[1]


def _toy(out: Path, seed: int = 0) -> Path:
    cfg = recipe("eight_gaussians", net={"width": 16, "depth": 1, "emb_dim": 8}, steps=2,
                 batch_size=16, warmup=1, ckpt_every=2, log_every=1, sample_n=8, sample_steps=2,
                 device="cpu", seed=seed)
    Trainer(cfg, out, progress=False).train()
    return out / "checkpoint.pt"


def _flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip bytes in the middle of ``tensor``'s record inside the zip archive (its CRC is then
    wrong, which torch does not check)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "the tensor's bytes are stored verbatim"
    for i in range(at + len(raw) // 2, at + len(raw) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return _toy(d / "a", seed=0), _toy(d / "b", seed=1)


# ------------------------------------------------------------------ content hashes
def test_content_hash_sees_dtype_shape_and_bytes():
    x = torch.arange(6, dtype=torch.float32)
    h = content_hash({"w": x, "n": 1})
    assert h == content_hash({"n": 1, "w": x.clone()})             # key order does not matter
    assert h != content_hash({"w": x.double(), "n": 1})
    assert h != content_hash({"w": x.reshape(2, 3), "n": 1})
    y = x.clone()
    y[3] = 3.0000002
    assert h != content_hash({"w": y, "n": 1})
    assert content_hash({"b": torch.ones(2, dtype=torch.bfloat16)}) != \
        content_hash({"b": torch.ones(2, dtype=torch.float16)})


def test_flipped_weight_bytes_are_an_error_naming_the_file(teachers, tmp_path, capsys):
    good, _ = teachers
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(good.read_bytes())
    ck = load_checkpoint(good)
    name, w = max(ck["ema"].items(), key=lambda kv: kv[1].numel())
    _flip_inside(bad, w)
    silently = torch.load(bad, weights_only=True)                 # torch reads it silently...
    assert not torch.equal(silently["ema"][name], w)
    with pytest.raises(CheckpointError, match=r"flipped\.pt.*corrupt.*content hash"):
        load_model(bad)                                            # ... sdekit does not
    assert cli(["sample", "--checkpoint", str(bad), "--n", "4", "--out",
                str(tmp_path / "s")]) == 2
    assert "flipped.pt" in capsys.readouterr().err and not (tmp_path / "s.npz").exists()


def test_checkpoint_without_a_hash_loads_with_a_warning(teachers, tmp_path):
    good, _ = teachers
    raw = torch.load(good, weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in raw.items() if k not in ("sha256", "weights_sha256")}, old)
    with pytest.warns(UserWarning, match=r"old\.pt.*no content hash"):
        net, _, _ = load_model(old)
    assert net.weights_sha256 == load_model(good)[0].weights_sha256   # computed from the EMA
    assert torch.equal(next(iter(net.state_dict().values())),
                       next(iter(raw["ema"].values())))


def test_operator_and_training_checkpoints_are_told_apart(teachers, tmp_path, capsys):
    a, _ = teachers
    op = tmp_path / "op"
    assert cli(["distill", "--checkpoint", str(a), "--out", str(op), "--n", "64",
                "--shard-size", "64", "--train-steps", "0"]) == 0
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="is an operator checkpoint.*training checkpoint "
                                              r"\(made by `sdekit train`\) is expected"):
        load_model(op / "operator.pt")
    assert cli(["sample", "--checkpoint", str(op / "operator.pt"), "--n", "4"]) == 2
    assert "is an operator checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is a training checkpoint.*operator checkpoint"):
        load_operator(a)


# ------------------------------------------------------------------ operators and teachers
def test_an_operator_only_samples_with_its_own_teacher(teachers, tmp_path, capsys):
    a, b = teachers
    op = tmp_path / "op"
    assert cli(["distill", "--checkpoint", str(b), "--out", str(op), "--n", "64",
                "--shard-size", "64", "--train-steps", "0"]) == 0
    sample = ["sample", "--solver", "fno", "--operator", str(op / "operator.pt"), "--n", "4",
              "--out", str(tmp_path / "s")]
    assert cli(sample + ["--checkpoint", str(b)]) == 0
    capsys.readouterr()
    assert cli(sample + ["--checkpoint", str(a)]) == 2
    err = capsys.readouterr().err
    assert "operator.pt" in err and "distilled from a teacher" in err, err
    _, cfg = load_operator(op / "operator.pt")
    assert cfg["teacher_sha256"] == load_checkpoint(b)["weights_sha256"]
    # the bench, before any work
    bench = ["bench", "--solvers", "fno", "--nfe", "1", "-n", "8", "--quiet", "--formats", "json",
             "-O", f"fno.operator={op / 'operator.pt'}"]
    out = tmp_path / "bench"
    assert cli(bench + ["--problem", f"checkpoint:{a}", "--out", str(out)]) == 2
    assert "distilled from a teacher" in capsys.readouterr().err
    assert not list(out.rglob("reference.pt"))
    assert cli(bench + ["--problem", f"checkpoint:{b}", "--out", str(out)]) == 0
    # Python, where the teacher is known
    net_a, sde, _ = load_model(a)
    with pytest.raises(ValueError, match="distilled from a teacher"):
        sdekit.sample(sde, wrap(net_a, sde), shape=(4, 2), solver="fno",
                      operator=op / "operator.pt", steps=1)


def test_distill_resumes_from_another_working_directory(teachers, tmp_path, monkeypatch,
                                                        capsys):
    a, b = teachers
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(a.read_bytes())
    base = ["--n", "64", "--shard-size", "32", "--batch", "16"]
    monkeypatch.chdir(tmp_path)
    assert cli(["distill", "--checkpoint", "run/checkpoint.pt", "--out", "op",
                "--train-steps", "2", *base]) == 0
    shard = tmp_path / "op" / "trajectories" / "shard_00000.pt"
    stamp = shard.stat().st_mtime_ns
    monkeypatch.chdir(run)                       # the same run, spelled from elsewhere
    assert cli(["distill", "--checkpoint", "checkpoint.pt", "--out", "../op",
                "--train-steps", "4", *base]) == 0, capsys.readouterr().err
    assert shard.stat().st_mtime_ns == stamp, "the trajectories were regenerated"
    assert load_checkpoint(tmp_path / "op" / "operator.pt")["step"] == 4
    capsys.readouterr()
    assert cli(["distill", "--checkpoint", str(b), "--out", "../op", "--train-steps", "4",
                *base]) == 2                     # another teacher: refused
    assert "teacher_sha256" in capsys.readouterr().err


# ------------------------------------------------------------------ caches and shards
def _gaussian_traj(path: Path):
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData.random(sde, dim=3, seed=1)
    kw = {"solver": "heun", "steps_per_segment": 2, "shard_size": 50}
    generate_trajectories(path, sde, data.model(), (3,), 100, **kw)
    return lambda: generate_trajectories(path, sde, data.model(), (3,), 100, **kw)


def test_a_corrupt_shard_is_named_and_regenerated(tmp_path):
    regenerate = _gaussian_traj(tmp_path)
    x1, tr1, _ = load_trajectories(tmp_path)
    shard = tmp_path / "shard_00001.pt"
    for corrupt in (lambda: shard.write_bytes(b"junk"),
                    lambda: _flip_inside(shard, torch.load(shard, weights_only=True)["traj"])):
        corrupt()
        with pytest.raises(ValueError, match=r"shard_00001\.pt.*regenerate"):
            load_trajectories(tmp_path)
        with pytest.warns(UserWarning, match=r"shard_00001\.pt.*regenerating"):
            regenerate()
        x2, tr2, _ = load_trajectories(tmp_path)
        assert torch.equal(x1, x2) and torch.equal(tr1, tr2)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json is unreadable"):
        load_trajectories(tmp_path)


def test_a_corrupt_reference_cache_is_rebuilt(tmp_path):
    problem = gmm_problem(dim=2, components=2)
    cfg = SweepConfig(solvers=["ddim"], grids=["logsnr"], nfe=[5], n=8, reference_tol=1e-5)
    first = run_sweep(problem, cfg, tmp_path, progress=False)
    (ref,) = tmp_path.rglob("reference.pt")
    x_ref = torch.load(ref, weights_only=True)["x"]
    for corrupt in (lambda: ref.write_bytes(b"junk"), lambda: _flip_inside(ref, x_ref)):
        corrupt()
        with pytest.warns(UserWarning, match=r"reference\.pt.*recomputing"):
            again = run_sweep(problem, cfg, tmp_path, progress=False)
        assert again["cells"][0]["rms"] == first["cells"][0]["rms"]
        assert torch.equal(torch.load(ref, weights_only=True)["x"], x_ref)


# ------------------------------------------------------------------ stale temporary files
WRITER = textwrap.dedent('''
    import sys, time
    from sdekit._io import atomic_write
    def write(f):
        f.write(b"partial"); f.flush(); print("writing", flush=True); time.sleep(600)
    atomic_write(sys.argv[1], write)
''')


def _writer(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def _temps(target: Path) -> list[str]:
    return sorted(n for n in os.listdir(target.parent)
                  if n.startswith(f".{target.name}.") and n.endswith(".tmp"))


def test_kill_9_during_a_write_leaves_no_temp_file_behind_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pt"
    killed = _writer(target)
    (left,) = _temps(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert _temps(target) == [left] and not target.exists()       # what kill -9 leaves
    live = _writer(target)                                         # a concurrent live writer
    try:
        (live_tmp,) = set(_temps(target)) - {left}
        old = tmp_path / f".{target.name}.abcd1234.tmp"              # older sdekit: no pid
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        fresh = tmp_path / f".{target.name}.efgh5678.tmp"
        fresh.write_bytes(b"x")
        atomic_torch_save(target, {"w": torch.ones(2)})
        assert _temps(target) == sorted([live_tmp, fresh.name]), "stale temps are removed, " \
            "a live writer's and a fresh unknown one are kept"
        assert torch.load(target, weights_only=True)["w"].tolist() == [1.0, 1.0]
    finally:
        live.kill()
        live.wait()
    assert f"{_host()}-{live.pid}." in live_tmp
    assert clean_stale_temps(target) == [tmp_path / live_tmp]     # now its writer is dead too
    atomic_write(target, lambda f: f.write(b"done"))
    assert _temps(target) == [fresh.name] and target.read_bytes() == b"done"


# ------------------------------------------------------------------ one bench per --out
BLOCKING_FACTORY = textwrap.dedent('''
    import os, time
    import torch
    from sdekit import VPSDE, GaussianData

    def make():
        sde = VPSDE()
        data = GaussianData.random(sde, dim=2, seed=0)
        flag = os.environ["SDEKIT_TEST_FLAG"]

        def init(n, g):
            if n != 2:                       # the sweep itself (not the factory probe) waits
                open(flag + ".started", "w").close()
                t0 = time.monotonic()       # (bounded, so a missing lock fails, not hangs)
                while not os.path.exists(flag + ".go") and time.monotonic() - t0 < 30:
                    time.sleep(0.05)
            return data.marginal_sample(n, sde.T, g)

        return {"sde": sde, "model": data.model("eps"), "sample_init": init,
                "flow": lambda x: data.flow(x, sde.T, sde.t_min)}
''')


def test_two_bench_runs_on_one_out_do_not_both_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "blocking_bench_factory.py").write_text(BLOCKING_FACTORY)
    flag = tmp_path / "flag"
    monkeypatch.setenv("SDEKIT_TEST_FLAG", str(flag))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["bench", "--problem", "blocking_bench_factory:make", "--solvers", "ddim", "--grids",
            "logsnr", "--nfe", "5", "-n", "16", "--quiet", "--formats", "json", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    first = subprocess.Popen([sys.executable, "-m", "sdekit.cli.main", *argv], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not Path(str(flag) + ".started").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() - t0 < 120, "the first bench never started its sweep"
            time.sleep(0.1)
        assert cli(argv) == 2                                  # the second run is refused
        err = capsys.readouterr().err
        assert str(out / "cache") in err and f"pid {first.pid}" in err, err
        Path(str(flag) + ".go").touch()
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    assert cli(argv) == 0                                      # released when it exited
    assert (out / "bench.json").exists()


# ------------------------------------------------------------------ module:factory
def test_factories_are_trusted_code_found_on_sys_path_only(tmp_path, monkeypatch, capsys):
    (tmp_path / "cwd_only_factory.py").write_text("def make():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".", str(tmp_path), os.getcwd())])
    with pytest.raises(BenchError, match="cannot import module 'cwd_only_factory'.*PYTHONPATH"):
        problem_from_factory("cwd_only_factory:make")
    monkeypatch.syspath_prepend(str(tmp_path))                    # the user opts in
    with pytest.raises(BenchError, match=r"'cwd_only_factory:make'.*returned a int"):
        problem_from_factory("cwd_only_factory:make")
    with pytest.raises(BenchError, match=r"'builtins:exit'.*raised SystemExit"):
        problem_from_factory("builtins:exit")
    assert cli(["bench", "--problem", "builtins:exit", "--out", str(tmp_path / "o"),
                "--quiet"]) == 2
    assert "builtins:exit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["bench", "--help"])
    assert "TRUSTED CODE ONLY" in capsys.readouterr().out
    assert "trusted code only" in problem_from_factory.__doc__.lower()
