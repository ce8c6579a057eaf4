"""End to end on generated data: features, training, baselines, the results table, the CLI."""

import json

import pytest
from PIL import Image

from ctl.cli import main
from ctl.pipeline import run_pipeline


@pytest.fixture(scope="module")
def pipeline_out(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    results = run_pipeline(prepared.cfg, out, variants=["full"], progress=False)
    return out, results


def test_full_model_beats_random_by_a_wide_margin(pipeline_out):
    _, results = pipeline_out
    for split in ("val", "test"):
        full = results["methods"]["full"][split]["overall"]
        random = results["methods"]["random"][split]["overall"]
        assert full["auc"][0] > random["auc"][0] + 0.2, split
        assert full["hr@10"][0] > random["hr@10"][0] + 0.2, split


def test_results_are_written_as_json_and_markdown(pipeline_out):
    out, results = pipeline_out
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "results.md").read_text()
    for method in ("random", "popularity", "raw efficientnet-lite0 features", "full"):
        assert f"| {method} |" in table
    assert set(results["methods"]["full"]["test"]) >= {"overall", "novelty:new"}
    rankings = Image.open(out / "rankings-full.png")
    assert rankings.height > rankings.width / 10  # one strip per test scene, stacked
    assert any(key.startswith("category:") for key in results["methods"]["full"]["test"])


def test_recommend_cli_ranks_the_category_and_draws_the_attention(pipeline_out, prepared, tmp_path, capsys):
    out, _ = pipeline_out
    query = prepared.dataset.queries[0]
    scene = Image.open(prepared.dataset.image_path(query.scene)).convert("RGBA")
    scene.save(tmp_path / "scene.png")  # any common format, with an alpha channel
    code = main([
        "recommend", "--run", str(out / "runs" / "full-seed0"), "--scene", str(tmp_path / "scene.png"),
        "--box", *map(str, query.bbox), "--category", query.category, "-k", "5",
        "--explain", str(tmp_path / "attention.png"), "--strip", str(tmp_path / "strip.png"),
    ])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "d=" in line]
    assert len(lines) == 5
    products = [line.split()[1] for line in lines]
    assert all(prepared.dataset.categories[p] == query.category for p in products)
    distances = [float(line.split("d=")[1].split()[0]) for line in lines]
    assert distances == sorted(distances)
    assert Image.open(tmp_path / "attention.png").size[0] > 0
    assert Image.open(tmp_path / "strip.png").size[0] > Image.open(tmp_path / "strip.png").size[1]


def test_recommend_cli_names_an_unknown_category(pipeline_out, prepared, capsys):
    out, _ = pipeline_out
    scene = prepared.dataset.image_path(prepared.dataset.queries[0].scene)
    code = main(["recommend", "--run", str(out / "runs" / "full-seed0"), "--scene", str(scene), "--category", "Hats|Top"])
    assert code == 2
    assert "Hats|Top" in capsys.readouterr().err


def test_evaluate_cli_reads_an_explicit_query_file(pipeline_out, prepared, tmp_path, capsys):
    out, _ = pipeline_out
    rows = []
    for query in prepared.dataset.queries[:6]:
        negatives = [p for p in prepared.dataset.catalog(query.category) if p not in query.positives][:5]
        rows.append({"scene": query.scene, "bbox": list(query.bbox), "category": query.category,
                     "positive": list(query.positives), "negatives": negatives})
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["evaluate", "--run", str(out / "runs" / "full-seed0"), "--queries", str(queries), "--out", str(tmp_path / "m.json")])
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["full"]["overall"]["count"] == 6
    assert {"random", "popularity", "raw efficientnet-lite0 features"} < set(metrics)
    assert "| full |" in capsys.readouterr().out


def test_run_commands_reject_an_unknown_setting(pipeline_out, capsys):
    out, _ = pipeline_out
    code = main(["evaluate", "--run", str(out / "runs" / "full-seed0"), "--set", "nosuch.key=1"])
    assert code == 2
    assert "nosuch.key=1" in capsys.readouterr().err
