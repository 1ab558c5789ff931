"""The examples run as a user would run them, and do what they say."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import centerkern

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    rows = re.findall(r"accuracy\s+([\d.]+)%.*spread ([\d.]+)", completed.stdout)
    return [(float(accuracy) / 100, float(spread)) for accuracy, spread in rows]


def test_torch_training_example_tightens_the_classes():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    with_center_loss = _run("train_torch_center_loss.py", "--epochs", "30")
    softmax_only = _run("train_torch_center_loss.py", "--epochs", "30", "--weight", "0")
    assert len(with_center_loss) == 30
    first_spread, last_spread = with_center_loss[0][1], with_center_loss[-1][1]
    assert last_spread < first_spread / 5  # the intra-class spread falls
    assert with_center_loss[-1][0] > 0.9  # and the digits are still told apart
    assert last_spread < softmax_only[-1][1] / 2  # tighter than softmax alone makes them


def test_data_parallel_example_keeps_the_ranks_centers_identical():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_ddp_center_loss.py"), "--ranks", "2", "--epochs", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    spreads = [float(s) for s in re.findall(r"spread ([\d.]+)", completed.stdout)]
    assert len(spreads) == 12 and spreads[-1] < spreads[0] / 3
    assert "centers identical on 2 ranks: True" in completed.stdout


def test_data_parallel_example_with_sharded_centers():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_ddp_center_loss.py"), "--ranks", "2", "--epochs", "12",
         "--placement", "sharded"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    spreads = [float(s) for s in re.findall(r"spread ([\d.]+)", completed.stdout)]
    assert len(spreads) == 12 and spreads[-1] < spreads[0] / 3
    assert "centers sharded over 2 ranks, rows per rank [5, 5]; saved and loaded back: True" in completed.stdout


def test_seed_example_gives_tensorflows_numbers_on_every_backend():
    completed = subprocess.run([sys.executable, str(EXAMPLES / "seed_example.py")], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for loss in ("4.1111111", "1.4111111", "1.1611111"):
        assert completed.stdout.count(f"loss {loss}") == 1 + len(centerkern.backends())  # TensorFlow's and each
    assert "DIFFERENT" not in completed.stdout
    assert "every step gives TensorFlow's numbers" in completed.stdout
