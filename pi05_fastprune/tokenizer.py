"""pi0.5 prompt tokenization (openpi's ``PaligemmaTokenizer.tokenize``), via sentencepiece.

Behaviour follows openpi (``openpi.models.tokenizer``, upstream commit 15a9616), written
from scratch. You supply the PaliGemma sentencepiece model file (openpi downloads
``gs://big_vision/paligemma_tokenizer.model``; nothing is downloaded here).

* The task text is cleaned as openpi does for pi0/pi0.5: ``strip()``, then every ``"_"`` and
  every ``"\\n"`` becomes a space. It is **not** lower-cased (only openpi's pi0-FAST
  tokenizer lower-cases).
* pi0.5 with discrete state input (openpi's default for pi0.5): the *normalized* state is
  discretized into 256 bins over [-1, 1] -- ``np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1``,
  so a value below -1 gives ``-1`` and a value >= 1 gives ``255`` (no clipping) -- and the
  prompt is ``"Task: {text}, State: {b0 b1 ...};\\nAction: "``, encoded with a BOS.
* Without state (pi0, and pi0.5 configs with ``discrete_state_input=False`` such as openpi's
  ``pi05_libero``): ``encode(text, add_bos=True) + encode("\\n")``.
* The ids are right-padded with 0 (openpi pads with ``False``; 0 is PaliGemma's ``<pad>``)
  up to ``max_len``, with mask True on real tokens; longer prompts are cut to ``max_len``
  (a warning is logged, as in openpi).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import numpy as np

__all__ = [
    "STATE_BINS",
    "clean_prompt",
    "discretize_state",
    "format_prompt",
    "PaligemmaTokenizer",
]

logger = logging.getLogger(__name__)

STATE_BINS = 256
# Left edges of the 256 bins: openpi's np.linspace(-1, 1, 256 + 1)[:-1] (float64).
_STATE_EDGES = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]


def clean_prompt(text: str) -> str:
    """openpi's pi0/pi0.5 text cleaning: strip, ``_`` and newline -> space (case kept)."""
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state) -> np.ndarray:
    """Bin index of each normalized state value: ``digitize(x, edges) - 1`` over 256 equal bins
    of [-1, 1] (values < -1 -> -1, values >= 1 -> 255, as openpi; nothing is clipped)."""
    x = np.asarray(state)
    if x.ndim != 1:
        raise ValueError(f"the state must be a 1-D vector, got shape {x.shape}")
    # digitize with increasing bins and right=False == searchsorted(side="right").
    return np.searchsorted(_STATE_EDGES, x.astype(np.float64), side="right").astype(np.int64) - 1


def format_prompt(prompt: str, state=None) -> str:
    """The pi0.5 prompt text: ``"Task: {clean}, State: {bins};\\nAction: "`` (``state`` given),
    else the cleaned text alone (the pi0 form, whose "\\n" is encoded separately)."""
    text = clean_prompt(prompt)
    if state is None:
        return text
    bins = " ".join(str(int(b)) for b in discretize_state(state))
    return f"Task: {text}, State: {bins};\nAction: "


class PaligemmaTokenizer:
    """openpi's prompt tokenizer for pi0.5 (``tokenize(prompt, state) -> (ids, mask)``).

    Args:
        model_path: the sentencepiece model file (PaliGemma's ``paligemma_tokenizer.model``).
        max_len: the padded length, the model's ``max_token_len`` (openpi: 200 for pi0.5).
    """

    def __init__(self, model_path: Union[str, os.PathLike], max_len: int = 200):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("PaligemmaTokenizer needs the 'sentencepiece' package (pip install sentencepiece)") from e
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        with open(path, "rb") as f:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=f.read())
        if self._sp.bos_id() < 0:
            raise ValueError(f"{path}: the sentencepiece model has no BOS token")
        self.model_path = path
        self.max_len = int(max_len)

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def pad_id(self) -> int:
        """The id padding positions get: 0, as openpi (whatever the model's own pad id)."""
        return 0

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode_ids(self, prompt: str, state=None) -> list[int]:
        """The unpadded ids of one prompt (BOS first)."""
        if state is not None:
            return list(self._sp.encode(format_prompt(prompt, state), add_bos=True))
        return list(self._sp.encode(clean_prompt(prompt), add_bos=True)) + list(self._sp.encode("\n"))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def tokenize(self, prompt: str, state=None) -> tuple[np.ndarray, np.ndarray]:
        """-> ``(ids int64 [max_len], mask bool [max_len])``; ``state`` is the normalized state
        (pi0.5 format) or None (pi0 format)."""
        if not isinstance(prompt, str):  # openpi accepts a 0-d numpy string array too
            prompt = np.asarray(prompt).item()
            if isinstance(prompt, bytes):
                prompt = prompt.decode("utf-8")
        ids = self.encode_ids(prompt, state)
        n = len(ids)
        if n > self.max_len:
            logger.warning(
                "Token length (%d) exceeds max length (%d), truncating. Consider increasing max_token_len.",
                n,
                self.max_len,
            )
            ids, n = ids[: self.max_len], self.max_len
        tokens = np.full(self.max_len, self.pad_id, dtype=np.int64)
        tokens[:n] = ids
        mask = np.zeros(self.max_len, dtype=bool)
        mask[:n] = True
        return tokens, mask

    def tokenize_batch(
        self, prompts: Sequence[str], states: Optional[Sequence] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stacked ``tokenize``: ``(ids [B, max_len], mask [B, max_len])``."""
        if states is not None and len(states) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(states)} states")
        pairs = [self.tokenize(p, None if states is None else states[i]) for i, p in enumerate(prompts)]
        return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])
