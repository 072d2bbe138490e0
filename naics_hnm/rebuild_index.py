"""Build a FAISS index of every code: ``python -m naics_hnm.rebuild_index``.

By default NAICS 2022 embedded with the offline all-MiniLM-L6-v2, into ``indexes/naics2022_minilm.faiss``; or
``--checkpoint`` / ``--model`` / ``--embeddings``. Bad input ends with one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from naics_hnm.index.metric import METRICS

log = logging.getLogger("naics_hnm.rebuild_index")
DEFAULT_OUTPUT = Path("indexes") / "naics2022_minilm.faiss"


class CLIError(Exception):
    """A problem with the command's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"rebuild_index: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="python -m naics_hnm.rebuild_index",
                     description="Build a FAISS index (+ JSON sidecar) over the embeddings of every taxonomy code.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="Lightning checkpoint (.ckpt) of the encoder to embed with")
    source.add_argument("--embeddings", type=Path, help="HDF5 embeddings file (datasets 'embeddings', 'codes')")
    source.add_argument("--model", help="transformers model name or local path to embed with "
                                        "(default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--model-class", default="naics_hnm.train.encoder:NAICSEncoder", help="'module:Class' of "
                        "the LightningModule in --checkpoint; it needs embed(tokens) (default: %(default)s)")
    parser.add_argument("--taxonomy", type=Path, help="taxonomy CSV (code,title[,...]); default NAICS 2022")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="index path: writes PATH.json and "
                        "generation files PATH.gNNNNNN.* beside it (default: %(default)s)")
    parser.add_argument("--metric", choices=METRICS, default="cosine", help="default: %(default)s")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="index and embedding device; auto = GPU when torch and faiss see one (default)")
    parser.add_argument("--index-factory", metavar="STR", help="faiss factory string, e.g. 'Flat' (exact), "
                        "'IVF256,Flat', 'HNSW32', 'IVF256,PQ32' (default: chosen from the number of codes: exact up "
                        "to 20,000, a recall-calibrated IVF above; logged)")
    parser.add_argument("--search-params", metavar="KEY=INT[,KEY=INT]", type=_search_params, help="search "
                        "parameters of the approximate index: nprobe (IVF), efSearch (HNSW), k_factor (exact "
                        "re-scoring of k * k_factor candidates); default: measured defaults")
    parser.add_argument("--batch-size", type=int, default=256, help="codes per forward pass (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per code text (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected an int >= 1")
    if args.max_length < 2:
        parser.error(f"--max-length {args.max_length}: expected an int >= 2 (tokens per code text, "
                     "special tokens included)")
    local = args.model and (args.model.startswith((".", "/", "~")) or Path(args.model).exists())
    if local and not Path(args.model).expanduser().is_dir():
        parser.error(f"--model {args.model!r}: no such folder; expected a local model folder "
                     "(config.json + weights) or a model id")
    if args.search_params and not args.index_factory:
        parser.error("--search-params needs --index-factory: the automatic index calibrates its own")
    return args


def _search_params(text: str) -> dict[str, int]:
    """``"nprobe=64,k_factor=2"`` as ``{"nprobe": 64, "k_factor": 2}``."""
    params: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier() or not value.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INT[,KEY=INT], e.g. nprobe=64")
        params[key] = int(value)
    return params


def _load_module_class(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise CLIError(f"--model-class {spec!r}: expected 'module:Class'")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise CLIError(f"--model-class {spec!r}: cannot import ({err})") from None


def load_checkpoint_model(path: Path, class_spec: str) -> torch.nn.Module:
    """Instantiate the module from a checkpoint's hyper-parameters and load its weights (weights_only)."""
    if path.is_dir():
        raise CLIError(f"--checkpoint {str(path)!r} is a folder; expected a Lightning .ckpt file")
    if not path.is_file():
        raise CLIError(f"--checkpoint {str(path)!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise CLIError(f"--checkpoint {str(path)!r}: not a readable weights-only checkpoint "
                       f"({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CLIError(f"--checkpoint {str(path)!r}: no 'state_dict' inside; expected a Lightning checkpoint")
    cls = _load_module_class(class_spec)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    try:
        with warnings.catch_warnings():  # the error below says what failed, in one line
            warnings.simplefilter("ignore")
            model = cls(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as err:  # the checkpoint's hyper-parameters can point anywhere (e.g. a model folder
        # with a pickled payload, refused by weights_only): whatever fails, report it as one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"--checkpoint {str(path)!r} does not fit {class_spec}: {type(err).__name__}: "
                       f"{first[:300]}") from None
    if not callable(getattr(model, "embed", None)):
        raise CLIError(f"--model-class {class_spec}: the module has no embed(tokens) method")
    return model


def load_named_model(name: str | None) -> torch.nn.Module:
    """The encoder of ``--model`` (None: the offline default), weights-only; any failure to load it is one CLIError."""
    from naics_hnm.train.encoder import NAICSEncoder

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return NAICSEncoder(name)
    except Exception as err:  # transformers and torch raise many types for a foreign or unsafe folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"--model {name!r} cannot be loaded as an encoder: {type(err).__name__}: {first[:300]}; "
                       "expected a transformers model folder with safetensors or weights-only weights") from None


def _embed(model: torch.nn.Module, taxonomy, args: argparse.Namespace) -> np.ndarray:
    from naics_hnm.data.token_cache import TokenCache, load_tokenizer
    from naics_hnm.embedding import embed_codes

    tokenizer = load_tokenizer(args.model if args.model and not args.checkpoint else None)
    cache = TokenCache.from_texts(taxonomy.texts, tokenizer, args.max_length, codes=taxonomy.codes)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device)
    return embed_codes(model.embed, cache, batch_size=args.batch_size, device=device, module=model,
                       progress=not args.quiet, desc="embedding codes").cpu().numpy()


def run(args: argparse.Namespace) -> str:
    from naics_hnm.index.auto import build_index, choose_index
    from naics_hnm.embeddings_file import load_embeddings
    from naics_hnm.index.index_file import check_index_path, current_index_file, sidecar_path
    from naics_hnm.tree.taxonomy import load_taxonomy

    check_index_path(args.output)  # before anything is loaded or written
    t0 = time.perf_counter()
    taxonomy = load_taxonomy(args.taxonomy)
    if args.embeddings is not None:
        loaded = load_embeddings(args.embeddings, expected_codes=taxonomy.codes)
        embeddings, source = loaded.embeddings, f"embeddings file {args.embeddings}"
        model_name, epoch = str(loaded.attrs.get("model", "")), loaded.attrs.get("epoch")
    else:
        if args.checkpoint is not None:
            model = load_checkpoint_model(args.checkpoint, args.model_class)
            source, model_name = f"checkpoint {args.checkpoint}", str(args.checkpoint)
        else:
            model = load_named_model(args.model)
            source, model_name = f"model {model.model_name}", model.model_name
        embeddings, epoch = _embed(model, taxonomy, args), None
    if not np.isfinite(embeddings).all():
        bad = int(np.flatnonzero(~np.isfinite(embeddings).all(axis=1))[0])
        raise CLIError(f"embeddings from {source} contain NaN/inf (first at row {bad}, code {taxonomy.codes[bad]!r})")
    t1 = time.perf_counter()
    index, _ = build_index(embeddings, choose_index(len(embeddings), args.index_factory),
                           search_params=args.search_params, metric=args.metric, device=args.device,
                           codes=taxonomy.codes, model_fingerprint=model_name,
                           epoch=None if epoch in (None, -1) else int(epoch))
    index.save(args.output)
    t2 = time.perf_counter()
    params = f", search params {index.search_params}" if index.search_params else ""
    files = f"{sidecar_path(args.output).name} + {current_index_file(args.output).name}"
    return (f"Indexed {index.ntotal} codes (dim {index.dim}, metric {args.metric}, {index.index_type}{params}) from "
            f"{source} on {index.device}: embedding/loading {t1 - t0:.1f}s, index build + save {t2 - t1:.2f}s. Index "
            f"written to {args.output} (files {files}).")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_log = logging.getLogger("naics_hnm")
    package_log.addHandler(handler)
    package_log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print("rebuild_index: interrupted; the previous index is untouched", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, KeyError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"rebuild_index: error: {message}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
