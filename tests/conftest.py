import os
os.environ.setdefault("FASTPRUNE_TORCH_COMPILE", "0")  # tests compile explicitly where they test compilation
import io
import pathlib

import pytest

DATA = pathlib.Path(__file__).parent / "data" / "openpi"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bench/gpu_check runs pytest -m gpu)")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """openpi's checkpoint layout and conformance vectors (copied from openpi; see its README)."""
    return DATA


def last_kept(model):
    """What a model's pruner kept in its last eval call: counts, kept_idx, kept_mask."""
    from types import SimpleNamespace

    core = model.token_pruner.core
    return SimpleNamespace(
        counts=core.last_kept_per_sample, kept_idx=core.last_kept_indices_padded, kept_mask=core.last_kept_indices_mask
    )


def copied_patch_case(seed: int):
    """A small random shape (N 2-69, D 1-129, T 1-39, fp32) whose patch b is a copy of an earlier
    patch a, with the prompt pointed at it: their scores tie exactly in every row, so SPEC's rule
    gives a, never b. Returns (patches [1, N, D], task [1, T, D], a, b)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    N, D, T = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 70), (1, 130), (1, 40)))
    patches = torch.randn(1, N, D, generator=g)
    task = torch.randn(1, T, D, generator=g)
    a = int(torch.randint(0, N - 1, (1,), generator=g))
    b = int(torch.randint(a + 1, N, (1,), generator=g))
    patches[0, b] = patches[0, a]
    task[0, 0] += 3 * patches[0, a]
    return patches, task, a, b


SENTENCES = [
    "Task: pick up the red block, State: 12 128 255 0 7;\nAction: ",
    "Task: close the microwave, State: -1 3 45 200;\nAction: ",
    "put the bowl on the plate",
    "open the top drawer and put the bowl inside",
    "pick up the black bowl next to the ramekin and place it on the plate",
]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A tiny sentencepiece model with PaligemmaTokenizer's special ids (pad 0, eos 1, bos 2,
    unk 3), identity normalization, no dummy prefix and byte fallback, trained in-process."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 10),
        model_writer=buf,
        vocab_size=320,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tok") / "tiny_paligemma.model"
    path.write_bytes(buf.getvalue())
    return path


def expected_rows_gradient(out, weight, patches_shape):
    """d sum(pruned * weight) / d patches: each kept row's weight at its patch, zero elsewhere."""
    import torch

    grad = torch.zeros(patches_shape, dtype=weight.dtype, device=weight.device)
    b, k = torch.nonzero(out.kept_mask, as_tuple=True)
    grad[b, out.kept_idx[b, k]] = weight[b, k]
    return grad
