"""Checkpoint conversion speed and memory (Hugging Face and Megatron-LM, both ways), beside `cp` of the same bytes, in one run.

    python benchmarks/convert.py                  # OpenLLaMA-3B shape, bf16 (~6.9 GB; ~21 GB of disk at peak)
    python benchmarks/convert.py --layers 4       # a quick look

Writes a random bf16 LLaMA2-shaped safetensors checkpoint tensor by tensor, then times
hf_to_mellama and mellama_to_hf, mellama_to_megatron and megatron_to_mellama in torch_dist (TP1)
and in the torch format (--megatron-tp x --megatron-pp rank files), each in its own process (peak
RSS from getrusage), and `cp` + `sync` of the source file. Targets: peak RSS under 25% of the
checkpoint, time within 2x of cp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mellama.checkpoint.convert import _safetensors_header  # noqa: E402

_CHILD = ("import resource, sys; from megatron_mellama.tools.{tool} import main; rc = main(sys.argv[1:]); "
          "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def write_source(d: Path, a) -> int:
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=a.layers,
               hidden_size=a.hidden, num_attention_heads=a.heads, num_key_value_heads=a.heads,
               intermediate_size=a.ffn, vocab_size=a.vocab, max_position_embeddings=2048, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    (d / "config.json").write_text(json.dumps(cfg))
    h, f = a.hidden, a.ffn
    shapes = {"embed_tokens.weight": (a.vocab, h)}
    for i in range(a.layers):
        p = f"layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (h, h), p + "self_attn.v_proj.weight": (h, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes.update({"norm.weight": (h,), "lm_head.weight": (a.vocab, h)})
    names = list(shapes)
    header, _ = _safetensors_header(names, shapes, {n: torch.bfloat16 for n in names})
    g = torch.Generator().manual_seed(0)
    with open(d / "model.safetensors", "wb") as fh:
        fh.write(header)
        for n in names:
            t = torch.empty(shapes[n], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            fh.write(memoryview(t.view(torch.uint8).numpy()))
    return sum(torch.Size(s).numel() for s in shapes.values())


def run(tool: str, argv: list) -> tuple[float, int]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(tool=tool), *argv, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    took = time.time() - start
    if proc.returncode:
        sys.exit(f"{tool} failed: {proc.stderr.strip()[-2000:]}")
    return took, int(proc.stdout.split("peak_rss_kb")[-1]) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--hidden", type=int, default=3200)
    p.add_argument("--ffn", type=int, default=8640)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--megatron-tp", type=int, default=2, help="TP of the torch-format Megatron-LM export")
    p.add_argument("--megatron-pp", type=int, default=2, help="PP of the torch-format Megatron-LM export")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=a.dir))
    try:
        src = root / "hf"
        src.mkdir()
        t = time.time()
        params = write_source(src, a)
        size = (src / "model.safetensors").stat().st_size
        print(f"source: {params / 1e9:.2f}B parameters, bf16, {size / 1e9:.2f} GB, written in {time.time() - t:.1f}s")
        t = time.time()
        subprocess.run(["cp", str(src / "model.safetensors"), str(root / "copy")], check=True)
        subprocess.run(["sync", str(root / "copy")], check=True)
        cp_s = time.time() - t
        (root / "copy").unlink()
        print(f"{'cp + sync':<38} {cp_s:7.1f}s {size / cp_s / 1e6:8.0f} MB/s")
        rows = [("hf_to_mellama", *run("hf_to_mellama", ["--hf-dir", str(src), "--save", str(root / "ours")]))]
        shutil.rmtree(src)
        rows.append(("mellama_to_hf", *run("mellama_to_hf", ["--load", str(root / "ours"),
                                                             "--hf-dir", str(root / "back")])))
        shutil.rmtree(root / "back")
        for fmt, tp, pp in (("torch_dist", 1, 1), ("torch", a.megatron_tp, a.megatron_pp)):
            rows.append((f"mellama_to_megatron {fmt} TP{tp} PP{pp}", *run("mellama_to_megatron", [
                "--load", str(root / "ours"), "--save", str(root / "megatron"), "--format", fmt,
                "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)])))
            rows.append((f"megatron_to_mellama {fmt} TP{tp} PP{pp}", *run("megatron_to_mellama", [
                "--load", str(root / "megatron"), "--save", str(root / "again")])))
            shutil.rmtree(root / "megatron")
            shutil.rmtree(root / "again")
        for name, took, rss in rows:
            print(f"{name:<38} {took:7.1f}s {size / took / 1e6:8.0f} MB/s   {took / cp_s:4.2f}x cp   "
                  f"peak RSS {rss / 1e9:.2f} GB = {100 * rss / size:.1f}% of the checkpoint")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
