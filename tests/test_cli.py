"""The README's main job: `python -m pi05_fastprune demo` (and its real-checkpoint mode)."""

import dataclasses

import torch

from pi05_fastprune.__main__ import main
from pi05_fastprune.model import Pi05, Pi05Config


def test_demo_default(capsys):
    main(["demo", "--repeats", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert "[op] sample 0: kept" in out and "base_0_rgb=" in out
    assert "[op] prefix length 968 -> " in out
    assert "[model] pruned  : prefix" in out and "KV cache" in out
    assert "sample_actions(2 steps)" in out


def test_demo_budget_flags(capsys):
    main(["demo", "--repeats", "1", "--steps", "1", "--keep-tokens", "32", "--max-tokens", "24", "--batch", "2"])
    out = capsys.readouterr().out
    assert "[op] sample 1: kept 24/768" in out
    assert "[model] sample 1: kept 24/768" in out


def test_demo_checkpoint(capsys, tmp_path, sp_model):
    config = dataclasses.replace(Pi05Config.dummy(vision_image_size=112), pytorch_compile_mode=None)
    Pi05(config, seed=3).save_openpi(str(tmp_path / "model.safetensors"))
    main(["demo", "--checkpoint", str(tmp_path), "--tokenizer", str(sp_model), "--no-norm-stats",
          "--action-horizon", "4", "--keep-tokens", "20"])
    out = capsys.readouterr().out
    assert "[policy] unpruned: actions (4, 32), kept image tokens None" in out
    assert "[policy] pruned  : actions (4, 32), kept image tokens 20" in out
    torch._dynamo.reset()
