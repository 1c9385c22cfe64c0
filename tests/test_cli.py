"""The main job: end to end with tiny settings, and the fairness of its comparison."""
import argparse
import json
import subprocess
import sys

import pytest
import torch

from mgit_fast.cli import main
from mgit_fast.train import TrainConfig, train

TINY = dict(epochs=2, batch_size=64, embed_dim=32, depth=2, num_heads=2)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", "--dataset", "synthetic", "--epochs", "2", "--seeds", "2", "--depth", "2", "--embed-dim", "32",
         "--num-heads", "2", "--attention", "lsa", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["baseline"]["test_accuracy"]) == 2
    assert len(metrics["mgit"]["test_accuracy"]) == 2 and len(metrics["mgit"]["aux_test_accuracy"]) == 2
    assert metrics["config"]["attention"] == "lsa" and metrics["config"]["seeds"] == [0, 1]
    history = metrics["mgit"]["history"][0]
    assert all(len(history[k]) == 2 for k in ("loss", "ce_primary", "js", "mix", "test_accuracy"))
    assert (out / "training.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "baseline" in table and "MGiT primary" in table and "±" in table
    paired = metrics["paired"]["mgit_minus_baseline"]
    diffs = [m - b for m, b in zip(metrics["mgit"]["test_accuracy"], metrics["baseline"]["test_accuracy"])]
    assert paired["differences"] == pytest.approx(diffs) and paired["n"] == 2
    assert "95 % CI" in table and "p = " in table
    assert metrics["accuracy_unit"] == "%" and all(0 <= a <= 100 for a in metrics["mgit"]["test_accuracy"])
    assert metrics["config"]["mgit_fast"] not in ("", None)


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--mix", "sometimes"])
    assert main(["train", "--epochs", "0", "--out", str(tmp_path)]) == 2


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "mgit_fast", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--js-weight" in done.stdout


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_uncoupled_mgit_primary_is_the_baseline(drop_path):
    """With js_weight=0 and mix=0 nothing flows from the auxiliary into the primary, so with a
    fair protocol (same weights, batches, augmentation and RNG) the arms agree per seed."""
    cfg = TrainConfig(seeds=[0, 1], js_weight=0.0, mix=0.0, drop_path=drop_path, **TINY)
    results = train(cfg, show_progress=False)
    one_image = 100 / results["config"]["test_images"]  # percent
    for base, mgit in zip(results["baseline"]["test_accuracy"], results["mgit"]["test_accuracy"]):
        assert abs(base - mgit) <= one_image
    for base, mgit in zip(results["baseline"]["history"], results["mgit"]["history"]):
        assert base["ce_primary"] == pytest.approx(mgit["ce_primary"], rel=1e-6)


def test_evaluating_less_often_trains_the_same_models():
    """--eval-every k measures after every k-th epoch and the last, and changes nothing else:
    training statistics and final accuracies equal those of evaluating every epoch."""
    cfg = dict(TINY, epochs=4, seeds=[0])
    every = train(TrainConfig(**cfg), show_progress=False)
    sparse = train(TrainConfig(eval_every=3, **cfg), show_progress=False)
    for arm in ("baseline", "mgit"):
        assert sparse[arm]["test_accuracy"] == every[arm]["test_accuracy"]
        full, few = every[arm]["history"][0], sparse[arm]["history"][0]
        assert full["eval_epochs"] == [1, 2, 3, 4] and few["eval_epochs"] == [3, 4]
        assert few["test_accuracy"] == [full["test_accuracy"][2], full["test_accuracy"][3]]
        assert few["ce_primary"] == full["ce_primary"]
    from mgit_fast.train import figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = next(ax for ax in figure(sparse, plt).axes if ax.get_title() == "test accuracy")
    assert all(list(line.get_xdata()) == [3, 4] for line in accuracy.get_lines())
    plt.close("all")


def test_coupled_mgit_primary_differs_from_the_baseline():
    """The converse, so the fairness test can fail: with the default coupling the primary's
    training differs from the baseline's."""
    results = train(TrainConfig(seeds=[0], **TINY), show_progress=False)
    base, mgit = results["baseline"]["history"][0], results["mgit"]["history"][0]
    assert base["ce_primary"] != pytest.approx(mgit["ce_primary"], rel=1e-6)
    assert all(0 < m <= 0.5 for m in mgit["mix"])


@pytest.mark.parametrize("bad, option", [
    (["--epochs", "0"], "--epochs"), (["--seeds", "0"], "--seeds"), (["--batch-size", "0"], "--batch-size"),
    (["--mix", "2"], "--mix"), (["--mix", "foo"], "--mix"), (["--mix-max", "1.5"], "--mix-max"),
    (["--js-weight", "-1"], "--js-weight"), (["--aux-depth", "0"], "--aux-depth"), (["--aux-depth", "5"], "--aux-depth"),
    (["--num-heads", "3"], "--num-heads"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--temperature", "0"], "--temperature"), (["--label-smoothing", "1"], "--label-smoothing"),
    (["--max-grad-norm", "0"], "--max-grad-norm"), (["--average", "-0.1"], "--average"),
    (["--device", "cuda:7"], "--device"), (["--device", "tpu"], "--device"), (["--graph", "--device", "cpu"], "--graph"),
    (["--out", "/proc/forbidden/run"], "--out"), (["--epochs", "x"], "--epochs"),
    (["--train-per-class", "0"], "--train-per-class"), (["--model", "resnet"], "--model"),
    (["--model", "timm:no_such_model"], "--model"), (["--dataset", "cifar11"], "--dataset"),
    (["--dataset", "folder:/no/such/folder"], "--dataset"),
    (["--attention", "window"], "--attention"), (["--mask-rank", "2"], "--mask-rank"),
    (["--attention", "ibit", "--mask-rank", "0"], "--mask-rank"),
    (["--attention", "ibit", "--mask-rank", "5"], "--mask-rank"),
    (["--attention", "ibit", "--mask-rank", "x"], "--mask-rank"),
    (["--attention", "ibit", "--dataset", "cifar10", "--mask-rank", "65"], "--mask-rank"),
])
def test_bad_arguments_fail_at_once_with_one_line(bad, option, tmp_path, capsys):
    """Each bad argument: exit code 2, one line naming the option, before any training."""
    out = ["--out", str(tmp_path / "run")] if "--out" not in bad else []
    try:
        code = main(["train", "--no-progress", *out, *bad])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_every_option_says_what_it_is_and_its_default():
    from mgit_fast.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        if not isinstance(action, argparse._StoreTrueAction):
            assert "(default:" in train.formatter_class(prog="x")._get_help_string(action), action.option_strings


def test_cli_error_runs_as_a_process_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mgit_fast", "train", "--js-weight", "-1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "mgit-fast train: --js-weight must be ≥ 0, got -1.0"


def test_paired_statistics_match_scipy():
    from scipy import stats

    from mgit_fast.train import paired_statistics

    rng = torch.Generator().manual_seed(3)
    a, b = (torch.rand(10, generator=rng, dtype=torch.float64).mul(100).tolist() for _ in range(2))
    out = paired_statistics(a, b)
    ref = stats.ttest_rel(a, b)
    assert out["t"] == pytest.approx(ref.statistic, rel=1e-9) and out["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    lo, hi = stats.t.interval(0.95, 9, loc=float(diffs.mean()), scale=float(diffs.std() / 10**0.5))
    assert out["ci95"] == pytest.approx([lo, hi], rel=1e-9)
    assert paired_statistics([1.0, 2.0], [1.0, 2.0])["p_value"] == 1.0
    assert paired_statistics([1.0], [0.5])["ci95"] is None


def test_few_shot_with_a_timm_model_end_to_end(tmp_path):
    """--train-per-class draws N images per class per seed; --model timm:NAME trains timm's ViT
    (beside the built-in auxiliary-making path) and the report carries the paired statistics."""
    out = tmp_path / "run"
    code = main(["train", "--dataset", "synthetic", "--train-per-class", "3", "--model", "timm:vit_tiny_patch16_224",
                 "--epochs", "1", "--seeds", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["train_images"] == 30 and metrics["config"]["model"] == "timm:vit_tiny_patch16_224"
    assert metrics["paired"]["mgit_minus_baseline"]["n"] == 2


def test_batches_are_the_per_step_draws():
    """The epoch's draws made at once (no per-step host copies) give exactly the batches,
    augmentation and per-step RNG of the per-step draws the results table was made with."""
    from types import SimpleNamespace

    from mgit_fast import train as train_module

    images, classes, seed = 150, 10, 4
    data = SimpleNamespace(x_train=torch.randn(images, 1, 8, 8), y_train=torch.randint(0, classes, (images,)),
                           x_test=torch.randn(4, 1, 8, 8), y_test=torch.randint(0, classes, (4,)))
    cfg = TrainConfig(epochs=3, batch_size=32, max_shift=1)

    class Recorder:
        def __init__(self):
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)
            self.seen = []

        def training_step(self, x, y):
            self.seen.append((x.clone(), y.clone(), torch.rand(())))
            self.optimizer.step()
            return {"loss": x.double().sum().float(), "skipped": torch.tensor(False)}

    recorder = Recorder()
    history = train_module._run_arm(recorder, {}, data, cfg, seed, train_module._Ranks(torch.device("cpu")),
                                    SimpleNamespace(update=lambda n: None))

    g, expected, step = torch.Generator().manual_seed(seed), [], 0
    for _ in range(cfg.epochs):  # the loop at 98c4d22: a copy of the order per epoch, two draws per step
        order = torch.randperm(images, generator=g)
        for start in range(0, images, cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            x = torch.nn.functional.pad(data.x_train[index], (1, 1, 1, 1))
            dy = torch.randint(0, 3, (len(index),), generator=g)
            dx = torch.randint(0, 3, (len(index),), generator=g)
            x = torch.stack([x[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(len(index))])
            torch.manual_seed(seed * train_module.STEP_SEED_STRIDE + step)
            expected.append((x, data.y_train[index], torch.rand(())))
            step += 1
    assert len(recorder.seen) == len(expected) == 3 * 5
    for (x, y, r), (ex, ey, er) in zip(recorder.seen, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey) and torch.equal(r, er)
    for epoch in range(cfg.epochs):
        total = torch.zeros(())
        for x, _, _ in expected[5 * epoch : 5 * epoch + 5]:
            total = total + x.double().sum().float()
        assert history["loss"][epoch] == float(total) / 5
        assert history["skipped"][epoch] == 0.0


@pytest.mark.parametrize("mask_rank", [None, 2])
def test_cli_trains_ibit_on_digits(mask_rank, tmp_path):
    """--attention ibit (and --mask-rank) on digits: 8×8 images, 4×4 patches, so 5 tokens."""
    out = tmp_path / "run"
    rank = ["--mask-rank", str(mask_rank)] if mask_rank is not None else []
    code = main(["train", "--attention", "ibit", *rank, "--epochs", "1", "--seeds", "1", "--depth", "1",
                 "--embed-dim", "16", "--num-heads", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["attention"] == "ibit" and metrics["config"]["mask_rank"] == mask_rank
    assert metrics["config"]["dataset"] == "digits"
    for arm in ("baseline", "mgit"):
        assert 0 <= metrics[arm]["test_accuracy"][0] <= 100


def test_ibit_config_builds_masked_models():
    from mgit_fast.attention import IBiTMask
    from mgit_fast.data import load_dataset
    from mgit_fast.train import build_model

    data = load_dataset("digits")
    model = build_model(TrainConfig(attention="ibit", mask_rank=3, **{k: v for k, v in TINY.items()
                                                                    if k in ("embed_dim", "depth", "num_heads")}),
                        data)
    masks = [m for m in model.modules() if isinstance(m, IBiTMask)]
    assert len(masks) == 2 and all(m.mask_rank == 3 and m.num_tokens == 5 for m in masks)


def test_help_says_each_default_once_and_version_prints(capsys):
    from mgit_fast import __version__
    from mgit_fast.cli import build_parser

    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    import re

    assert not re.search(r"\(default: [^)]*\) \(default:", text)  # was "(default: all) (default: None)"
    assert "(default: all)" in text and "passes over the training set (default: " in text
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"mgit-fast {__version__}"


def test_training_plot_keeps_each_arm_one_colour_and_zooms_the_accuracy():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from mgit_fast.train import ARM_COLORS, figure

    epochs = 10
    ramp = [20.0 + 70.0 * (1 - 0.6**e) for e in range(epochs)]

    def history(shift, mgit):
        h = {"ce_primary": [2.0 / (e + 1) for e in range(epochs)], "test_accuracy": [a + shift for a in ramp]}
        if mgit:
            h.update(js=[0.1] * epochs, mix=[0.3] * epochs, aux_test_accuracy=[a - 5 for a in ramp])
        return h

    results = {"config": {"seeds": [0, 1], "dataset": "digits"},
               "baseline": {"history": [history(0.0, False), history(0.5, False)]},
               "mgit": {"history": [history(1.0, True), history(1.5, True)]}}
    fig = figure(results, plt)
    expected = {"baseline": ARM_COLORS["baseline"], "MGiT primary": ARM_COLORS["mgit"], "MGiT": ARM_COLORS["mgit"],
                "MGiT auxiliary": ARM_COLORS["auxiliary"]}
    for ax in fig.axes:
        for line in ax.get_lines():
            assert to_hex(line.get_color()) == to_hex(expected[line.get_label()]), (ax.get_title(), line.get_label())
    accuracy = next(ax for ax in fig.axes if ax.get_title() == "test accuracy")
    low, high = accuracy.get_ylim()
    assert 60.0 < low < ramp[epochs // 2] - 5 and ramp[-1] + 1.5 <= high <= 100.0
    plt.close(fig)


def test_a_timm_that_does_not_import_is_named_for_what_failed(tmp_path, monkeypatch, capsys):
    """timm present but failing on torchvision: the message says so (it said "not installed")."""
    fake = tmp_path / "timm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torchvision'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["train", "--model", "timm:vit_tiny_patch16_224", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "timm is installed but does not import" in err and "torchvision" in err
    assert not (tmp_path / "run").exists()


def test_a_data_error_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, capsys):
    """A corrupt image in a folder dataset, and a download that fails into a data dir that does
    not exist: one line, exit 2, no traceback, no output folder, no data folder left behind."""
    import urllib.request

    import numpy as np
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "images" / "b" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{tmp_path / 'images'}", "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read image" in err and "broken.png" in err
    assert not out.exists()

    def offline(url, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data_dir = tmp_path / "nonexistent" / "dir"
    assert main(["train", "--dataset", "cifar100", "--data-dir", str(data_dir), "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mgit-fast train: --dataset cifar100: ") and "network is unreachable" in last
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "home").exists() and not out.exists()


def test_trained_models_are_saved_and_load_to_predict_as_trained(tmp_path):
    """models/<arm>_seed<seed>.pt per arm and seed: load_trained rebuilds each primary and it
    scores the test accuracy the run recorded; the MGiT file resumes a FusedMGiT; metrics.json
    names the threads, CPU and commit."""
    from mgit_fast import FusedMGiT, make_auxiliary
    from mgit_fast.data import load_dataset
    from mgit_fast.train import accuracy, load_trained

    cfg = TrainConfig(dataset="synthetic", epochs=1, seeds=[0, 1], embed_dim=16, depth=2, num_heads=2,
                      batch_size=64)
    results = train(cfg, tmp_path, show_progress=False)
    data = load_dataset("synthetic")
    for arm in ("baseline", "mgit"):
        for index, seed in enumerate(cfg.seeds):
            model = load_trained(tmp_path, arm, seed)
            assert accuracy(model, data.x_test, data.y_test) == results[arm]["test_accuracy"][index]
    state = torch.load(tmp_path / "models" / "mgit_seed1.pt", weights_only=True)
    primary = load_trained(tmp_path, "mgit", 1)
    resumed = FusedMGiT(primary, make_auxiliary(primary, cfg.aux_depth))
    resumed.load_state_dict(state["mgit"])
    assert int(resumed.optimizer.step_count) > 0
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["torch_threads"] == torch.get_num_threads() and config["cpu"] and "git_commit" in config
    with pytest.raises(FileNotFoundError, match="seeds run"):
        load_trained(tmp_path, "mgit", 7)


def test_mnist5k_images_are_28_pixels_for_the_mask_rank_check(capsys):
    """7×7 patches of 4 pixels: --mask-rank up to 49 (the check once assumed 32-pixel images)."""
    assert main(["train", "--dataset", "mnist5k", "--attention", "ibit", "--mask-rank", "50"]) == 2
    assert "--mask-rank must be in [1, 49]" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compile_end_to_end(tmp_path, capsys):
    """--compile: the MGiT arm's two forwards and loss compiled once per process (the second
    seed reuses the first's graph; the last, short batch of each epoch runs eagerly), the same
    training statistics as without it, and the compile time reported."""
    import torch._dynamo

    torch._dynamo.reset()
    args = ["train", "--dataset", "synthetic", "--epochs", "2", "--seeds", "2", "--depth", "2", "--embed-dim", "32",
            "--num-heads", "2", "--batch-size", "48", "--no-baseline", "--device", "cpu", "--no-progress"]
    assert main(args + ["--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert "torch.compile: first MGiT step" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "eager")]) == 0
    compiled, eager = (json.loads((tmp_path / run / "metrics.json").read_text())["mgit"] for run in ("compiled", "eager"))
    assert compiled["compiles"] == [1, 0] and eager["compiles"] == [0, 0]
    assert compiled["compile_seconds"][0] > 0 and eager["compile_seconds"] == [None, None]
    for key in ("loss", "ce_primary", "ce_auxiliary", "js", "mix"):
        assert compiled["history"][1][key] == pytest.approx(eager["history"][1][key], rel=1e-4), key
