"""The README's main job: `python -m pi05_fastprune demo` (and its real-checkpoint mode)."""

import dataclasses

import pytest
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


def test_demo_checkpoint(capsys, caplog, tmp_path, sp_model):
    """The demo on a checkpoint honours --batch and --steps, and says which horizon it guessed."""
    config = dataclasses.replace(Pi05Config.dummy(vision_image_size=112), pytorch_compile_mode=None)
    Pi05(config, seed=3).save_openpi(str(tmp_path / "model.safetensors"))
    args = ["demo", "--checkpoint", str(tmp_path), "--tokenizer", str(sp_model), "--no-norm-stats",
            "--keep-tokens", "20", "--repeats", "1"]
    main(args + ["--action-horizon", "4", "--batch", "2", "--steps", "3"])
    out = capsys.readouterr().out
    assert "[policy] unpruned: actions (2, 4, 32), kept image tokens None" in out
    assert "[policy] pruned  : actions (2, 4, 32), kept image tokens 20, 20, infer " in out
    assert "(3 steps, median of 1)" in out
    assert "no action horizon" not in caplog.text
    main(args + ["--steps", "1"])
    assert "actions (1, 10, 32)" in capsys.readouterr().out  # the dummy config's horizon
    assert "openpi's checkpoints hold no action horizon: using 10; pass --action-horizon" in caplog.text
    for flag, value in (("--size", "pi05"), ("--dtype", "float16")):
        with pytest.raises(SystemExit):
            main(args + [flag, value])
        assert f"{flag} is for the random-weight demo, not with --checkpoint" in capsys.readouterr().err
    torch._dynamo.reset()


@pytest.mark.parametrize("argv,message", [
    (["--keep-tokens", "0"], "--keep-tokens: must be in [1, 768]"),
    (["--max-tokens", "100000"], "--max-tokens: must be in [1, 768]"),
    (["--keep-ratio", "1.5"], "--keep-ratio: must be in (0, 1]"),
    (["--keep-tokens", "8", "--keep-ratio", "0.5"], "not allowed with argument"),
    (["--batch", "0"], "--batch: must be >= 1"),
])
def test_demo_rejects_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["demo", *argv])
    assert message in capsys.readouterr().err


def test_serve_takes_both_budget_flags(tmp_path):
    """As the seed's serve_policy.py: both budgets may be given (keep_tokens wins in the model,
    test_model's test_static_cap_and_ratio); the call gets past the flags to the checkpoint."""
    with pytest.raises(FileNotFoundError, match="no_checkpoint"):
        main(["serve", "--checkpoint", str(tmp_path / "no_checkpoint"), "--tokenizer", "t",
              "--token-prune-keep-ratio", "0.25", "--token-prune-keep-tokens", "10"])
