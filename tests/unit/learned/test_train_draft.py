"""`train-draft` end to end on the real model (a few prompts, a few steps), and its one-line CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from specserve.learned.checkpoint import load_checkpoint
from specserve.learned.distill_data import DistillConfig
from specserve.learned.eagle_head import load_eagle_head
from specserve.learned.train_draft import TrainDraftConfig, train_draft
from specserve.learned.fit import TrainConfig


def test_train_draft_writes_a_loadable_checkpoint(model_path, data_dir, llama_model, tmp_path):
    out = tmp_path / "drafters" / "eagle.safetensors"
    config = TrainDraftConfig(model_path=str(model_path), train_dir=data_dir / "train", cache_dir=tmp_path / "distill",
                              out=out, distill=DistillConfig(num_prompts=4, max_new_tokens=8),
                              train=TrainConfig(epochs=1, batch_size=2, save_every=1), draft_vocab_size=256)
    report = train_draft(config)
    assert report.sequences == 4 and report.response_tokens > 0 and 0 < report.draft_vocab_coverage <= 1
    assert 0 <= report.heldout_step1_accuracy <= 1 and set(report.seconds) == {"corpus", "train", "eval"}
    head = load_eagle_head(out, llama_model)  # fits the serving (packed float32) target
    assert head.config.draft_vocab_size == 256
    saved = load_checkpoint(out, "eagle", None)
    recipe = saved.recipe
    assert recipe["loss"] == "soft" and recipe["distill"]["num_prompts"] == 4 and recipe["data_hash"]
    # The held-out agreement `--spec auto` ranks trained drafters by.
    assert saved.heldout == {"step1": report.heldout_step1_accuracy, "step2": report.heldout_step2_accuracy}
    assert not config.state_path.exists()  # the training state goes once the checkpoint is written


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specserve.cli", "train-draft", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("specserve: error:") and needle in lines[0], result.stderr


def test_cli_errors_are_one_line(model_path, tmp_path):
    out = tmp_path / "eagle.safetensors"
    common = ("--model", str(model_path), "--out", str(out))
    assert_one_line_error(run_cli(*common, "--resume", cwd=tmp_path), "no training state at")
    Path(f"{out}.train-state.pt").write_bytes(os.urandom(512))
    assert_one_line_error(run_cli(*common, "--resume", cwd=tmp_path), "is corrupt")
    assert_one_line_error(run_cli(*common, "--prompts", "0", cwd=tmp_path), "must be >= 1")
