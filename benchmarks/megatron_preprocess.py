"""Runs Megatron-LM's own preprocessing tools from a checkout on a CPU machine, for benchmarks/preprocess.py.

    python benchmarks/megatron_preprocess.py run DIR tools/preprocess_data.py --input ... (the tool's flags)
    python benchmarks/megatron_preprocess.py hf-tokenizer tokenizer.model OUT_DIR

`run` puts the checkout DIR first on sys.path (the installed megatron-core package would otherwise
shadow the checkout's `megatron`, and the tools need the checkout's megatron.training) and runs the tool
as __main__. The one thing the checkout needs on Python 3.11 is `typing.override` (3.12+), which
megatron/training/models/hybrid.py imports: it is set to typing_extensions.override here, in this
process only; nothing in the checkout is changed. Nothing else is stubbed or installed.

`hf-tokenizer` writes a HuggingFace tokenizer directory (tokenizer.json) equal to a LLaMA SentencePiece
BPE model, because Megatron-LM's tools/preprocess_data_fast.py cannot use a SentencePiece model:
with `--tokenizer-type Llama2Tokenizer` megatron.core.tokenizers picks its `sentencepiece` library,
whose tokenize_files raises NotImplementedError ("supported only for `huggingface` and `megatron`
libraries"); gigatoken (`--use-gigatoken`) is reached only through `--tokenizer-type
HuggingFaceTokenizer`. transformers 5's own LlamaConverter fails on this path (SpmConverter passes the
vocabulary where SentencePieceExtractor.extract expects the model class), so the tokenizer is built
here as HuggingFace's LLaMA tokenizer.json is: BPE with byte fallback over the model's pieces and
merges, a "▁" prepended and spaces replaced by "▁", <unk> <s> </s> as special added tokens, and no
post-processor (no BOS added, as Megatron-LM's Llama2Tokenizer path adds none).
"""

from __future__ import annotations

import os
import runpy
import sys


def run_tool(checkout: str, tool: str, argv: list[str]) -> None:
    import typing

    if not hasattr(typing, "override"):  # Python < 3.12
        import typing_extensions

        typing.override = typing_extensions.override
    checkout = os.path.abspath(checkout)
    sys.path.insert(0, checkout)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
    path = tool if os.path.isabs(tool) else os.path.join(checkout, tool)
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


def write_hf_tokenizer(model: str, out_dir: str) -> str:
    """A HuggingFace tokenizer directory whose ids are the SentencePiece model's (LLaMA's layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    specials = [sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())]
    found = SentencePieceExtractor(model).extract(BPE)
    tok = Tokenizer(BPE(found["vocab"], found["merges"], unk_token=specials[0], fuse_unk=True, byte_fallback=True,
                        dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
    probe = "Hello world, 2024: naïve café 🦙\n\tend"
    if tok.encode(probe).ids != sp.encode(probe):
        raise SystemExit(f"the HuggingFace tokenizer built from {model} does not encode like it; nothing written")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1],
                                 eos_token=specials[2])
    hf.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        run_tool(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 4 and sys.argv[1] == "hf-tokenizer":
        print(write_hf_tokenizer(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
