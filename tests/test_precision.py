"""bf16 autocast of embedding passes: the decision, the opt-outs, and outputs within cosine 0.999 of fp32."""

from __future__ import annotations

import logging

import pytest
import torch

from naics_hnm import precision
from naics_hnm.embedding import embed_codes
from naics_hnm.precision import ENV_VAR, cpu_supports_bf16, embedding_autocast, use_bf16

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx_bf16)")


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))


def test_decision_follows_cpu_device_and_opt_outs(bf16_cpu, monkeypatch):
    assert use_bf16("cpu") is True
    assert use_bf16(torch.device("cpu"), bf16=False) is False
    assert use_bf16("cuda") is False and use_bf16("cuda", bf16=True) is False
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(ENV_VAR, off)
        assert use_bf16("cpu") is False
    monkeypatch.setenv(ENV_VAR, "1")
    assert use_bf16("cpu") is True
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert use_bf16("cpu") is False and use_bf16("cpu", bf16=True) is False  # never forced onto a CPU without it


def test_bad_settings_name_the_value(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='maybe'"):
        use_bf16("cpu")
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="bf16='yes'"):
        use_bf16("cpu", bf16="yes")


def test_decision_is_logged_once(bf16_cpu, caplog):
    precision._logged.clear()
    with caplog.at_level(logging.INFO, logger="naics_hnm.precision"):
        use_bf16("cpu")
        use_bf16("cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["embedding passes in bf16 autocast: CPU flags avx512_bf16"]


def test_autocast_is_on_only_when_decided(bf16_cpu, monkeypatch):
    with embedding_autocast("cpu") as on:
        assert on and torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(ENV_VAR, "0")
    with embedding_autocast("cpu") as on:
        assert not on and not torch.is_autocast_enabled("cpu")


def _tiny_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64)).eval()

    def embed(tokens):
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    return model, embed


@needs_bf16
def test_bf16_embeddings_within_cosine_0999_of_fp32(token_cache, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    model, embed = _tiny_encoder()
    ids = torch.arange(400)
    fp32 = embed_codes(embed, token_cache, ids, batch_size=128, module=model, bf16=False)
    bf16 = embed_codes(embed, token_cache, ids, batch_size=128, module=model)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # computed in bf16, returned as fp32
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    assert float(cosine.min()) >= 0.999


def test_opt_out_gives_the_fp32_result(token_cache, monkeypatch):
    model, embed = _tiny_encoder()
    ids = torch.arange(200)
    seen = []

    def recording(tokens):
        seen.append(torch.is_autocast_enabled("cpu"))
        return embed(tokens)

    reference = embed_codes(recording, token_cache, ids, batch_size=100, module=model, bf16=False)
    monkeypatch.setenv(ENV_VAR, "0")
    opted_out = embed_codes(recording, token_cache, ids, batch_size=100, module=model)
    assert not any(seen) and torch.equal(opted_out, reference)
