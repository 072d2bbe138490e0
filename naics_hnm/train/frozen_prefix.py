"""FrozenPrefix: what an encoder's frozen layers output for every code, computed once: hidden states [N, L, H]
when some layers still train, or pooled vectors [N, H] when only a head trains (also kept in a file)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from naics_hnm.atomic import atomic_path
from naics_hnm.precision import use_bf16
from naics_hnm.data.token_cache import TokenCache
from naics_hnm.embedding import embed_codes

log = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer layers of a BERT-like transformers model."""
    return model.encoder.layer


def frozen_modules(model: torch.nn.Module, freeze_layers: int) -> list[torch.nn.Module]:
    """The embeddings and the lowest ``freeze_layers`` layers: what freezing ``freeze_layers`` keeps fixed."""
    return [model.embeddings, *transformer_layers(model)[:freeze_layers]] if freeze_layers else []


def run_layers(hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
    """``hidden`` through ``layers`` with the padding of ``mask`` [n, L] masked out."""
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _row_key(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int64).numpy().tobytes()


def frozen_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 (16 hex) of the frozen parameters: another model or freeze depth is another file."""
    digest = hashlib.sha256(str(encoder.hparams.freeze_layers).encode())
    for module in frozen_modules(encoder.encoder, encoder.hparams.freeze_layers):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FrozenPrefix:
    """Frozen-layer output per code, found by token content (``lookup``)."""

    def __init__(self, keys: dict[bytes, int], *, states: torch.Tensor | None = None,
                 pooled: torch.Tensor | None = None) -> None:
        if (states is None) == (pooled is None):
            raise ValueError("FrozenPrefix needs exactly one of states= (hidden states) or pooled=")
        self.keys, self.states, self.pooled = keys, states, pooled

    @classmethod
    def build(cls, encoder: torch.nn.Module, token_cache: TokenCache, batch_size: int = 256,
              cache_file: str | Path | None = None) -> "FrozenPrefix":
        """Run the frozen part over every code: pooled vectors when every layer is frozen (kept in
        ``cache_file`` if given), else the hidden states after the frozen layers."""
        keys = _content_keys(token_cache)
        if encoder.fully_frozen:
            return cls(keys, pooled=_pooled(encoder, token_cache, batch_size, cache_file))
        return cls(keys, states=_hidden_states(encoder, token_cache, batch_size))

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Code row for each token row, -1 where unknown."""
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu()
        return torch.tensor([self.keys.get(_row_key(ids[r, :n]), -1) for r, n in enumerate(lengths)], dtype=torch.long)

    def hidden(self, rows: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
        if self.states is None:
            raise ValueError("this FrozenPrefix holds pooled vectors, not hidden states")
        states = self.states[rows.to(self.states.device), :width]
        if states.shape[1] < width:
            states = F.pad(states, (0, 0, 0, width - states.shape[1]))
        return states.to(device)

    def pooled_rows(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.pooled is None:
            raise ValueError("this FrozenPrefix holds hidden states, not pooled vectors")
        return self.pooled[rows.to(self.pooled.device)].to(device)


def _content_keys(token_cache: TokenCache) -> dict[bytes, int]:
    keys: dict[bytes, int] = {}
    for i in range(len(token_cache.lengths)):
        if token_cache.present[i]:
            keys.setdefault(_row_key(token_cache.input_ids[i, : int(token_cache.lengths[i])]), i)
    return keys


@torch.no_grad()
def _hidden_states(encoder: torch.nn.Module, token_cache: TokenCache, batch_size: int) -> torch.Tensor:
    device = encoder.device
    n, width = token_cache.input_ids.shape
    states: torch.Tensor | None = None
    frozen = transformer_layers(encoder.encoder)[: encoder.hparams.freeze_layers]
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(start + batch_size, n))
        tokens = token_cache.gather(ids, width)
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = run_layers(encoder.encoder.embeddings(input_ids=input_ids), mask, frozen)
        if states is None:
            states = torch.zeros(n, width, hidden.shape[-1], dtype=hidden.dtype, device=device)
        states[start : start + len(ids)] = hidden
    if states is None:
        raise ValueError("the token cache holds no codes")
    return states


@torch.no_grad()
def _pooled(encoder: torch.nn.Module, token_cache: TokenCache, batch_size: int,
            cache_file: str | Path | None) -> torch.Tensor:
    n = len(token_cache.lengths)
    if cache_file is not None and Path(cache_file).is_file():
        try:
            pooled = np.load(cache_file, allow_pickle=False)
        except (OSError, ValueError) as err:
            log.warning("frozen encoder outputs %s unreadable (%s): computing them again", cache_file, err)
        else:
            if pooled.ndim == 2 and pooled.shape[0] == n and pooled.dtype == np.float32:
                log.info("frozen encoder outputs for %d codes read from %s", n, cache_file)
                return torch.from_numpy(pooled)
            log.warning("frozen encoder outputs %s have shape %s: expected [%d, d]; computing them again",
                        cache_file, pooled.shape, n)

    def pooled(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = encoder.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return mean_pool(hidden.last_hidden_state, tokens["attention_mask"]).float()

    out = embed_codes(pooled, token_cache, batch_size=batch_size, device=encoder.device, module=encoder.encoder,
                      progress=n >= 20 * batch_size, desc=f"frozen encoder over {n:,} codes")
    if cache_file is not None:
        try:
            with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
                np.save(handle, out.numpy(), allow_pickle=False)
        except OSError as err:
            log.warning("could not keep frozen encoder outputs in %s (%s); they are recomputed next run",
                        cache_file, err)
        else:
            log.info("frozen encoder outputs for %d codes written to %s", n, cache_file)
    return out


def pooled_cache_file(token_cache_path: str | Path, encoder: torch.nn.Module) -> Path:
    """Where the pooled outputs of ``encoder``'s frozen part live, next to a token cache file."""
    path = Path(token_cache_path)
    precision = "-bf16" if use_bf16(encoder.device) else ""  # bf16 outputs differ slightly: never mixed
    return path.with_name(f"{path.stem}.frozen-{frozen_fingerprint(encoder)}{precision}.npy")


__all__ = ["FrozenPrefix", "frozen_fingerprint", "mean_pool", "pooled_cache_file"]
