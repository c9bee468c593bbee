"""Temperature scaling (Guo et al., 2017): probabilities a log loss can trust.

A network trained to high accuracy is over-confident: its rare mistakes come with
probabilities near 0 or 1, which Kaggle's log loss punishes without bound. Dividing
the logits by one number T > 1, fitted on the validation split after training, softens
them without changing a single prediction. train fits T for the checkpoint --select
names and saves it in that file; the model applies it in every later forward pass
(models/basic_module.py), so val, test, predict and the ONNX export all use it.
"""
import torch
from torch.nn import functional as F

from utils import checkpoint, distributed

T_RANGE = (0.05, 20.0)


def log_loss(logits, targets, temperature=1.0):
    return F.cross_entropy(logits / temperature, targets).item()


def fit_temperature(logits, targets):
    """The T in T_RANGE that minimises the log loss of logits / T (a convex problem in
    log T; L-BFGS solves it in a few steps)."""
    log_t = torch.zeros(1, requires_grad=True)
    solver = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn='strong_wolfe')

    def closure():
        solver.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss
    with torch.enable_grad():
        solver.step(closure)
    return float(log_t.detach().exp().clamp(*T_RANGE))


def cross_fitted_log_loss(logits, targets):
    """The log loss after scaling, with T fitted on one half of the images (alternate
    ones) and scored on the other, both ways: what T is worth on images it never saw."""
    total = 0.0
    for fit_on, score_on in ((0, 1), (1, 0)):
        t = fit_temperature(logits[fit_on::2], targets[fit_on::2])
        total += log_loss(logits[score_on::2], targets[score_on::2], t) * len(targets[score_on::2])
    return total / len(targets)


def calibrate(model, path, batches):
    """Fit T on `batches` ([(logits, targets)] of the validation split, every rank's),
    set it on the model and write it into the checkpoint at `path` (rank 0). Returns
    (T, log loss before, after, cross-fitted)."""
    rows = distributed.gather_to_main([(s, t) for scores, targets in batches
                                       for s, t in zip(scores.tolist(), targets.tolist())])
    if not distributed.is_main() or len(rows) < 4:
        return None
    logits = torch.tensor([s for s, _ in rows], dtype=torch.float64)
    targets = torch.tensor([t for _, t in rows])
    t = fit_temperature(logits, targets)
    figures = (t, log_loss(logits, targets), log_loss(logits, targets, t),
               cross_fitted_log_loss(logits, targets))
    saved = checkpoint.read_checkpoint(path)
    saved['temperature'] = t
    checkpoint.atomic_save(saved, path)
    model.temperature = t
    print(f'temperature scaling: T = {t:.3f} fitted on the {len(rows)} validation images for '
          f'{path}: log loss {figures[1]:.4f} -> {figures[2]:.4f} ({figures[3]:.4f} when T is '
          f'fitted on half of them and scored on the other half); predictions unchanged')
    return figures
