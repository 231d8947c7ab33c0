"""Frozen-feature probes: weighted kNN, a linear head with an LR grid, low-shot, effective rank.

- :func:`knn_accuracy`: the DINOv2/solo-learn protocol. Features are L2-normalised; each test
  sample's ``k`` most cosine-similar training samples vote for their class with weight
  ``exp(similarity / T)``, T = 0.07; the class with the largest total wins.
- :func:`linear_probe`: a linear classifier (multinomial logistic regression) on standardised
  frozen features (mean/std of the training split), trained full batch with L-BFGS to
  convergence for each weight decay of a small grid (the logistic-regression variant of
  DINOv2's protocol, which sweeps the regularisation: on cached features it converges in
  seconds on a CPU, where an SGD LR grid needs thousands of noisy steps); the best is picked
  on a held-out 10 % of the training split (lowest cross-entropy), refitted on the whole training split and scored
  on the test split.
- :func:`lowshot`: the same two probes with ``n`` labelled images per class (seeded draws).
- :func:`effective_rank`: RankMe, exp of the entropy of the normalised singular values of the
  centred feature matrix; a collapsed representation has a small one.

Accuracies are percentages. Everything runs on the CPU in float32 unless a device is given.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KNN_KS = (10, 20, 100)
KNN_TEMPERATURE = 0.07
LINEAR_WEIGHT_DECAYS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
LOWSHOT_SHOTS = (1, 5, 10)


def _as_tensor(array, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array)).to(dtype)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, *, ks=KNN_KS, temperature=KNN_TEMPERATURE,
                num_classes: int | None = None, chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Predicted labels of the test samples for each k (weighted cosine kNN, see module doc)."""
    train = F.normalize(_as_tensor(train_features), dim=1)
    test = F.normalize(_as_tensor(test_features), dim=1)
    labels = _as_tensor(train_labels, torch.long)
    classes = int(num_classes or int(labels.max()) + 1)
    ks = [min(int(k), len(train)) for k in ks]
    top = max(ks)
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), chunk):
        similarity, index = (test[start:start + chunk] @ train.t()).topk(top, dim=1)
        weights = (similarity / temperature).exp()
        neighbour_labels = labels[index]
        for k in ks:
            votes = torch.zeros(len(index), classes)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(p) for k, p in predictions.items()}


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, ks=KNN_KS,
                 temperature=KNN_TEMPERATURE, num_classes: int | None = None) -> dict[str, float]:
    """``{"k10": acc, "k20": acc, ...}`` in percent."""
    truth = _as_tensor(test_labels, torch.long)
    predicted = knn_predict(train_features, train_labels, test_features, ks=ks, temperature=temperature,
                            num_classes=num_classes)
    return {f"k{k}": 100.0 * float((p == truth).float().mean()) for k, p in predicted.items()}


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, *,
               init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head (weight (D, C), bias (C,)) minimising mean cross-entropy + wd/2 |W|^2,
    full batch with L-BFGS (strong Wolfe line search) to convergence."""
    weight = (init[0].clone() if init else torch.zeros(features.shape[1], num_classes)).requires_grad_(True)
    bias = (init[1].clone() if init else torch.zeros(num_classes)).requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(head: tuple[torch.Tensor, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float(((features @ head[0] + head[1]).argmax(1) == labels).float().mean())


def linear_probe(train_features, train_labels, test_features, test_labels, *, weight_decays=LINEAR_WEIGHT_DECAYS,
                 val_fraction: float = 0.1, seed: int = 0, num_classes: int | None = None) -> dict:
    """Linear probe with the weight decay chosen on a held-out ``val_fraction`` of the training split."""
    x_train, y_train = _as_tensor(train_features), _as_tensor(train_labels, torch.long)
    x_test, y_test = _as_tensor(test_features), _as_tensor(test_labels, torch.long)
    classes = int(num_classes or int(max(y_train.max(), y_test.max())) + 1)
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * len(x_train))))
    fit, val = perm[n_val:], perm[:n_val]
    x_fit, x_val = _standardise(x_train[fit], x_train[val])
    grid, head = [], None
    for wd in sorted(weight_decays, reverse=True):  # strongest first; each warm-starts the next
        head = fit_linear(x_fit, y_train[fit], classes, wd, init=head)
        val_loss = float(F.cross_entropy(x_val @ head[0] + head[1], y_train[val]))
        grid.append({"weight_decay": wd, "val_loss": val_loss, "val_accuracy": _accuracy(head, x_val, y_train[val])})
    best = min(grid, key=lambda g: g["val_loss"])  # the loss: far less noisy than a small held-out accuracy
    x_all, x_test_std = _standardise(x_train, x_test)
    head = fit_linear(x_all, y_train, classes, best["weight_decay"])
    return {"accuracy": _accuracy(head, x_test_std, y_test), "weight_decay": best["weight_decay"],
            "val_accuracy": best["val_accuracy"], "grid": grid}


def lowshot(train_features, train_labels, test_features, test_labels, *, shots=LOWSHOT_SHOTS, repeats: int = 3,
            weight_decay: float = 1e-2, seed: int = 0, num_classes: int | None = None) -> dict:
    """Mean test accuracy over ``repeats`` seeded draws of ``n`` labelled images per class.

    Too few images to hold any out: the linear head uses a fixed ``weight_decay`` and kNN uses
    k = min(20, labelled images).
    """
    x_train, y_train = _as_tensor(train_features), _as_tensor(train_labels, torch.long)
    x_test, y_test = _as_tensor(test_features), _as_tensor(test_labels, torch.long)
    classes = int(num_classes or int(max(y_train.max(), y_test.max())) + 1)
    results = {}
    for n in shots:
        linear, knn = [], []
        for repeat in range(repeats):
            rng = np.random.default_rng([seed, n, repeat])
            picked = []
            for c in range(classes):
                members = np.flatnonzero(y_train.numpy() == c)
                if len(members):
                    picked.extend(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
            index = torch.tensor(sorted(picked))
            x_fit, x_eval = _standardise(x_train[index], x_test)
            head = fit_linear(x_fit, y_train[index], classes, weight_decay)
            linear.append(_accuracy(head, x_eval, y_test))
            k = min(20, len(index))
            knn.append(knn_accuracy(x_train[index], y_train[index], x_test, y_test, ks=(k,), num_classes=classes)[f"k{k}"])
        results[f"{n}-shot"] = {"linear": float(np.mean(linear)), "knn": float(np.mean(knn)), "repeats": repeats}
    return results


@torch.no_grad()
def effective_rank_tensor(x: torch.Tensor) -> torch.Tensor:
    """RankMe of an (N, D) tensor, as a 0-dim float64 tensor on its device (no host sync: the
    training monitor reads it later with its other numbers)."""
    x = x.detach().double()
    x = x - x.mean(0, keepdim=True)
    singular = torch.linalg.svdvals(x)
    p = singular / singular.sum().clamp_min(1e-12)
    return torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0 log 0 = 0, without a data-dependent mask


def effective_rank(features) -> float:
    """RankMe: exp(entropy of s / sum(s)) for the singular values s of the centred features."""
    return float(effective_rank_tensor(_as_tensor(features)))


def logistic_regression_cv(train_features, train_labels, test_features, test_labels, *,
                           cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), folds: int = 5, seed: int = 0) -> dict:
    """A second linear probe, independent of :func:`linear_probe`'s code: scikit-learn's
    ``LogisticRegression`` (L-BFGS, multinomial) on standardised features with the inverse
    regularisation ``C`` chosen by stratified ``folds``-fold cross-validation (accuracy), refitted
    on the whole training split. Needs scikit-learn (the ``dev`` extra)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    search = GridSearchCV(model, {"logisticregression__C": list(cs)}, scoring="accuracy",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed), refit=True)
    search.fit(np.asarray(train_features, dtype=np.float64), np.asarray(train_labels))
    accuracy = 100.0 * search.score(np.asarray(test_features, dtype=np.float64), np.asarray(test_labels))
    return {"accuracy": float(accuracy), "C": float(search.best_params_["logisticregression__C"]),
            "cv_accuracy": 100.0 * float(search.best_score_)}
