import pytest
import torch
import torch.nn.functional as F

from ctl.config import VARIANTS, ModelConfig
from ctl.model import CategoryEmbedding, CompleteTheLook, EmbeddingMLP, hinge_loss

CATEGORIES = ["bags", "hats", "shoes"]
GLOBAL_DIM, LOCAL_DIM, N, D = 12, 10, 6, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: extra threads only add contention on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unit(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5)


# --------------------------------------------------------------------------- EmbeddingMLP


def test_mlp_flat_input():
    torch.manual_seed(0)
    mlp = EmbeddingMLP(12, 16, 8, dropout=0.3)
    out = mlp(torch.randn(5, 12))
    assert out.shape == (5, 8)
    assert _unit(out)
    mlp.eval()
    assert _unit(mlp(torch.randn(1, 12)))


def test_mlp_shared_over_locations():
    torch.manual_seed(0)
    mlp = EmbeddingMLP(12, 16, 8, dropout=0.3).eval()
    x = torch.randn(3, 4, 12)
    out = mlp(x)
    assert out.shape == (3, 4, 8)
    assert _unit(out)
    assert torch.allclose(out, mlp(x.reshape(12, 12)).reshape(3, 4, 8), atol=1e-6)
    same = torch.randn(12).expand(2, 4, 12)
    y = mlp(same)
    assert torch.allclose(y, y[0, 0].expand_as(y), atol=1e-6)  # one set of weights everywhere


def test_mlp_per_location_has_its_own_weights():
    torch.manual_seed(0)
    mlp = EmbeddingMLP(12, 16, 8, dropout=0.3, locations=4)
    assert mlp.w1.shape == (4, 12, 16) and mlp.w2.shape == (4, 16, 8)
    out = mlp(torch.randn(3, 4, 12))
    assert out.shape == (3, 4, 8) and _unit(out)

    mlp.eval()
    x = torch.randn(12).expand(2, 4, 12).contiguous()  # the same vector at every location
    before = mlp(x)
    assert before.shape == (2, 4, 8) and _unit(before)
    assert not torch.allclose(before[:, 0], before[:, 1], atol=1e-3)  # different weights, different outputs
    with torch.no_grad():
        mlp.w1[0] += 0.5 * torch.randn_like(mlp.w1[0])
    after = mlp(x)
    assert not torch.allclose(after[:, 0], before[:, 0], atol=1e-4)
    assert torch.allclose(after[:, 1:], before[:, 1:], atol=1e-6)


def test_mlp_per_location_each_location_sees_only_its_input():
    torch.manual_seed(1)
    mlp = EmbeddingMLP(12, 16, 8, dropout=0.0, locations=4).eval()
    x = torch.randn(2, 4, 12)
    before = mlp(x)
    x2 = x.clone()
    x2[:, 2] += 1.0
    after = mlp(x2)
    assert not torch.allclose(after[:, 2], before[:, 2], atol=1e-4)
    assert torch.allclose(after[:, [0, 1, 3]], before[:, [0, 1, 3]], atol=1e-6)


# --------------------------------------------------------------------------- CategoryEmbedding


def test_category_embedding_shapes_agree():
    torch.manual_seed(0)
    emb = CategoryEmbedding(CATEGORIES, D)
    single = emb(1)
    assert single.shape == (D,) and _unit(single)
    assert torch.allclose(emb(torch.tensor(1)), single)
    flat = emb(torch.tensor([2, 1, 0]))
    column = emb(torch.tensor([[2], [1], [0]]))
    assert flat.shape == column.shape == (3, D)
    assert _unit(flat)
    assert torch.allclose(flat, column)
    assert torch.allclose(flat[1], single)
    assert not torch.allclose(flat[0], flat[1])


def test_category_embedding_lookup_by_name():
    emb = CategoryEmbedding(CATEGORIES, D)
    assert int(emb.index("shoes")) == 2
    assert emb.index(["hats", "bags"]).tolist() == [1, 0]
    assert torch.allclose(emb(emb.index("hats")), emb(1))
    with pytest.raises(KeyError) as err:
        emb.index("sunglasses")
    message = str(err.value)
    assert "sunglasses" in message
    assert all(name in message for name in CATEGORIES)
    with pytest.raises(KeyError, match="belts"):
        emb.index(["bags", "belts"])


@pytest.mark.parametrize("bad", [3, -1, [0, 5], [[1], [3]]])
def test_category_embedding_out_of_range(bad):
    emb = CategoryEmbedding(CATEGORIES, D)
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor(bad))


def test_category_embedding_rejects_other_shapes():
    emb = CategoryEmbedding(CATEGORIES, D)
    with pytest.raises(ValueError, match="shape"):
        emb(torch.zeros(2, 2, dtype=torch.long))


# --------------------------------------------------------------------------- CompleteTheLook


def _model(variant="full", per_location=False, dropout=0.3, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(variant=variant, embed_dim=D, hidden_dim=16, dropout=dropout, per_location=per_location)
    return CompleteTheLook(cfg, GLOBAL_DIM, LOCAL_DIM, N, CATEGORIES)


def _inputs(batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, GLOBAL_DIM, generator=g),
        torch.randn(batch, N, LOCAL_DIM, generator=g),
        torch.randint(0, len(CATEGORIES), (batch,), generator=g),
        torch.randn(batch, GLOBAL_DIM, generator=g),
    )


@pytest.mark.parametrize("per_location", [False, True])
def test_attention_sums_to_one_and_depends_on_category(per_location):
    model = _model("full", per_location).eval()
    sg, sl, _, _ = _inputs()
    scene = model.embed_scenes(sg, sl)
    assert scene.global_.shape == (5, D) and scene.local.shape == (5, N, D) and scene.keys.shape == (5, N, D)
    by_category = [model.attention(scene, torch.full((5,), c)) for c in range(len(CATEGORIES))]
    for a in by_category:
        assert a.shape == (5, N)
        assert (a >= 0).all()
        assert torch.allclose(a.sum(1), torch.ones(5), atol=1e-6)
    assert not torch.allclose(by_category[0], by_category[1], atol=1e-4)
    # a_i = softmax_i(-||k_i - e_c||^2), by hand
    e_c = F.normalize(model.category.weight[1], dim=0)
    expected = torch.softmax(-((scene.keys - e_c) ** 2).sum(-1), dim=1)
    assert torch.allclose(by_category[1], expected, atol=1e-6)


def test_attention_uniform_without_category():
    model = _model("full-no-category").eval()
    sg, sl, cat, _ = _inputs()
    a = model.attention(model.embed_scenes(sg, sl), cat)
    assert torch.allclose(a, torch.full((5, N), 1.0 / N))
    assert torch.allclose(a, model.attention(model.embed_scenes(sg, sl), (cat + 1) % len(CATEGORIES)))


def _distance_by_hand(model, sg, sl, cat, pg):
    f_s = model.global_g(sg)
    f_i = model.local_g(sl)
    k_i = model.key_g(sl)
    f_p = model.global_g(pg)
    if model.variant == "full-no-category":
        a = torch.full((sg.shape[0], N), 1.0 / N)
    else:
        e_c = F.normalize(model.category.weight[cat], dim=-1)
        a = torch.softmax(-((k_i - e_c[:, None]) ** 2).sum(-1), dim=1)
    d_g = ((f_s - f_p) ** 2).sum(-1)
    d_l = (a * ((f_i - f_p[:, None]) ** 2).sum(-1)).sum(-1)
    return {"global": d_g, "local": d_l, "full": (d_g + d_l) / 2, "full-no-category": (d_g + d_l) / 2}[model.variant]


@pytest.mark.parametrize("per_location", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_distance_matches_the_definition(variant, per_location):
    model = _model(variant, per_location).eval()
    sg, sl, cat, pg = _inputs()
    with torch.no_grad():
        expected = _distance_by_hand(model, sg, sl, cat, pg)
        d = model(sg, sl, cat, pg)
        q = model.query(model.embed_scenes(sg, sl), cat)
        d2 = model.distance(q, model.embed_products(pg))
    assert d.shape == (5,)
    assert torch.allclose(d, expected, atol=1e-5)
    assert torch.allclose(d2, expected, atol=1e-5)
    assert (d >= -1e-6).all()


@pytest.mark.parametrize("per_location", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_distance_matrix_matches_distance(variant, per_location):
    model = _model(variant, per_location).eval()
    sg, sl, cat, _ = _inputs(batch=4)
    with torch.no_grad():
        products = model.embed_products(torch.randn(7, GLOBAL_DIM))
        q = model.query(model.embed_scenes(sg, sl), cat)
        matrix = model.distance_matrix(q, products)
        assert matrix.shape == (4, 7)
        for b in range(4):
            row = model.distance(q[b].expand(7, D), products)
            assert torch.allclose(matrix[b], row, atol=1e-5)


def test_distance_matrix_by_hand_for_every_pair():
    model = _model("full").eval()
    sg, sl, cat, _ = _inputs(batch=3)
    pg = torch.randn(4, GLOBAL_DIM)
    with torch.no_grad():
        matrix = model.distance_matrix(model.query(model.embed_scenes(sg, sl), cat), model.embed_products(pg))
        for b in range(3):
            for m in range(4):
                expected = _distance_by_hand(model, sg[b : b + 1], sl[b : b + 1], cat[b : b + 1], pg[m : m + 1])
                assert matrix[b, m] == pytest.approx(float(expected[0]), abs=1e-5)


def test_category_changes_distance_only_for_category_variants():
    sg, sl, cat, pg = _inputs()
    other = (cat + 1) % len(CATEGORIES)
    with torch.no_grad():
        for variant, should_change in [("full", True), ("local", True), ("global", False), ("full-no-category", False)]:
            model = _model(variant).eval()
            changed = not torch.allclose(model(sg, sl, cat, pg), model(sg, sl, other, pg), atol=1e-6)
            assert changed == should_change, variant


def test_per_location_builds_per_location_heads():
    shared, per_loc = _model("full", False), _model("full", True)
    assert shared.local_g.w1.shape[0] == 1 and shared.key_g.w1.shape[0] == 1
    assert per_loc.local_g.w1.shape[0] == N and per_loc.key_g.w1.shape[0] == N
    assert per_loc.global_g.w1.shape[0] == 1  # the global head is shared by scenes and products


def test_hinge_loss_by_hand():
    d_pos = torch.tensor([0.1, 0.5, 0.9])
    d_neg = torch.tensor([0.5, 0.4, 0.2])
    # relu(0.1 - 0.5 + 0.2) = 0, relu(0.5 - 0.4 + 0.2) = 0.3, relu(0.9 - 0.2 + 0.2) = 0.9
    assert float(hinge_loss(d_pos, d_neg, 0.2)) == pytest.approx(0.4)
    assert float(hinge_loss(d_pos, d_neg, 0.0)) == pytest.approx((0.1 + 0.7) / 3)
    assert float(hinge_loss(torch.zeros(4), torch.ones(4), 0.5)) == 0.0


@pytest.mark.parametrize("variant, per_location", [("full", False), ("full", True), ("global", False)])
def test_a_few_adam_steps_reduce_the_loss(variant, per_location):
    """Toy problem: a scene's product is a fixed nonlinear function of the scene; its negative is
    another scene's product, so only a model that relates the two can separate them."""
    model = _model(variant, per_location, dropout=0.1, seed=2)
    g = torch.Generator().manual_seed(3)
    batch = 64
    sg = torch.randn(batch, GLOBAL_DIM, generator=g)
    sl = sg[:, None, :LOCAL_DIM] + 0.5 * torch.randn(batch, N, LOCAL_DIM, generator=g)
    cat = torch.randint(0, len(CATEGORIES), (batch,), generator=g)
    mix = torch.randn(GLOBAL_DIM, GLOBAL_DIM, generator=g)
    pos = torch.tanh(sg @ mix) + 0.1 * torch.randn(batch, GLOBAL_DIM, generator=g)
    neg = pos.roll(1, dims=0)

    def loss_eval():
        model.eval()
        with torch.no_grad():
            return float(hinge_loss(model(sg, sl, cat, pos), model(sg, sl, cat, neg), 0.2))

    start = loss_eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        model.train()
        loss = hinge_loss(model(sg, sl, cat, pos), model(sg, sl, cat, neg), 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = loss_eval()
    assert start > 0.05
    assert end < 0.5 * start
