"""fastjepa.eval.knn: the weighted kNN vote against a brute-force oracle, the choice of k on
held-out train (never on val), accuracy at the extremes and the argument checks."""

import pytest
import torch
import torch.nn.functional as F

from fastjepa.eval import knn
from fastjepa.eval.knn import knn_predict, knn_probe


def brute_force(bank, bank_labels, queries, num_classes, ks, temperature):
    """One query and one k at a time, in float64, from the full similarity matrix."""
    similarity = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    predictions = {}
    for k in ks:
        predicted = []
        for row in similarity:
            nearest = row.argsort(descending=True)[: min(k, len(bank))]
            votes = torch.zeros(num_classes, dtype=torch.float64)
            for j in nearest.tolist():
                votes[bank_labels[j]] += torch.exp(row[j] / temperature)
            predicted.append(int(votes.argmax()))
        predictions[k] = torch.tensor(predicted)
    return predictions


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_equals_brute_force_across_chunks_and_k_beyond_the_bank(monkeypatch, temperature):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(120, 16, generator=generator), torch.randn(45, 16, generator=generator)
    bank_labels = torch.randint(0, 6, (120,), generator=generator)
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", 7 * 120)  # 7 queries per chunk: 7 chunks, the last partial
    ks = (1, 3, 10, 50, 500)  # 500 > the bank: all of it
    predicted = knn_predict(bank, bank_labels, queries, num_classes=6, ks=ks, temperature=temperature)
    expected = brute_force(bank, bank_labels, queries, 6, ks, temperature)
    assert sorted(predicted) == list(ks)
    for k in ks:
        assert predicted[k].dtype == torch.int64 and torch.equal(predicted[k], expected[k]), k
    assert not torch.equal(predicted[1], predicted[500])  # the ks really differ on this data


def test_votes_favour_nearer_neighbours():
    # One class-0 neighbour right at the query and two class-1 neighbours further away:
    # a sharp temperature follows the nearest, a flat one the majority.
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert int(knn_predict(bank, labels, query, num_classes=2, ks=(3,), temperature=0.07)[3]) == 0
    assert int(knn_predict(bank, labels, query, num_classes=2, ks=(3,), temperature=100.0)[3]) == 1


def islands(seed: int = 0):
    """Class 0 spread over a sphere and class 1 in five tight islands of 20 on it (train); val is
    class-0 points sitting on the islands. Held-out train is best read with a small k (an island
    point's neighbours are its island), val with a large one (the islands' surroundings are 0)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(5, 3, generator=generator), dim=1)
    spread = torch.randn(300, 3, generator=generator)
    island = centres.repeat_interleave(20, dim=0) + 0.01 * torch.randn(100, 3, generator=generator)
    train = torch.cat([spread, island])
    train_labels = torch.cat([torch.zeros(300, dtype=torch.int64), torch.ones(100, dtype=torch.int64)])
    val = centres.repeat_interleave(10, dim=0) + 0.01 * torch.randn(50, 3, generator=generator)
    return train, train_labels, val, torch.zeros(50, dtype=torch.int64)


def test_k_is_chosen_on_heldout_train_never_on_val():
    train, train_labels, val, val_labels = islands()
    result = knn_probe(train, train_labels, val, val_labels, num_classes=2, temperature=10.0)
    heldout = {head["k"]: head["heldout_top1"] for head in result.heads}
    on_val = {head["k"]: head["val_top1"] for head in result.heads}
    assert [head["k"] for head in result.heads] == [10, 20, 100, 200]
    best_heldout = max(heldout.values())
    assert result.chosen["k"] == min(k for k, top1 in heldout.items() if top1 == best_heldout)  # ties: the smaller k
    assert max(on_val, key=on_val.get) == 200 and on_val[200] == 1.0  # val would have chosen otherwise
    assert result.chosen["k"] <= 20 and result.top1 == on_val[result.chosen["k"]] < 0.1
    assert result.n_train == result.protocol["bank"] == 400 and result.n_val == 50
    assert result.protocol["fit_bank"] + result.protocol["heldout"] == 400 and result.protocol["temperature"] == 10.0

    sharp = knn_probe(train, train_labels, val, val_labels, num_classes=2, temperature=0.07)
    assert len({head["heldout_top1"] for head in sharp.heads}) == 1 and sharp.chosen["k"] == 10  # a tie: the smallest k


def clusters(n: int, labels: torch.Tensor, seed: int) -> torch.Tensor:
    centres = 5 * torch.randn(10, 32, generator=torch.Generator().manual_seed(99))
    return centres[labels] + torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def test_separable_clusters_are_perfect_and_random_labels_are_chance():
    generator = torch.Generator().manual_seed(1)
    train_labels, val_labels = torch.randint(0, 10, (1000,), generator=generator), torch.randint(0, 10, (2000,), generator=generator)
    train, val = clusters(1000, train_labels, 2), clusters(2000, val_labels, 3)
    result = knn_probe(train, train_labels, val, val_labels, num_classes=10)
    assert result.method == "knn" and result.classes == 10
    assert result.top1 > 0.99 and all(head["heldout_top1"] > 0.99 for head in result.heads)

    shuffled = knn_probe(train, train_labels, val, torch.randint(0, 10, (2000,), generator=generator), num_classes=10)
    assert abs(shuffled.top1 - 0.1) < 0.03 and all(abs(head["val_top1"] - 0.1) < 0.03 for head in shuffled.heads)


def test_device_and_dtypes_do_not_change_the_votes():
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 10, (300,), generator=generator)
    features = clusters(300, labels, 5)
    base = knn_probe(features, labels, features[:50], labels[:50], num_classes=10, seed=3)
    again = knn_probe(features.double(), labels.int(), features[:50], labels[:50].short(), num_classes=10, seed=3, device="cpu")
    assert base.to_dict() == again.to_dict()


def check_raises(match: str, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        knn_probe(*args, **kwargs)


def test_bad_inputs_name_the_argument():
    features, labels = torch.randn(40, 8), torch.arange(40) % 4
    good = dict(num_classes=4)
    check_raises("train features have 8 dimensions, val features 7", features, labels, torch.randn(10, 7), labels[:10], **good)
    check_raises("train labels must be 1-D", features, labels[:30], features, labels, **good)
    check_raises("train features must be 2-D", features[:, :, None], labels, features, labels, **good)
    check_raises("every k in ks", features, labels, features, labels, ks=(10, 0), **good)
    check_raises("ks must be a non-empty", features, labels, features, labels, ks=(), **good)
    check_raises("temperature must be > 0", features, labels, features, labels, temperature=0.0, **good)
    check_raises("temperature must be > 0", features, labels, features, labels, temperature=-1.0, **good)
    check_raises("train labels must be integers", features, labels.float(), features, labels, **good)
    check_raises(r"val labels must lie in \[0, num_classes=4\)", features, labels, features, labels + 1, **good)
    check_raises("train labels must lie", features, labels - 1, features, labels, **good)
    check_raises("num_classes must be an int", features, labels, features, labels, num_classes=0)
    check_raises("holdout fraction", features, labels, features, labels, holdout=1.5, **good)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        knn_predict(features, labels, torch.randn(3, 9), num_classes=4, ks=(1,), temperature=0.07)
