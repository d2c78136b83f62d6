"""Training state that survives kills: SIGKILL at each dangerous moment of a save (held there by the
S3D_PAUSE_AT hook), damaged files, a second process in the same run folder, refused starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_when_paused
from safetensors.torch import load_file, save_file

from s3d.checkpoint import (
    PREVIOUS_STATE_FILE,
    STATE_FILE,
    find_training_state,
    load_model,
    load_training_state,
    save_training_state,
)
from s3d.errors import S3DError
from s3d.train.run_folder import begin_run, run_lock

TESTS = Path(__file__).parent

# A toy run whose batch n depends on n only, so a resumed run must end on the very weights of an
# uninterrupted one; it exports weights the way finetune does (model.safetensors, then config.json).
_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_loop import _Toy
    from s3d.checkpoint import save_model
    from s3d.train.loop import TrainConfig, train
    from s3d.train.run_folder import run_lock

    def batches(start):
        w = torch.tensor([1.0, -2.0, 0.5, 3.0])
        n = start
        while True:
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(n))
            n += 1
            yield {{"x": x, "y": x @ w}}

    run = sys.argv[1]
    torch.manual_seed(0)
    obj = _Toy()
    Path(run).mkdir(exist_ok=True)
    with run_lock(run):  # as finetune and pretrain do; it also clears what a killed save left
        train(obj, batches, TrainConfig(steps=20, lr=0.01, checkpoint_every=5, log_every=5, device="cpu"), run,
              export=lambda o, s: save_model(run, o.state_dict(), {{"step": s}}), resume=sys.argv[2] == "1")
    """
)


def _run(script: Path, run: Path, resume: bool, pause: str | None = None, flag: Path | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("S3D_PAUSE_AT", None)
    if pause:
        env["S3D_PAUSE_AT"] = f"{pause}:{flag}"
    return subprocess.Popen([sys.executable, str(script), str(run), "1" if resume else "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "run.py"
    path.write_text(_SCRIPT.format(tests=str(TESTS)))
    return path


@pytest.fixture(scope="module")
def uninterrupted(script, tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("clean") / "run"
    proc = _run(script, run, resume=False)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    return load_model(run)[0]


# (pause point, its occurrence, the step the resumed run must start from). Checkpoints are at 5, 10, 15;
# occurrence 2 of a state point is the save at step 10, whose predecessor (step 5) must survive.
KILLS = [
    ("state-written:2", 5),  # the new state is complete under its temporary name only
    ("state-moved-aside:1", 5),  # (first passed at step 10) the old state is state.prev, the new one not renamed
    ("model-written:2", 10),  # the state of step 10 is saved; model.safetensors is new, config.json old
]


@pytest.mark.parametrize(("pause", "resume_step"), KILLS, ids=[k[0].split(":")[0] for k in KILLS])
def test_sigkill_during_a_save_resumes_from_the_last_complete_state(script, uninterrupted, tmp_path, pause,
                                                                    resume_step):
    run, flag = tmp_path / "run", tmp_path / "paused"
    kill_when_paused(_run(script, run, resume=False, pause=pause, flag=flag), flag)
    state = find_training_state(run)
    assert state is not None and state.step == resume_step

    proc = _run(script, run, resume=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert f"resuming {run} at step {resume_step}/20" in out
    if pause.startswith("state-moved-aside"):
        assert PREVIOUS_STATE_FILE in out and "killed while saving" in out
    weights, config = load_model(run)
    assert config["step"] == 20
    for k, v in uninterrupted.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=0)  # resume is exact, not approximately right
    assert not list(run.glob("*.tmp-*")), "the killed save's temporary files were left behind"


def test_a_resume_rewrites_an_export_the_kill_left_half_done(script, tmp_path):
    run, flag = tmp_path / "run", tmp_path / "paused"
    kill_when_paused(_run(script, run, resume=False, pause="model-written:2", flag=flag), flag)
    before = json.loads((run / "config.json").read_text())["step"]
    assert before == 5  # the kill left weights of step 10 beside the config of step 5
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from test_loop import _Toy
        from s3d.checkpoint import save_model, load_model
        from s3d.train.loop import TrainConfig, train
        run = {str(run)!r}
        seen = []
        train(_Toy(), lambda s: iter(()), TrainConfig(steps=10, checkpoint_every=5, device="cpu"), run,
              export=lambda o, s: (seen.append(s), save_model(run, o.state_dict(), {{"step": s}})), resume=True)
        assert seen[0] == 10, seen
    """)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    sd, config = load_model(run)
    state = load_file(str(run / STATE_FILE))
    assert config["step"] == 10
    assert torch.equal(sd["head.weight"], state["module.head.weight"])


def _toy_state(run: Path, steps: tuple[int, ...]) -> None:
    sys.path.insert(0, str(TESTS))
    from test_loop import _Toy

    obj = _Toy()
    opt = torch.optim.SGD(obj.parameters(), lr=0.1, momentum=0.9)
    for step in steps:
        save_training_state(run, obj, opt, step)


def test_a_damaged_newest_state_falls_back_to_the_previous_one(tmp_path):
    _toy_state(tmp_path, (5, 10))
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])  # a disk that filled up, say
    state = find_training_state(tmp_path)
    assert state.step == 5 and state.path.name == PREVIOUS_STATE_FILE and "unusable" in state.note

    (tmp_path / PREVIOUS_STATE_FILE).write_bytes(b"{}")
    with pytest.raises(S3DError, match=r"state\.safetensors: damaged.*no earlier state") as e:
        find_training_state(tmp_path)
    assert "\n" not in str(e.value)


def test_a_state_with_foreign_metadata_is_one_line(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / STATE_FILE), metadata={"format": "s3d-training-state",
                                                                            "meta": "{}"})
    with pytest.raises(S3DError, match="not a complete s3d training state"):
        find_training_state(tmp_path)


def test_a_state_of_another_model_names_a_tensor(tmp_path):
    _toy_state(tmp_path, (5,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(S3DError, match=r"does not match this model .*e\.g\. "):
        load_training_state(tmp_path, model, opt)


_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from s3d.train.run_folder import run_lock
    with run_lock(sys.argv[1]):
        Path(sys.argv[2]).write_text("locked")
        time.sleep(600)
    """
)


def test_a_second_process_is_refused_while_the_first_trains_and_admitted_after_its_kill(tmp_path):
    flag = tmp_path / "locked"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), str(flag)])
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        with pytest.raises(S3DError, match=rf"another s3d process \(pid {proc.pid}\) is training"):
            with run_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with run_lock(tmp_path):  # the kernel dropped the dead process's lock: no stale lock file to remove
        pass


def test_begin_run_refuses_before_anything_is_written(tmp_path):
    (tmp_path / "finetune.json").write_text('{"steps": 7}')
    # settings without a checkpoint: a start that failed or died early; a corrected start may replace them
    assert begin_run(tmp_path, "finetune.json", resume=False) is None
    assert begin_run(tmp_path, "finetune.json", resume=True) == {"steps": 7}
    _toy_state(tmp_path, (5,))
    with pytest.raises(S3DError, match=r"holds a run already \(state.safetensors\); pass --resume"):
        begin_run(tmp_path, "finetune.json", resume=False)
    (tmp_path / "finetune.json").write_text("[1, 2]")
    with pytest.raises(S3DError, match="not a settings object"):
        begin_run(tmp_path, "finetune.json", resume=True)
    assert begin_run(tmp_path / "new", "finetune.json", resume=True) is None


def test_a_pair_from_s3d_0_4_killed_between_its_renames_is_named(tmp_path):
    save_file({"rng.torch": torch.get_rng_state()}, str(tmp_path / STATE_FILE), metadata={"step": "3"})
    (tmp_path / "state.json").write_text(json.dumps({"step": 4, "optimizer": {"state": {}, "param_groups": []}}))
    with pytest.raises(S3DError, match="disagree on the step"):
        find_training_state(tmp_path)


@pytest.mark.parametrize("key,value,expected", [
    ("steps", "1000", "an integer"),
    ("lr", True, "a number or null"),
    ("patch_size", [64, 64], "a list of 3 integers or null"),
    ("spacing", [1, "a", 1], "a list of 3 numbers or a string or null"),
    ("deep_supervision", "false", "true/false"),
    ("extra", [], "an object"),
])
def test_an_edited_settings_value_of_the_wrong_type_is_named_on_resume(hippocampus_dir, tmp_path, capsys, key, value,
                                                                         expected):
    from dataclasses import asdict

    from s3d.cli import main
    from s3d.train.finetune import FinetuneConfig

    run = tmp_path / "run"
    run.mkdir()
    saved = json.loads(json.dumps(asdict(FinetuneConfig(spacing=(1.0, 1.0, 1.0)))))
    (run / "finetune.json").write_text(json.dumps({**saved, key: value}))
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(hippocampus_dir), str(run), "--resume", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert err == (f"s3d: error: {run / 'finetune.json'}: setting {key!r} must be {expected}, got "
                   f"{json.dumps(value)} (edited?)")
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["finetune.json"]


def test_saved_settings_round_trip_with_their_tuples():
    from dataclasses import asdict

    from s3d.train.finetune import FinetuneConfig
    from s3d.train.run_folder import settings_from_saved

    cfg = FinetuneConfig(patch_size=(32, 48, 32), warmup_steps=(5, 5), spacing=(1.0, 1.0, 2.0))
    back = settings_from_saved(FinetuneConfig, json.loads(json.dumps(asdict(cfg))), Path("finetune.json"))
    assert back == cfg and isinstance(back.patch_size, tuple)
    assert settings_from_saved(FinetuneConfig, {"spacing": "median", "lr": 1}, Path("f")).lr == 1
