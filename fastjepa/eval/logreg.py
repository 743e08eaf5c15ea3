"""Extreme low-shot logistic regression on frozen features, as MSN and MIM-Refiner evaluate 1, 2
and 5 images per class and 1% of ImageNet.

With a handful of images per class there is nothing to hold out, so there is no grid and no
selection: one multinomial logistic regression with a fixed, very weak L2 penalty (MSN's
``lambd = 0.00025 / N``) on centred, L2-normalised features, solved to a gradient tolerance.
``sklearn_logreg_top1`` solves the same objective with scikit-learn, as a CPU check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastjepa.eval.results import ProbeResult

__all__ = ["DEFAULT_LAMBDA", "logreg_probe", "sklearn_logreg_top1"]

DEFAULT_LAMBDA = 0.00025  # MSN's L2 strength, divided by the number of training images
HISTORY = 100  # L-BFGS memory (torch's default): far fewer iterations than 10-20 on these ill-conditioned problems
# Stop when every gradient entry is below this. On the tests' digits features float64 then ends within
# 1e-7 relative of scikit-learn's minimum. Float32 (the GPU) reaches 1e-6 or stalls near it (then
# stops when the loss no longer changes): 6e-5 relative there, where 1e-5 left up to 16%.
GRADIENT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-6}
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check(train, train_labels, val, val_labels, num_classes: int | None) -> None:
    for name, features in (("train", train), ("val", val)):
        if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.dim() != 2:
            described = f"{tuple(features.shape)} {features.dtype}" if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{name} must be a float (N, D) tensor, got {described}")
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"train has {train.shape[1]} feature dimensions, val {val.shape[1]}")
    for name, labels, features in (("train_labels", train_labels, train), ("val_labels", val_labels, val)):
        if not isinstance(labels, torch.Tensor) or labels.dtype not in INT_DTYPES:
            raise ValueError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != (len(features),):
            raise ValueError(f"{name} must have shape ({len(features)},), one label per feature row, got {tuple(labels.shape)}")
        if len(labels) == 0:
            raise ValueError(f"{name} is empty")
        if int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes):
            bound = f"[0, num_classes={num_classes})" if num_classes is not None else "[0, ...)"
            raise ValueError(f"{name} must lie in {bound}, got values from {int(labels.min())} to {int(labels.max())}")


def _default_lambd(lambd: float | None, n: int) -> float:
    if lambd is None:
        return DEFAULT_LAMBDA / n
    if not isinstance(lambd, (int, float)) or not lambd > 0:
        raise ValueError(f"lambd must be a number > 0, got {lambd!r}")
    return float(lambd)


def _preprocess(train: torch.Tensor, val: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both centred by the train mean, then each row L2-normalised (MSN's, through cyanure)."""
    train, val = train.to(dtype), val.to(dtype)
    mean = train.mean(dim=0)
    return F.normalize(train - mean, dim=1), F.normalize(val - mean, dim=1)


def _objective(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, lambd: float) -> torch.Tensor:
    """Mean multinomial cross-entropy + (lambd / 2) ||W||^2, no intercept."""
    return F.cross_entropy(features @ weight, labels) + 0.5 * lambd * weight.pow(2).sum()


def logreg_probe(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, *, num_classes: int,
                 lambd: float | None = None, max_iter: int = 2000, device: torch.device | str | None = None) -> ProbeResult:
    """Val top-1 of a multinomial logistic regression on frozen (N, D) features.

    Features are centred by the train mean and L2-normalised per row (val with the train mean);
    the objective is mean cross-entropy + (lambd / 2) ||W||^2 with no intercept, ``lambd``
    0.00025 / N by default. Solved full-batch on ``device`` (default: the train features') with
    L-BFGS and a strong-Wolfe line search, from zero, until every gradient entry is below the
    tolerance (1e-8 in float64 on the CPU, 1e-6 in float32 elsewhere), the loss stops changing,
    or ``max_iter`` iterations. Convex with a unique minimum, so deterministic; ``protocol`` says
    why it stopped (``converged`` is False only when the iteration budget ran out).
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    _check(train, train_labels, val, val_labels, num_classes)
    n = len(train)
    lambd_rule = f"{DEFAULT_LAMBDA} / N" if lambd is None else "given"
    lambd = _default_lambd(lambd, n)
    device = torch.device(device) if device is not None else train.device
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x_train, x_val = _preprocess(train.to(device), val.to(device), dtype)
    y_train, y_val = train_labels.to(device, torch.int64), val_labels.to(device, torch.int64)

    weight = torch.zeros(train.shape[1], num_classes, dtype=dtype, device=device, requires_grad=True)
    tolerance = GRADIENT_TOLERANCE[dtype]
    solver = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tolerance,
                               tolerance_change=torch.finfo(dtype).eps, history_size=HISTORY, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = _objective(weight, x_train, y_train, lambd)
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
        objective = _objective(weight, x_train, y_train, lambd)
        max_gradient = float(torch.autograd.grad(objective, weight)[0].abs().max())
    objective = float(objective.detach())
    with torch.no_grad():
        top1 = float((torch.argmax(x_val @ weight, dim=1) == y_val).double().mean())
    state = solver.state[weight]
    iterations, evaluations = state.get("n_iter", 0), state.get("func_evals", 0)
    if max_gradient <= tolerance:
        stopped_by = "gradient tolerance"
    elif iterations >= max_iter or evaluations >= solver.defaults["max_eval"]:
        stopped_by = "max_iter"
    else:
        stopped_by = f"no further progress in {str(dtype).removeprefix('torch.')}"
    protocol = {
        "lambd": lambd,
        "lambd_rule": lambd_rule,
        "n_train": n,
        "preprocessing": "centred by the train mean, rows L2-normalised",
        "objective_form": "mean cross-entropy + lambd / 2 * ||W||^2, no intercept",
        "solver": f"torch L-BFGS, strong Wolfe, history {HISTORY}, full batch, from zero, {str(dtype).removeprefix('torch.')} on {device.type}",
        "iterations": iterations,
        "function_evaluations": evaluations,
        "gradient_tolerance": tolerance,
        "max_gradient": max_gradient,
        "stopped_by": stopped_by,
        "converged": stopped_by != "max_iter",
        "objective": objective,
    }
    head = {"lambd": lambd, "heldout_top1": None}
    return ProbeResult(method="logreg", top1=top1, chosen=head, heads=[{**head, "val_top1": top1}], n_train=n, n_val=len(val), classes=num_classes,
                       protocol=protocol)


def _sklearn_fit(train: torch.Tensor, train_labels: torch.Tensor, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's solution of logreg_probe's objective on preprocessed float64 ``train``:
    ``(weight, classes)``, the (D, K) weight in logreg_probe's parametrisation for the K classes
    present in ``train_labels`` (column k is class ``classes[k]``).

    LogisticRegression minimises C * sum(loss) + ||W||^2 / 2, which is N * C times the mean loss +
    lambd / 2 ||W||^2 for C = 1 / (lambd * N). With two classes it fits one vector w = W_1 - W_0;
    the multinomial minimum has W_1 = -W_0 = w / 2, so its penalty is lambd / 4 ||w||^2: C doubles."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    n = len(train)
    binary = len(train_labels.unique()) == 2
    model = LogisticRegression(C=(2.0 if binary else 1.0) / (lambd * n), fit_intercept=False, solver="lbfgs", tol=1e-8, max_iter=10_000)
    # One BLAS thread: these problems are small, and OpenBLAS's threads beside torch's OpenMP ones ran 40x slower here.
    with threadpool_limits(1, user_api="blas"):
        model.fit(train.numpy(), train_labels.numpy())
    coef = torch.from_numpy(model.coef_).T
    return (torch.cat([-coef / 2, coef / 2], dim=1) if binary else coef), torch.from_numpy(model.classes_)


def sklearn_logreg_top1(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, *, lambd: float | None = None) -> float:
    """Val top-1 of scikit-learn's LogisticRegression on logreg_probe's objective and features
    (lbfgs, no intercept, C = 1 / (lambd * N), tolerance 1e-8): a CPU check of ``logreg_probe``."""
    _check(train, train_labels, val, val_labels, None)
    lambd = _default_lambd(lambd, len(train))
    x_train, x_val = _preprocess(train.cpu(), val.cpu(), torch.float64)
    weight, classes = _sklearn_fit(x_train, train_labels.cpu().to(torch.int64), lambd)
    predictions = classes[torch.argmax(x_val @ weight, dim=1)]
    return float((predictions == val_labels.cpu()).double().mean())
