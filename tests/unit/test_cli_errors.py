"""Bad input is refused in the launching process, with one line and status 2, before any rank starts."""

from __future__ import annotations

import json

import pytest
import torch

from lancet.app import cli, preflight
from lancet.app.checkpoint import MANIFEST
from lancet.app.config import ModelSpec, RunConfig, checkpoint_identity
from lancet.plan.artifact import RunIdentity, write_artifact
from lancet.plan.plan import Plan, VariantPlan


@pytest.fixture
def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ranks were launched despite bad input")

    monkeypatch.setattr(cli, "launch", fail)


def _refused(capsys, argv: list[str], message: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("train", ["--model", "gpt3_dense"], "unknown model 'gpt3_dense'"),
        ("train", ["--num-experts", "3", "--nproc", "2"], "3 experts are not divisible by 2 ranks"),
        ("train", ["--model", "gpt2_moe_nl2_m64_nh4_sl2048_b1"], "longer than the position table"),
        ("train", ["--gate", "topk", "--topk", "5", "--nproc", "2"], "top-5 routing is larger than the number of experts (4)"),
        ("train", ["--data", "/no/such/corpus"], "corpus path '/no/such/corpus' does not exist"),
        ("train", ["--model", "gpt2_moe_nl2_m60_nh8_sl32_b4"], "not divisible by 8 heads"),
        ("train", ["--gc-every", "0"], "--gc-every must be >= 1"),
        ("train", ["--gate", "topk", "--dispatch", "padded"], "the topk gate is dropless"),
        ("train", ["--steps", "0"], "--steps must be >= 1"),
        ("train", ["--nproc", "0"], "--nproc must be >= 1"),
        ("train", ["--num-experts", "2", "--nproc", "4"], "4 ranks but only 2 experts"),
        ("train", ["--network", "ib100"], "--network ib100 sets NCCL variables"),
        ("train", ["--resume"], "--resume needs --checkpoint-dir"),
        ("train", ["--checkpoint-dir", "x", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
        ("train", ["--collective-timeout", "0"], "--collective-timeout must be > 0"),
        ("train", ["--mode", "captured", "--plan", "/no/plan.json"], "plan file '/no/plan.json' does not exist"),
        ("train", ["--metrics-jsonl", "/no/such/folder/m.jsonl"], "folder '/no/such/folder' does not exist"),
        ("bench", ["--variants", "captured,eager,captured"], "captured given more than once; use --rounds"),
        ("bench", ["--variants", "captured", "--rounds", "0"], "--rounds must be >= 1"),
        ("bench", ["--variants", "tutel-dx"], "unknown variant(s) tutel-dx"),
        ("profile", ["--out", "/no/such/folder/p.json"], "folder '/no/such/folder' does not exist"),
        ("profile-comm", ["--out", "/no/such/folder/c.json"], "folder '/no/such/folder' does not exist"),
    ],
)
def test_bad_input_is_refused_before_launch(no_launch, capsys, command, argv, message):
    _refused(capsys, [command, *argv], message)


@pytest.mark.parametrize("command, flag", [("train", "--metrics-jsonl"), ("bench", "--json"), ("inspect", "--json"),
                                           ("profile", "--out"), ("profile-comm", "--out")])
def test_an_output_path_that_is_a_folder_is_refused(no_launch, capsys, tmp_path, command, flag):
    _refused(capsys, [command, flag, str(tmp_path)], "is a folder; give a file path")


def test_optimize_and_timeline_refuse_folders_and_garbage(capsys, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"traceEvents": [1, 2')
    _refused(capsys, ["timeline", "--trace", str(garbage), "--out", str(tmp_path / "t.png")], "is not a readable Chrome trace")
    garbage_trace = tmp_path / "list.json"
    garbage_trace.write_text("[1, 2]")
    _refused(capsys, ["timeline", "--trace", str(garbage_trace), "--out", str(tmp_path / "t.png")], "is not a Chrome trace")
    _refused(capsys, ["timeline", "--trace", str(garbage), "--out", str(tmp_path)], "is a folder")
    _refused(capsys, ["optimize", "--profile", str(garbage), "--comm", str(garbage), "--out", str(tmp_path / "p.json")],
             "is not valid JSON (truncated or corrupted?)")
    _refused(capsys, ["optimize", "--profile", str(garbage), "--comm", str(garbage), "--out", str(tmp_path)],
             "is a folder")


def test_empty_corpus_is_refused(no_launch, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    _refused(capsys, ["train", "--data", str(empty)], "holds no readable bytes")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_bytes(b"tiny")
    _refused(capsys, ["train", "--data", str(tmp_path / "short")], "fewer than one sequence needs")


def test_bf16_is_refused_on_a_cpu_without_it(no_launch, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "cpu_has_bf16", lambda: False)
    _refused(capsys, ["train", "--dtype", "bf16"], "this CPU has no native bf16")


def _plan_file(path, identity: RunIdentity) -> None:
    plan = Plan(identity=identity, fingerprint="f")
    plan.variants["lancet"] = VariantPlan(step_fingerprint="f")
    plan.write(str(path))


def _identity(**changes) -> RunIdentity:
    run = RunConfig(spec=ModelSpec(model="tiny"))
    return RunIdentity(**{**run.identity(2, torch.device("cpu")).to_json(), **changes})


def test_plans_that_are_not_this_runs_are_refused_before_launch(no_launch, capsys, tmp_path):
    argv = ["train", "--model", "tiny", "--nproc", "2", "--mode", "captured", "--plan"]
    other_model = tmp_path / "other.json"
    _plan_file(other_model, _identity(model="gpt2_moe_nl4_m32_nh2_sl8_b2"))
    _refused(capsys, [*argv, str(other_model)], "model: file has 'gpt2_moe_nl4_m32_nh2_sl8_b2'")
    other_world = tmp_path / "world.json"
    _plan_file(other_world, _identity(world_size=4))
    _refused(capsys, [*argv, str(other_world)], "world_size: file has 4, run has 2")
    profile = tmp_path / "profile.json"
    write_artifact(profile, "profile", _identity(), {"profile": {}})
    _refused(capsys, [*argv, str(profile)], "is not a lancet plan file (it is a profile file)")
    good = tmp_path / "plan.json"
    _plan_file(good, _identity())
    _refused(capsys, [*argv, str(good), "--plan-variant", "lancet-dw"], "has no variant 'lancet-dw'")
    edited = tmp_path / "edited.json"
    document = json.loads(good.read_text())
    document["variants"]["lancet"]["step_fingerprint"] = "g"
    edited.write_text(json.dumps(document))
    _refused(capsys, [*argv, str(edited)], "was modified after lancet wrote it")
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:100])
    _refused(capsys, [*argv, str(truncated)], "is not valid JSON (truncated or corrupted?)")
    _refused(capsys, ["bench", "--model", "tiny", "--nproc", "2", "--variants", "lancet", "--plan", str(other_world)],
             "world_size: file has 4, run has 2")


def test_a_checkpoint_of_another_run_is_refused_before_launch(no_launch, capsys, tmp_path):
    folder = tmp_path / "ck" / "step_00000004"
    folder.mkdir(parents=True)
    identity = checkpoint_identity(RunConfig(spec=ModelSpec(model="tiny")), 4)
    (folder / MANIFEST).write_text(json.dumps({"format": "lancet-checkpoint", "version": 1, "step": 4,
                                               "identity": identity}))
    argv = ["train", "--model", "tiny", "--checkpoint-dir", str(tmp_path / "ck"), "--resume"]
    _refused(capsys, [*argv, "--nproc", "4", "--steps", "3"], "is at step 4, not before --steps 3")
    _refused(capsys, [*argv, "--nproc", "2"], "world_size: checkpoint has 4, run has 2")
    _refused(capsys, [*argv, "--nproc", "4", "--optimizer", "sgd"], "optimizer: checkpoint has 'adamw', run has 'sgd'")
    (folder / MANIFEST).write_text("{")
    _refused(capsys, [*argv, "--nproc", "4"], "is unreadable")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 20)" in out and "(default: stop)" in out
