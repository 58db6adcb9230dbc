"""Experiment files: aliases, defaults, errors naming line and field, shared steps, pass-through options."""

from __future__ import annotations

from pathlib import Path

import pytest

from lancet.app.experiment.driver import RunOptions, prepare
from lancet.app.experiment.spec import ExperimentError, parse_experiments
from lancet.app.experiment.steps import build_steps

TINY = '"model": "gpt2_moe_nl2_m32_nh2_sl8_b4", "vocab_size": 256, "nproc": 2'
EXAMPLES = sorted((Path(__file__).parents[2] / "experiments").glob("*.jsonl"))


def test_paper_fields_are_aliases():
    (line,) = parse_experiments('{"name": "gpt2_moe_nl12_m768_nh16_sl512_b48", "framework": "lancet", '
                                '"moe_gate_type": "batch_prioritized", "max_partition": 4, "no_dw_scheduling": true, '
                                '"partition_type": "none"}')
    assert (line.model, line.gate, line.max_partitions, line.no_dw, line.no_partition) == (
        "gpt2_moe_nl12_m768_nh16_sl512_b48", "batch_prioritized", 4, True, True)
    assert line.variants == ("lancet",) and line.framework == "lancet"
    assert line.id == "gpt2_moe_nl12_m768_nh16_sl512_b48_batch_prioritized_lancet_nodw_nopart_maxp4"


def test_defaults_comments_and_model_dimensions():
    text = "\n".join([
        "# a comment", "",
        '{"defaults": {"dtype": "bf16", "bench_args": {"seed": 1}, "variants": ["eager"]}}',
        '{"model": {"num_layers": 2, "d_model": 32, "num_heads": 2, "seq_len": 8, "batch_size": 4}, '
        '"bench_args": {"gc-every": 5}, "network": "ib100"}',
        '{"model": "tiny", "framework": "tutel", "dtype": "fp32"}',
    ])
    first, second = parse_experiments(text)
    assert first.number == 4 and first.model == "gpt2_moe_nl2_m32_nh2_sl8_b4" and first.dtype == "bf16"
    assert first.bench_args == {"seed": 1, "gc-every": 5} and first.regime == "ib100"
    assert second.variants == ("tutel-d1", "tutel-d2", "tutel-d4", "tutel-d8") and second.dtype == "fp32"


@pytest.mark.parametrize("text, number, field", [
    ('{"model": "tiny", "variants": ["eager"], "colour": 1}', 1, "colour"),
    ('\n{"model": "tiny", "variants": ["eager"], "steps": "2"}', 2, "steps"),
    ('{"model": "tiny", "variants": ["eager"], "no_dw": 1}', 1, "no_dw"),
    ('{"model": "tiny"}', 1, "variants"),
    ('{"name": "tiny", "model": "tiny", "variants": ["eager"]}', 1, "model"),
    ('{"name": "tiny", "framework": "fastermoe"}', 1, "framework"),
    ('{"name": "tiny", "framework": "lancet", "partition_type": "fixed_range"}', 1, "partition_type"),
    ('{"model": "tiny", "variants": ["eager"], "network": "ib100", "emulate": "8:ib100"}', 1, "emulate"),
    ('{"model": "tiny", "variants": ["eager"], "emulate": "ib100"}', 1, "emulate"),
    ('{"model": "tiny", "variants": ["eager", "eager"]}', 1, "variants"),
    ('{"model": "tiny", "variants": ["eager"]}\n{"model": "tiny", "variants": ["captured"]}', 2, "id"),
    ('{"model": "tiny", "variants": ["eager"], "id": "a/b"}', 1, "id"),
    ('{"model": "tiny", "variants": ["eager"]', 1, None),
])
def test_bad_lines_name_line_and_field(text, number, field):
    with pytest.raises(ExperimentError) as err:
        parse_experiments(text, "x.jsonl")
    assert (err.value.number, err.value.field) == (number, field)
    assert str(err.value).startswith(f"x.jsonl:{number}:")


@pytest.mark.parametrize("line, field, words", [
    ('"gate": "nope"', "gate", "invalid choice: 'nope'"),
    ('"dispatch": "sparse"', "dispatch", "invalid choice: 'sparse'"),
    ('"variants": ["eagr"]', "variants", "unknown bench variant(s) eagr"),
    ('"num_experts": 3', "num_experts", "3 experts are not divisible by 2 ranks"),
    ('"bench_args": {"json": "x.json"}', "bench_args", "--json of `lancet bench` is set by the driver"),
    ('"bench_args": {"steps": 3}, "steps": 2', "bench_args", "comes from the field 'steps'"),
    ('"optimize_args": {"max-partitions": "many"}, "variants": ["lancet"]', "optimize_args", "invalid int value"),
    ('"profile_args": ["--colour"], "variants": ["lancet"]', "profile_args", "has no option --colour"),
])
def test_commands_check_the_values(tmp_path, line, field, words):
    text = "{" + TINY + ', "variants": ["eager"], ' + line + "}"
    text = text.replace('"variants": ["eager"], "variants"', '"variants"')
    path = tmp_path / "x.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(ExperimentError) as err:
        prepare(RunOptions(file=path, out=tmp_path / "out"))
    assert err.value.field == field and words in str(err.value)


def test_lines_share_profile_and_comm_but_not_plans():
    text = "\n".join(["{" + TINY + ', "id": "a", "variants": ["eager", "lancet"]}',
                      "{" + TINY + ', "id": "b", "variants": ["lancet-dw"], "no_dw": true}',
                      "{" + TINY + ', "id": "c", "variants": ["captured"]}',
                      "{" + TINY + ', "id": "d", "variants": ["lancet"], "network": "ib100"}'])
    a, b, c, d = build_steps(parse_experiments(text))
    assert a.plan.deps == b.plan.deps and a.plan is not b.plan
    assert c.plan is None and c.chain() == [c.bench]
    assert d.plan.deps[0] is a.plan.deps[0]  # profiled natively, shared
    assert d.plan.deps[1] is not a.plan.deps[1]  # comm curves of the regime
    assert "--no-dw" in b.plan.template and "--no-dw" not in a.plan.template
    assert a.plan.deps[0].lines == [1, 2, 4] and a.bench.folder == "lines/a"
    assert a.bench.key != parse_and_bench_key(text.replace('"eager", "lancet"', '"lancet", "eager"'))


def parse_and_bench_key(text: str) -> str:
    return build_steps(parse_experiments(text))[0].bench.key


def test_pass_through_options_reach_their_commands():
    text = ("{" + TINY + ', "variants": ["lancet"], "args": {"seed": 3}, "bench_args": {"gc_every": 2, "profile": true,'
            ' "quiet": false}, "profile_args": ["--tutel", "1"], "comm_args": {"max-bytes": 65536}, '
            '"optimize_args": {"memory-cap": 1000}, "profile_in_regime": true, "network": "ib100"}')
    (steps,) = build_steps(parse_experiments(text))
    profile, comm = steps.plan.deps
    assert profile.template[-6:] == ["--network", "ib100", "--seed", "3", "--tutel", "1"]
    assert comm.template[-2:] == ["--max-bytes", "65536"] and "--seed" not in comm.template
    assert "--memory-cap" in steps.plan.template
    assert steps.bench.template[-7:-2] == ["--seed", "3", "--gc-every", "2", "--profile"]
    assert "--quiet" not in steps.bench.template


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_files_are_valid(path, tmp_path):
    plan = prepare(RunOptions(file=path, out=tmp_path))
    assert plan and all(ls.bench.template[0] == "bench" for ls in plan)


def test_a_huggingface_model_line_runs_with_its_config(tmp_path):
    text = '{"model": "hf:qwen3-moe-tiny", "variants": ["captured", "lancet"], "emulate": "4:ib100"}'
    (steps,) = build_steps(parse_experiments(text))
    profile, _ = steps.plan.deps
    for step in (profile, steps.bench):
        at = step.template.index("--hf-config")
        assert step.template[at + 1] == "qwen3-moe-tiny" and "--model" not in step.template
    path = tmp_path / "x.jsonl"
    path.write_text(text + "\n")
    prepare(RunOptions(file=path, out=tmp_path / "out"))  # the commands accept it
    path.write_text(text.replace("qwen3-moe-tiny", "qwen9-tiny") + "\n")
    with pytest.raises(ExperimentError) as err:
        prepare(RunOptions(file=path, out=tmp_path / "out2"))
    assert err.value.field == "model" and "qwen9-tiny" in str(err.value)
