"""The main job: end to end with tiny settings, and the fairness of its comparison."""
import json
import subprocess
import sys

import pytest

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
    one_image = 1 / results["config"]["test_images"]
    for base, mgit in zip(results["baseline"]["test_accuracy"], results["mgit"]["test_accuracy"]):
        assert abs(base - mgit) <= one_image
    for base, mgit in zip(results["baseline"]["history"], results["mgit"]["history"]):
        assert base["ce_primary"] == pytest.approx(mgit["ce_primary"], rel=1e-6)


def test_coupled_mgit_primary_differs_from_the_baseline():
    """The converse, so the fairness test can fail: with the default coupling the primary's
    training differs from the baseline's."""
    results = train(TrainConfig(seeds=[0], **TINY), show_progress=False)
    base, mgit = results["baseline"]["history"][0], results["mgit"]["history"][0]
    assert base["ce_primary"] != pytest.approx(mgit["ce_primary"], rel=1e-6)
    assert all(0 < m <= 0.5 for m in mgit["mix"])
