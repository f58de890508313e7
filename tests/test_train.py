"""sweep.worker.train on real data (scikit-learn digits) with a tiny real CNN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweep.worker.train import (
    TrainConfig,
    evaluate,
    fit,
    make_optimizer,
    pick_device,
    prepare_model,
    seed_everything,
    train_epoch,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1400], order[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, num_classes),
    )


def loaders(digits, batch_size=64):
    train, test = digits
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=256)


@pytest.mark.parametrize(
    "optimizer,lr,weight_decay", [("sgd", 0.1, 5e-4), ("adamw", 3e-3, 0.05)]
)
def test_fit_learns_digits(digits, optimizer, lr, weight_decay):
    seed_everything(0)
    train, test = loaders(digits)
    model = tiny_cnn()
    cfg = TrainConfig(epochs=4, lr=lr, optimizer=optimizer, weight_decay=weight_decay, warmup_epochs=0.5)
    before = evaluate(model, test, CPU)
    losses = fit(model, train, cfg, CPU)
    after = evaluate(model, test, CPU)

    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert before["accuracy"] < 0.35  # chance is 0.1
    assert after["accuracy"] > 0.85 and after["loss"] < before["loss"]
    assert model.training  # fit leaves the model ready to keep training


def test_label_smoothing_changes_the_loss_as_its_formula_says(digits):
    # A briefly trained model is confident, so smoothing visibly raises its loss (at init both are ~log 10).
    seed_everything(1)
    trained = tiny_cnn()
    fit(trained, loaders(digits)[0], TrainConfig(epochs=1, lr=0.1), CPU)
    x, y = digits[0].tensors[0][:64], digits[0].tensors[1][:64]
    losses = {}
    for ls in (0.0, 0.2):
        model = copy.deepcopy(trained)
        with torch.no_grad():
            logp = F.log_softmax(model(x), dim=1)  # train-mode BN, as the first step sees it
        cfg = TrainConfig(label_smoothing=ls)
        opt, sched = make_optimizer(model, cfg, 1)
        first = train_epoch(model, [(x, y)], opt, sched, cfg, CPU)  # one batch: its loss, before the step
        expected = -((1 - ls) * logp.gather(1, y[:, None]).squeeze(1) + ls * logp.mean(dim=1)).mean()
        assert first == pytest.approx(expected.item(), rel=1e-5)
        losses[ls] = first
    assert losses[0.2] > losses[0.0] + 0.1


def test_train_epoch_returns_the_per_sample_mean_of_its_batch_losses(digits):
    x, y = digits[0].tensors
    batches = [(x[:100], y[:100]), (x[100:110], y[100:110])]  # uneven: a batch mean would be wrong
    model = tiny_cnn().train()
    # A step this small leaves the weights as they are, so each batch's loss is its loss at the initial weights.
    cfg = TrainConfig(lr=1e-12, momentum=0.0, weight_decay=0.0)
    with torch.no_grad():
        per_batch = [F.cross_entropy(model(bx), by).item() for bx, by in batches]
    opt, sched = make_optimizer(model, cfg, len(batches))
    mean = train_epoch(model, batches, opt, sched, cfg, CPU)
    assert mean == pytest.approx((100 * per_batch[0] + 10 * per_batch[1]) / 110, rel=1e-5)
    assert mean != pytest.approx((per_batch[0] + per_batch[1]) / 2, rel=1e-5)  # not a mean of batch means
    with pytest.raises(ValueError, match="no batches"):
        train_epoch(model, [], opt, sched, cfg, CPU)


def _final_weights(digits, seed: int) -> dict[str, torch.Tensor]:
    seed_everything(seed)
    train, _ = loaders(digits)  # shuffling draws from the seeded global generator
    model = tiny_cnn()
    fit(model, train, TrainConfig(epochs=1, lr=0.05, warmup_epochs=0.2, label_smoothing=0.1), CPU)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_seeded_runs_are_bit_identical_and_seeds_matter(digits):
    a, b, c = _final_weights(digits, 7), _final_weights(digits, 7), _final_weights(digits, 8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_schedule_warms_up_linearly_then_cosine_decays_to_zero():
    model = nn.Linear(4, 2)
    cfg = TrainConfig(epochs=3, lr=0.2, warmup_epochs=0.5, optimizer="adamw")
    steps_per_epoch = 8
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(sched.get_last_lr()[0])
        assert all(g["lr"] == lrs[-1] for g in opt.param_groups)
        opt.step()
        sched.step()
    end = sched.get_last_lr()[0]

    warmup = 4
    rises = [b - a for a, b in zip(lrs[:warmup], lrs[1:warmup])]
    assert lrs[0] > 0 and all(d == pytest.approx(cfg.lr / warmup) for d in rises)
    assert lrs[warmup - 1] == pytest.approx(cfg.lr) == max(lrs)
    decay = lrs[warmup:]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    for s, lr in enumerate(decay):
        assert lr == pytest.approx(cfg.lr * 0.5 * (1 + math.cos(math.pi * s / len(decay))))
    assert end == pytest.approx(0.0, abs=1e-12)


def test_zero_epochs_builds_and_fits_without_steps():
    model = nn.Linear(4, 2)
    before = model.weight.clone()
    opt, sched = make_optimizer(model, TrainConfig(epochs=0, warmup_epochs=1.0), 10)
    assert sched.get_last_lr()[0] > 0
    assert fit(model, [(torch.randn(3, 4), torch.tensor([0, 1, 0]))], TrainConfig(epochs=0), CPU) == []
    assert torch.equal(model.weight, before)


def test_bn_and_bias_params_get_no_weight_decay():
    model = tiny_cnn()
    cfg = TrainConfig(weight_decay=1e-3)
    opt, _ = make_optimizer(model, cfg, 10)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {1e-3, 0.0}
    conv1, bn, conv2, fc = model[0], model[1], model[3], model[6]
    assert by_decay[1e-3] == {id(conv1.weight), id(conv2.weight), id(fc.weight)}
    assert by_decay[0.0] == {id(bn.weight), id(bn.bias), id(conv2.bias), id(fc.bias)}


def test_frozen_params_are_not_optimized():
    model = tiny_cnn()
    model[0].weight.requires_grad_(False)
    opt, _ = make_optimizer(model, TrainConfig(), 10)
    assert id(model[0].weight) not in {id(p) for g in opt.param_groups for p in g["params"]}


def _fixed_model(num_classes: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_matches_hand_computed_accuracy_and_restores_mode(digits, training):
    x, y = digits[1].tensors
    model = _fixed_model(10).train(training)
    with torch.no_grad():
        logits = model(x)
    expected_acc = (logits.argmax(1) == y).sum().item() / len(y)
    expected_loss = F.cross_entropy(logits, y).item()
    # Uneven batches: the mean must weight by samples, not by batches.
    batches = [(x[:50], y[:50]), (x[50:100], y[50:100]), (x[100:], y[100:])]
    out = evaluate(model, batches, CPU, num_classes=10)
    assert set(out) == {"accuracy", "loss"}  # no top5 with 10 classes
    assert out["accuracy"] == pytest.approx(expected_acc, abs=1e-12)
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert 0.0 < out["accuracy"] < 1.0
    assert model.training is training


def test_evaluate_reports_top5_only_above_ten_classes():
    torch.manual_seed(4)
    x, y = torch.randn(90, 64), torch.randint(0, 20, (90,))
    model = _fixed_model(20)
    with torch.no_grad():
        logits = model(x)
    expected_top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).sum().item() / len(y)
    out = evaluate(model, [(x[:40], y[:40]), (x[40:], y[40:])], CPU, num_classes=20)
    assert out["top5"] == pytest.approx(expected_top5, abs=1e-12)
    assert out["top5"] >= out["accuracy"]
    assert out["top5"] > out["accuracy"]  # 90 samples, 20 classes: top-5 must catch more
    assert "top5" in evaluate(model, [(x, y)], CPU)  # class count inferred from the logits


def test_evaluate_rejects_empty_batches():
    with pytest.raises(ValueError, match="no batches"):
        evaluate(_fixed_model(10), [], CPU)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})
    cfg = TrainConfig.from_dict({"lr": 0.1, "epochs": 3, "optimizer": "adamw"})
    assert (cfg.lr, cfg.epochs, cfg.optimizer, cfg.batch_size) == (0.1, 3, "adamw", 64)


@pytest.mark.parametrize(
    "field,value",
    [("optimizer", "adam"), ("lr", 0.0), ("epochs", -1), ("label_smoothing", 1.0), ("lr", "1e-3"), ("epochs", 2.5)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict({field: value})


def test_config_accepts_numpy_scalars_from_tune():
    np = pytest.importorskip("numpy")
    cfg = TrainConfig.from_dict({"epochs": np.int64(2), "lr": np.float32(0.5), "amp": np.bool_(False)})
    assert (type(cfg.epochs), type(cfg.lr), type(cfg.amp)) == (int, float, bool)
    assert (cfg.epochs, cfg.lr, cfg.amp) == (2, 0.5, False)


def test_pick_device():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == CPU
    with pytest.raises(ValueError, match="not a torch device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_prepare_model_keeps_cpu_layout():
    model = prepare_model(tiny_cnn(), CPU, TrainConfig(channels_last=True))
    assert model[0].weight.is_contiguous()  # channels_last only applies on cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_channels_last_learns(digits):
    seed_everything(0)
    device = torch.device("cuda")
    train, test = loaders(digits)
    model = tiny_cnn()
    fit(model, train, TrainConfig(epochs=3, lr=0.1), device)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert evaluate(model, test, device)["accuracy"] > 0.85


def test_constant_schedule_holds_the_rate_after_warm_up():
    model = tiny_cnn()
    for schedule, last in (("constant", 0.1), ("cosine", None)):
        cfg = TrainConfig(lr=0.1, epochs=2, warmup_epochs=0.5, lr_schedule=schedule)
        opt, sched = make_optimizer(model, cfg, steps_per_epoch=4)
        rates = []
        for _ in range(8):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert rates[:2] == pytest.approx([0.05, 0.1])  # warm-up over 2 steps, for both
        cosine = 0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 6))  # step 7 of 8, 2 of them warm-up
        assert rates[-1] == pytest.approx(last if schedule == "constant" else cosine)
