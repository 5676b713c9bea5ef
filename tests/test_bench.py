"""`spectr bench` end to end on tiny random models: every method and metric lands in the JSON and report."""

import json

import pytest
import torch
from typer.testing import CliRunner

import spectr
from spectr.bench import report, runner
from spectr.bench.suites import SUITES, load_suite
from spectr.cli import app
from spectr.errors import InvalidInputError
from spectr.rules import RULES
from spectr.rules.optimal import optimal_acceptance
from tests.models.test_loading import save_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    target = save_tiny_model(tmp_path_factory.mktemp("target"), chat=True)
    draft = save_tiny_model(tmp_path_factory.mktemp("draft"), kind="llama-mha-untied", chat=True)
    return target, draft


@pytest.fixture(scope="module")
def result(folders, tmp_path_factory):
    target, draft = folders
    engine = spectr.load(target, draft=draft, precision="fp32")
    config = runner.BenchConfig(suites=("code", "chat"), prompts_per_suite=2, temperatures=(0.0, 1.0),
                                max_new_tokens=8, grid_k=(1, 2), grid_length=(2,), rules_at=(2, 2))
    out = runner.run_bench(engine, config, cache_dir=tmp_path_factory.mktemp("cache"))
    out["rules_vs_optimal"] = runner.rules_vs_optimal(engine, load_suite("chat", 1), (1.0,), ks=(1, 2), tokens=4)
    return out


def test_suites_are_real_offline_text():
    for suite in SUITES:
        prompts = load_suite(suite, 3)
        assert len(prompts) == 3 and len({p.text for p in prompts}) == 3
        assert load_suite(suite, 3) == prompts  # the same prompts every time
    assert "def " in load_suite("code", 1)[0].text  # HumanEval: a signature and docstring
    with pytest.raises(InvalidInputError, match="unknown suite 'poems'"):
        load_suite("poems", 1)


def test_every_method_runs_or_is_reported_skipped(result):
    ran = {m["name"] for m in result["config"]["methods"]}
    skipped = {s["method"]: s["reason"] for s in result["skipped"]}
    expected = {m.name for m in runner.spectr_methods(runner.BenchConfig(grid_k=(1, 2), grid_length=(2,),
                                                                         rules_at=(2, 2)))}
    expected |= {m.name for m in runner.peer_methods(runner.BenchConfig(grid_length=(2,)))}
    assert ran | set(skipped) == expected and not ran & set(skipped)
    assert {"hf generate", "hf prompt-lookup L=2", "hf assisted L=2"} <= ran  # a draft model: assisted runs
    assert "not a GGUF file" in skipped["llama.cpp (same GGUF)"] or "not installed" in skipped["llama.cpp (same GGUF)"]
    # Equal work: every method made exactly the asked number of tokens on every prompt.
    assert {r["new_tokens"] for r in result["records"]} == {8}
    assert all(r["prefill_seconds"] > 0 for r in result["records"])  # the prompt's pass, timed apart
    assert len(result["records"]) == len(ran) * 4 * 2  # prompts x temperatures


def test_summary_has_every_metric(result):
    rows = result["summary"]
    for row in rows:
        for key in ("tokens_per_second", "speedup_vs_ar", "speedup_vs_hf", "block_efficiency",
                    "acceptance_per_position", "time_split"):
            assert key in row
        assert row["tokens_per_second"] > 0 and 1 <= row["block_efficiency"] <= 3
    ar = next(r for r in rows if r["method"] == "spectr ar" and r["suite"] == "all" and r["temperature"] == 1.0)
    assert ar["speedup_vs_ar"] == pytest.approx(1.0) and ar["block_efficiency"] == 1.0
    spec = next(r for r in rows if r["method"] == "spectr kseq k=2 L=2" and r["suite"] == "all")
    assert set(spec["time_split"]) == {"draft", "verify", "select", "other"}
    assert sum(spec["time_split"].values()) == pytest.approx(1.0)
    hf = next(r for r in rows if r["method"] == "hf generate" and r["suite"] == "all")
    assert hf["speedup_vs_hf"] == pytest.approx(1.0) and hf["block_efficiency"] == 1.0  # one pass per token


def test_rules_vs_optimal_bound_holds(result):
    curves = result["rules_vs_optimal"]["1"]
    for k in (1, 2):
        assert curves["kseq"][k] <= curves["α*"][k] + 1e-9
    assert curves["kseq"][1] == pytest.approx(curves["α*"][1], abs=1e-9)  # k = 1: Σ min(p, q)


def test_report_renders_tables_and_plots(result, tmp_path):
    docs = tmp_path / "docs" / "RESULTS.md"
    path = report.write_report(result, tmp_path / "results", "spectr bench --test", docs)
    text = path.read_text()
    assert "| T | method | tok/s |" in text and "spectr kseq k=2 L=2" in text and "Skipped here" in text
    for image in ("block_efficiency.png", "speedup.png", "rules_vs_optimal.png"):
        assert (tmp_path / "results" / image).stat().st_size > 1000
    assert "](../results/block_efficiency.png)" in docs.read_text()


def test_cli_bench_writes_json_and_report(folders, tmp_path, monkeypatch):
    target, draft = folders
    arguments = [
        "bench", "--target", str(target), "--draft", str(draft), "--precision", "fp32", "--suites", "chat",
        "--prompts", "1", "--tokens", "4", "--temperatures", "1", "--k", "1,2", "--L", "2", "--no-peers",
        "-o", str(tmp_path / "out"), f"--docs={tmp_path / 'RESULTS.md'}",
    ]
    monkeypatch.setattr("sys.argv", ["spectr", *arguments])  # what the report quotes as its command
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {m["name"] for m in saved["config"]["methods"]} >= {"spectr ar", "spectr kseq k=2 L=2"}
    written = (tmp_path / "RESULTS.md").read_text()
    assert written.startswith("# spectr benchmark results")
    # The command as run, its absolute paths by their names (alone or after '='): no folder of this machine.
    assert f"--target {target.name} --draft {draft.name}" in written and "-o out --docs=RESULTS.md" in written
    assert str(tmp_path.parent) not in written
    again = CliRunner().invoke(app, ["bench", "report", "-i", str(tmp_path / "out" / "bench.json"),
                                     "--docs", str(tmp_path / "again.md")])
    assert again.exit_code == 0 and (tmp_path / "again.md").exists()


def test_cli_bench_names_a_bad_list(folders):
    result = CliRunner().invoke(app, ["bench", "--target", str(folders[0]), "--temperatures", "hot"])
    assert result.exit_code == 2 and "comma-separated list of floats" in result.output


def test_results_name_models_not_this_machines_paths(result, tmp_path):
    import json
    from pathlib import Path

    text = json.dumps({key: result[key] for key in ("engine", "machine", "config")})
    for folder in {str(Path.cwd()), str(Path.home()), str(tmp_path.parent)}:
        assert folder not in text
    assert "/" not in result["engine"]


def test_a_compared_draft_runs_the_same_grid_side_by_side(folders, tmp_path):
    target, draft = folders
    engine = spectr.load(target, draft=draft, precision="fp32")
    other = spectr.Engine(target=engine.target, draft=None)  # n-gram lookups, labelled "lookup"
    config = runner.BenchConfig(suites=("chat",), prompts_per_suite=1, temperatures=(1.0,), max_new_tokens=6,
                                grid_k=(1, 2), grid_length=(2,), peers=False, compared_drafts=("lookup",))
    out = runner.run_bench(engine, config, cache_dir=tmp_path, compared={"lookup": other})
    names = {m["name"] for m in out["config"]["methods"]}
    assert {"spectr sd L=2", "spectr sd L=2 [lookup]", "spectr kseq k=2 L=2 [lookup]"} <= names
    rows = [r for r in out["summary"] if r["suite"] == "all"]
    assert report.best_sd(out, 1.0)["draft"] == "" and report.best_sd(out, 1.0, draft="lookup")["draft"] == "lookup"
    assert "[lookup]" in report.headline_table(out)
    assert {r["draft"] for r in rows if r["family"] == "spectr"} == {"", "lookup"}
    with pytest.raises(ValueError, match="compared drafts"):
        runner.run_bench(engine, config, cache_dir=tmp_path)


def test_the_long_suites_are_documentation_of_their_size():
    from spectr.bench.suites import CHARACTERS_PER_TOKEN, LONG_INSTRUCTION, LONG_TOKENS, load_suite

    for suite, tokens in LONG_TOKENS.items():
        prompts = load_suite(suite, 3)
        assert len({p.text for p in prompts}) == 3 and all(p.chat for p in prompts)
        for prompt in prompts:
            body = prompt.text[len(LONG_INSTRUCTION.split("{text}")[0]):]
            assert 0.9 * tokens * CHARACTERS_PER_TOKEN < len(body) <= tokens * CHARACTERS_PER_TOKEN


def test_self_drafts_and_an_approximate_mode_run_beside_the_exact_methods(folders, tmp_path):
    target, _ = folders
    result = CliRunner().invoke(app, [
        "bench", "--target", str(target), "--draft", "sparq:2,4", "--compare-draft", "self-skip:0",
        "--approximate", "sparq:2,4", "--precision", "fp32", "--suites", "chat", "--prompts", "1", "--tokens", "4",
        "--temperatures", "1", "--k", "1", "--L", "2", "--no-peers", "-o", str(tmp_path / "out"),
        "--docs", str(tmp_path / "RESULTS.md"),
    ])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    names = {m["name"] for m in saved["config"]["methods"]}
    assert {"spectr sd L=2", "spectr sd L=2 [self-skip:0]", "spectr ar [APPROXIMATE sparq:2,4]"} <= names
    assert "SparQ attention" in saved["engine"] and "layers 0 of 2 skipped" in saved["compared_drafts"]["self-skip:0"]
    assert "APPROXIMATE" in saved["compared_drafts"]["APPROXIMATE sparq:2,4"]
    deviation = saved["approximate"]["APPROXIMATE sparq:2,4"]["all"]
    assert deviation["positions"] == 32 and 0 <= deviation["mean_tv"] <= deviation["max_tv"] <= 1
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Approximate modes (not exact)" in text and "| APPROXIMATE sparq:2,4 | chat |" in text


def test_the_approximate_deviation_is_zero_where_sparq_keeps_everything_and_not_where_it_drops(folders):
    target, _ = folders
    engine = spectr.load(target, draft="ngram", precision="fp32")
    from spectr.bench.suites import Prompt

    prompts = [Prompt("long", "long-test", " ".join(load_suite("chat", 12)[i].text for i in range(12)), chat=False)]
    ids = runner.encode(engine, prompts[0])
    assert 64 + 16 + 1 < len(ids) < 200  # long enough for SparQ to leave slots out, inside the tiny context
    keeps_all = runner.approximation_deviation(engine, engine.sibling(approximate="sparq:64,100000"), prompts, tokens=4)
    assert keeps_all["all"]["max_tv"] == 0.0  # keeping every slot is plain attention (not even engaged)
    drops = runner.approximation_deviation(engine, engine.sibling(approximate="sparq:1,1"), prompts, tokens=4)
    assert drops["all"]["mean_tv"] > 0  # engaged: a random tiny model moves little (~5e-6), but it moves
