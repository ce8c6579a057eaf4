from pathlib import Path

import numpy as np
import pytest

from ctl.config import EvalConfig
from ctl.data import Dataset, Query, SkipReport
from ctl.evaluate import (
    Candidates,
    build_candidates,
    evaluate,
    markdown_table,
    popularity_scorer,
    random_scorer,
    rank_metrics,
    summarize,
)

# --------------------------------------------------------------------------- rank_metrics


def test_rank_metrics_single_positive_by_hand():
    # positive 0.2; negatives 0.1 (ahead), 0.3, 0.4, 0.5 (behind)
    m = rank_metrics(np.array([0.2, 0.1, 0.3, 0.4, 0.5]), 1, fitb_negatives=3, ks=(1, 10))
    assert m["auc"] == pytest.approx(0.75)  # 3 of 4 negatives farther than the positive
    assert m["hr@1"] == 0.0
    assert m["hr@10"] == 1.0
    assert m["mrr"] == pytest.approx(0.5)  # rank 2
    assert m["fitb"] == 0.0  # 0.1 beats it among the first three negatives


def test_rank_metrics_fitb_only_looks_at_the_first_negatives():
    # the one closer negative (0.1) is the fourth: FITB over three negatives is won, HR@1 is not
    m = rank_metrics(np.array([0.2, 0.3, 0.4, 0.5, 0.1]), 1, fitb_negatives=3, ks=(1, 2))
    assert m["fitb"] == 1.0
    assert m["hr@1"] == 0.0 and m["hr@2"] == 1.0
    assert m["auc"] == pytest.approx(0.75)


def test_rank_metrics_perfect_and_worst():
    best = rank_metrics(np.array([0.0, 1.0, 2.0, 3.0]), 1)
    assert best == {"auc": 1.0, "fitb": 1.0, "mrr": 1.0, "hr@1": 1.0, "hr@10": 1.0}
    worst = rank_metrics(np.array([99.0] + [float(i) for i in range(12)]), 1, ks=(1, 10))
    assert worst["auc"] == 0.0 and worst["fitb"] == 0.0
    assert worst["hr@1"] == 0.0 and worst["hr@10"] == 0.0  # rank 13
    assert worst["mrr"] == pytest.approx(1 / 13)


def test_rank_metrics_multiple_positives():
    # positives 0.35 and 0.15; negatives 0.1, 0.2, 0.3, 0.4
    m = rank_metrics(np.array([0.35, 0.15, 0.1, 0.2, 0.3, 0.4]), 2, fitb_negatives=3, ks=(1, 10))
    # AUC over all 2 x 4 pairs: 0.35 beats 1 negative (0.4), 0.15 beats 3 (0.2, 0.3, 0.4)
    assert m["auc"] == pytest.approx(4 / 8)
    # the best positive (0.15) has one negative ahead: rank 2
    assert m["hr@1"] == 0.0 and m["hr@10"] == 1.0
    assert m["mrr"] == pytest.approx(0.5)
    # the other positive does not push the best one down
    m2 = rank_metrics(np.array([0.05, 0.15, 0.1, 0.2]), 2)
    assert m2["hr@1"] == 1.0 and m2["mrr"] == 1.0


def test_rank_metrics_ties_count_half():
    # positive 0.1 tied with one negative, nothing ahead: rank 1 or 2 with equal chance
    m = rank_metrics(np.array([0.1, 0.1, 0.5, 0.6]), 1, fitb_negatives=3, ks=(1, 10))
    assert m["auc"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["hr@1"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["hr@10"] == 1.0
    assert m["fitb"] == pytest.approx(0.5)


def test_rank_metrics_all_tied_is_chance():
    # a scorer that cannot tell five candidates apart
    m = rank_metrics(np.zeros(5), 1, fitb_negatives=3, ks=(1, 2, 10))
    assert m["auc"] == pytest.approx(0.5)
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@2"] == pytest.approx(2 / 5)
    assert m["hr@10"] == 1.0
    assert m["mrr"] == pytest.approx(sum(1 / r for r in range(1, 6)) / 5)
    assert m["fitb"] == pytest.approx(1 / 4)


def test_rank_metrics_tie_behind_a_closer_negative():
    # one negative ahead, one tied: rank 2 or 3
    m = rank_metrics(np.array([0.3, 0.1, 0.3, 0.9]), 1, ks=(1, 2))
    assert m["hr@1"] == 0.0
    assert m["hr@2"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["auc"] == pytest.approx((0 + 0.5 + 1) / 3)


# --------------------------------------------------------------------------- build_candidates

SHOES = [f"S{i:02d}" for i in range(40)]
BAGS = [f"B{i:02d}" for i in range(40)]


def _dataset(queries=()):
    categories = {**{p: "shoes" for p in SHOES}, **{p: "bags" for p in BAGS}}
    scene_products = {
        "SC1": frozenset({"S00", "S01", "S02", "B00"}),  # S01/S02 at other boxes of the same scene
        "SC2": frozenset({"S03", "B01", "B02"}),
        "SC3": frozenset({"B03"}),
    }
    return Dataset(Path("/nonexistent"), categories, list(queries), scene_products, SkipReport())


def _q(scene, category, positives, bbox=(0.1, 0.1, 0.3, 0.3), negatives=None):
    return Query(scene, bbox, category, tuple(positives), (0.3, 0.0, 1.0, 1.0), negatives)


Q1 = _q("SC1", "shoes", ["S00"])
Q2 = _q("SC2", "bags", ["B01", "B02"])
Q3 = _q("SC3", "bags", ["B03"], bbox=(0.5, 0.5, 0.9, 0.9))


def test_build_candidates_positives_first_then_same_category_negatives():
    ds = _dataset([Q1, Q2, Q3])
    cfg = EvalConfig(num_negatives=10)
    c1, c2, c3 = build_candidates(ds, [Q1, Q2, Q3], cfg)
    assert c1.query == Q1 and c1.num_positives == 1 and c1.products[0] == "S00"
    assert c2.num_positives == 2 and c2.products[:2] == ("B01", "B02")
    for c in (c1, c2, c3):
        negatives = c.products[c.num_positives :]
        assert len(negatives) == 10
        assert len(set(negatives)) == 10
        assert all(ds.categories[p] == c.query.category for p in negatives)
        assert not set(negatives) & ds.scene_products[c.query.scene]  # no product of the scene, any box
        assert not set(negatives) & set(c.query.positives)


def test_build_candidates_per_query_determinism():
    ds = _dataset([Q1, Q2, Q3])
    cfg = EvalConfig(num_negatives=8, seed=4)
    together = {c.query: c.products for c in build_candidates(ds, [Q1, Q2, Q3], cfg)}
    alone = {q: build_candidates(ds, [q], cfg)[0].products for q in (Q1, Q2, Q3)}
    reversed_ = {c.query: c.products for c in build_candidates(ds, [Q3, Q2, Q1], cfg)}
    with_others = {c.query: c.products for c in build_candidates(ds, [_q("SC2", "shoes", ["S03"]), Q2, Q1, Q1], cfg)}
    assert together == alone == reversed_
    assert with_others[Q1] == together[Q1] and with_others[Q2] == together[Q2]
    other_seed = {c.query: c.products for c in build_candidates(ds, [Q1, Q2, Q3], EvalConfig(num_negatives=8, seed=5))}
    assert other_seed != together


def test_build_candidates_same_scene_other_box_gets_its_own_sample():
    ds = _dataset()
    cfg = EvalConfig(num_negatives=5)
    a = build_candidates(ds, [_q("SC1", "shoes", ["S00"], bbox=(0.1, 0.1, 0.3, 0.3))], cfg)[0]
    b = build_candidates(ds, [_q("SC1", "shoes", ["S00"], bbox=(0.5, 0.5, 0.7, 0.7))], cfg)[0]
    assert a.products != b.products


def test_build_candidates_respects_explicit_negatives():
    ds = _dataset()
    explicit = _q("SC1", "shoes", ["S00"], negatives=("S10", "S11", "S12"))
    (c,) = build_candidates(ds, [explicit], EvalConfig(num_negatives=99))
    assert c.products == ("S00", "S10", "S11", "S12")
    assert c.num_positives == 1


def test_build_candidates_capped_by_pool_and_drops_queries_without_negatives():
    categories = {"S0": "shoes", "S1": "shoes", "S2": "shoes", "H0": "hats"}
    ds = Dataset(Path("/x"), categories, [], {"SC1": frozenset({"S0", "H0"})}, SkipReport())
    shoes = _q("SC1", "shoes", ["S0"])
    hats = _q("SC1", "hats", ["H0"])  # the only hat is in the scene: nothing to rank against
    out = build_candidates(ds, [shoes, hats], EvalConfig(num_negatives=99))
    assert [c.query for c in out] == [shoes]
    assert sorted(out[0].products[1:]) == ["S1", "S2"]


# --------------------------------------------------------------------------- scorers and evaluate


def _many_queries(n):
    return [_q(f"X{i}", "shoes" if i % 2 else "bags", [SHOES[i % 40] if i % 2 else BAGS[i % 40]]) for i in range(n)]


def test_random_scorer_is_chance():
    ds = _dataset()
    cfg = EvalConfig(num_negatives=19)
    candidates = build_candidates(ds, _many_queries(600), cfg)
    assert all(len(c.products) == 20 for c in candidates)
    result = evaluate(random_scorer(0), candidates, set(), cfg)["overall"]
    assert result["count"] == 600
    assert result["auc"] == pytest.approx(0.5, abs=0.05)
    assert result["hr@1"] == pytest.approx(1 / 20, abs=0.03)
    assert result["hr@10"] == pytest.approx(10 / 20, abs=0.07)
    assert result["mrr"] == pytest.approx(sum(1 / r for r in range(1, 21)) / 20, abs=0.04)
    assert result["fitb"] == pytest.approx(1 / 4, abs=0.06)
    # the same seed gives the same scores
    again = evaluate(random_scorer(0), candidates, set(), cfg)["overall"]
    assert again == result


def test_popularity_scorer_ranks_by_training_counts():
    train = [_q("T1", "shoes", ["S05", "S06"]), _q("T2", "shoes", ["S05"]), _q("T3", "shoes", ["S05", "S07"]), _q("T4", "shoes", ["S06"])]
    # counts: S05 3, S06 2, S07 1, everything else 0
    score = popularity_scorer(train)
    candidates = [
        Candidates(_q("E1", "shoes", ["S06"]), ("S06", "S05", "S07", "S20"), 1),
        Candidates(_q("E2", "shoes", ["S05"]), ("S05", "S06", "S07", "S20"), 1),
        Candidates(_q("E3", "shoes", ["S30"]), ("S30", "S31", "S32", "S05"), 1),
    ]
    d1, d2, d3 = score(candidates)
    assert list(np.argsort(d1, kind="stable")) == [1, 0, 2, 3]  # S05, S06, S07, S20
    m1 = rank_metrics(np.asarray(d1, dtype=float), 1)
    assert m1["mrr"] == pytest.approx(0.5)  # S06 is second to S05
    assert rank_metrics(np.asarray(d2, dtype=float), 1)["hr@1"] == 1.0
    # an unseen positive ties with the unseen negatives and loses to the popular one
    m3 = rank_metrics(np.asarray(d3, dtype=float), 1)
    assert m3["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert m3["auc"] == pytest.approx((0.5 + 0.5 + 0) / 3)


def _fixed_scorer(distances_by_scene):
    def score(candidates):
        return [np.array(distances_by_scene[c.query.scene]) for c in candidates]

    return score


def test_evaluate_groups_overall_category_and_novelty():
    cfg = EvalConfig(fitb_negatives=3, hit_ks=(1, 10))
    candidates = [
        Candidates(_q("A", "shoes", ["S00"]), ("S00", "S10", "S11", "S12"), 1),  # seen; rank 1
        Candidates(_q("B", "shoes", ["S01", "S02"]), ("S01", "S02", "S10", "S11"), 2),  # S02 seen -> seen; rank 3
        Candidates(_q("C", "bags", ["B00"]), ("B00", "B10", "B11", "B12"), 1),  # new; rank 2
        Candidates(_q("D", "bags", ["B01"]), ("B01", "B10", "B11", "B12"), 1),  # new; rank 4
    ]
    scorer = _fixed_scorer(
        {
            "A": [0.1, 0.5, 0.6, 0.7],
            "B": [0.9, 0.8, 0.2, 0.3],
            "C": [0.4, 0.3, 0.6, 0.7],
            "D": [0.9, 0.1, 0.2, 0.3],
        }
    )
    result = evaluate(scorer, candidates, seen_products={"S00", "S02", "B99"}, cfg=cfg)
    assert set(result) == {"overall", "category:shoes", "category:bags", "novelty:seen", "novelty:new"}
    assert result["overall"]["count"] == 4
    assert result["category:shoes"]["count"] == 2 and result["category:bags"]["count"] == 2
    assert result["novelty:seen"]["count"] == 2 and result["novelty:new"]["count"] == 2
    # reciprocal ranks: A 1, B 1/3, C 1/2, D 1/4
    assert result["overall"]["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 4) / 4)
    assert result["category:shoes"]["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["category:bags"]["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert result["novelty:seen"]["hr@1"] == pytest.approx(0.5)
    assert result["novelty:new"]["hr@1"] == 0.0
    # AUC: A 1, B 0 (both positives behind both negatives), C 2/3, D 0
    assert result["overall"]["auc"] == pytest.approx((1 + 0 + 2 / 3 + 0) / 4)
    assert list(result["overall"]) == ["auc", "fitb", "hr@1", "hr@10", "mrr", "count"]


def test_evaluate_every_query_new_without_seen_products():
    candidates = build_candidates(_dataset(), [Q1, Q2, Q3], EvalConfig(num_negatives=5))
    result = evaluate(random_scorer(1), candidates, set(), EvalConfig(num_negatives=5))
    assert result["novelty:new"]["count"] == 3 and "novelty:seen" not in result


# --------------------------------------------------------------------------- summarize and markdown_table


def _run(auc, mrr, count=10):
    metrics = {"auc": auc, "fitb": 0.5, "hr@1": 0.2, "hr@10": 0.9, "mrr": mrr}
    return {"overall": {**metrics, "count": count}, "category:shoes": {**metrics, "count": count // 2}}


def test_summarize_mean_and_std():
    out = summarize([_run(0.6, 0.3), _run(0.8, 0.5), _run(0.7, 0.4)])
    assert set(out) == {"overall", "category:shoes"}
    mean, std = out["overall"]["auc"]
    assert mean == pytest.approx(0.7)
    values = [0.6, 0.8, 0.7]
    assert std == pytest.approx(np.std(values)) or std == pytest.approx(np.std(values, ddof=1))
    assert out["overall"]["fitb"] == (pytest.approx(0.5), pytest.approx(0.0))
    assert out["overall"]["count"] == 10
    assert out["category:shoes"]["count"] == 5
    single = summarize([_run(0.6, 0.3)])
    assert single["overall"]["auc"] == (pytest.approx(0.6), 0.0)


def test_markdown_table_rows_and_plus_minus():
    results = {
        "random": summarize([_run(0.5, 0.1)]),
        "ctl-full": summarize([_run(0.6, 0.3), _run(0.8, 0.5)]),
    }
    table = markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, one row per method
    assert "AUC" in lines[0] and "MRR" in lines[0] and "HR@10" in lines[0]
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|")
    random_row = next(line for line in lines if line.startswith("| random "))
    ctl_row = next(line for line in lines if line.startswith("| ctl-full "))
    assert "±" not in random_row
    assert "0.500" in random_row
    assert "±" in ctl_row
    assert "0.700 ± " in ctl_row  # mean AUC of 0.6 and 0.8
    assert ctl_row.rstrip().endswith("| 10 |")
    assert "±" not in lines[0]


def test_markdown_table_other_group_and_missing_group():
    results = {
        "a": summarize([_run(0.5, 0.1)]),
        "b": {"overall": summarize([_run(0.6, 0.2)])["overall"]},  # no category rows
    }
    table = markdown_table(results, group="category:shoes")
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("| a ") and lines[2].rstrip().endswith("| 5 |")
    assert lines[0] == "| method | AUC | FITB | HR@1 | HR@10 | MRR | queries |"
    assert markdown_table(results, group="category:bags") == "(no category:bags queries)"
