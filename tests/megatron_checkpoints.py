"""Megatron-LM checkpoints written by megatron-core itself, on the CPU, for the import and export tests.

`write_megatron_checkpoint` builds megatron-core's `GPTModel` (local spec) at TP1 PP1 with seeded
weights, saves it with `dist_checkpointing` to a scratch folder and computes its logits; then
tp x pp gloo ranks build their shards of the same model, load that scratch checkpoint (megatron
reshards it) and save it the way Megatron-LM's `save_checkpoint` does: `torch_dist` through
`dist_checkpointing.save`, or `torch` as one `model_optim_rng.pt` per model-parallel rank (with
megatron-core, Transformer Engine or legacy names, see megatron_torch_format.py).
`megatron_logits` loads a torch_dist iteration folder into a TP1 PP1 model and runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import tempfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from engine_harness import spawn_gloo

# what a Megatron-LM torch_dist checkpoint holds besides the model (a model-only load leaves them)
NON_MODEL_KEYS = ("rng_state", "optimizer.", "rerun_state_machine")
# Megatron-LM's content metadata of a save without a distributed optimizer (_build_sharded_state_dict_metadata)
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


@dataclasses.dataclass
class MegatronCheckpoint:
    root: str                  # what Megatron-LM's --save names
    iteration_dir: str         # root/iter_0000007 or root/release
    tokens: torch.Tensor       # [2, 16] int64, the inputs of `logits`
    logits: torch.Tensor       # [2, 16, padded_vocab_size] float32, megatron-core's TP1 PP1 forward
    vocab_size: int            # the tokenizer's; rows beyond it are Megatron's padding
    padded_vocab_size: int
    args: argparse.Namespace   # as saved


@contextlib.contextmanager
def megatron_cpu():
    """megatron-core's CUDA-only calls on the model's path made harmless, for CPU tests."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
        del tracker.fork


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's rule: the vocabulary rounded up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def megatron_args(spec: dict) -> argparse.Namespace:
    """The architecture and run arguments Megatron-LM saves, as its argument parser names them."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    tp, pp, vp = spec["tp"], spec["pp"], spec["vp"]
    heads, groups = spec["num_attention_heads"], spec["num_query_groups"]
    args = argparse.Namespace(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], ffn_hidden_size=spec["ffn_hidden_size"],
        num_attention_heads=heads, group_query_attention=groups != heads, num_query_groups=groups,
        kv_channels=spec["hidden_size"] // heads, max_position_embeddings=spec["max_position_embeddings"],
        seq_length=spec["seq_length"], encoder_seq_length=spec["seq_length"], position_embedding_type="rope",
        rotary_base=spec["rotary_base"], rotary_percent=1.0, rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None, use_rope_scaling=False, rope_scaling_factor=8.0,
        rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0, yarn_original_max_position_embeddings=None,
        yarn_beta_fast=None, yarn_beta_slow=None, yarn_correction_range_round_to_int=None,
        normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=True, add_bias_linear=False,
        add_qkv_bias=False, apply_residual_connection_post_layernorm=False, qk_layernorm=False,
        multi_latent_attention=False, num_experts=None, mtp_num_layers=None, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.02, padded_vocab_size=spec["padded_vocab_size"],
        make_vocab_size_divisible_by=spec["make_vocab_size_divisible_by"], vocab_size=None,
        tokenizer_type="Llama2Tokenizer", tokenizer_model="/nonexistent/tokenizer.model",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
        num_layers_per_virtual_pipeline_stage=None if vp is None else spec["num_layers"] // (pp * vp),
        context_parallel_size=1, expert_model_parallel_size=1, sequence_parallel=False,
        data_parallel_size=1, world_size=tp * pp, rank=0, params_dtype=torch.float32, bf16=False, fp16=False,
        transformer_impl="transformer_engine" if spec["names"] == "te" else "local",
        use_legacy_models=spec["names"] == "legacy", ckpt_format=spec["fmt"], use_dist_ckpt=spec["fmt"] != "torch",
        use_distributed_optimizer=False, attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        micro_batch_size=2, global_batch_size=8, train_iters=spec["iteration"], lr=3e-4, min_lr=3e-5,
        lr_decay_style="cosine", weight_decay=0.1, clip_grad=1.0, seed=1234, save=spec["root"], load=None,
        iteration=spec["iteration"], consumed_train_samples=8 * spec["iteration"], consumed_valid_samples=0,
        no_save_optim=None, no_save_rng=None)
    setattr(args, spec["epsilon_arg"], spec["norm_epsilon"])
    for name, value in (spec["args_overrides"] or {}).items():
        setattr(args, name, value)
    return args


def build_model(spec: dict, tp: int = 1, pp: int = 1, vp: int | None = None, vp_stage: int | None = None,
                pre_process: bool = True, post_process: bool = True):
    """megatron-core's GPTModel (local spec) for `spec`, this rank's share of it."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"],
        num_attention_heads=spec["num_attention_heads"], num_query_groups=spec["num_query_groups"],
        ffn_hidden_size=spec["ffn_hidden_size"], normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=spec["norm_epsilon"],
        params_dtype=torch.float32, pipeline_dtype=torch.float32, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=spec["padded_vocab_size"],
                    max_sequence_length=spec["max_position_embeddings"], pre_process=pre_process,
                    post_process=post_process, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False, rotary_base=spec["rotary_base"], vp_stage=vp_stage)


def seed_weights(model, seed: int) -> None:
    """Seeded weights, the same for a name whatever else the model holds: matrices ~ N(0, 1/fan_in)
    (logits of order one, so a wrong layout shows), norms around one (so a swapped norm shows)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=g))
            elif "word_embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) / param.shape[1] ** 0.5)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    s = tokens.shape[1]
    position_ids = torch.arange(s).unsqueeze(0).expand_as(tokens)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]  # True = masked
    model.eval()
    with torch.no_grad():
        return model(tokens, position_ids, causal).float()


def model_chunks(spec: dict) -> list:
    """This rank's model chunks, as Megatron-LM's get_model builds them (one per virtual stage)."""
    from megatron.core import parallel_state as ps

    tp, pp, vp = spec["tp"], spec["pp"], spec["vp"]
    if vp is None:
        return [build_model(spec, tp, pp, None, None, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())]
    return [build_model(spec, tp, pp, vp, i, ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                        ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i)) for i in range(vp)]


def model_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_metadata() -> dict:
    from megatron.core import parallel_state as ps

    return dict(CONTENT_METADATA, dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))


def load_model_strictly(chunks: list, checkpoint_dir: str, allow_missing: tuple = NON_MODEL_KEYS) -> None:
    """The chunks' weights from a torch_dist folder: every key they ask for must be there, and
    every key there that they leave must be one of `allow_missing` (optimizer, RNG, ...)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    request = {key: chunk.sharded_state_dict(metadata=sharded_metadata())
               for key, chunk in zip(model_keys(chunks), chunks)}
    loaded, missing, unexpected = dist_checkpointing.load(request, checkpoint_dir, strict=StrictHandling.RETURN_ALL)
    stray = sorted(k for k in missing if not k.startswith(allow_missing))
    if unexpected or stray:
        raise AssertionError(f"{checkpoint_dir}: absent {sorted(unexpected)}, not asked for {stray}")
    for key, chunk in zip(model_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=True)


def rng_state() -> dict:
    """Megatron-LM's get_rng_state entry for this rank (the CUDA states as the byte tensors CUDA gives)."""
    cuda_like = torch.get_rng_state()
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda_like.clone(),
            "rng_tracker_states": {"model-parallel-rng": cuda_like.clone()}}


def scheduler_state(spec: dict) -> dict:
    steps = spec["iteration"] * 8
    return {"max_lr": 3e-4, "lr_warmup_steps": 0, "num_steps": steps, "lr_decay_style": "cosine",
            "lr_decay_steps": 1000 * 8, "min_lr": 3e-5, "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant",
            "wd_incr_steps": 1000 * 8}


def adam_after_one_step(chunks: list, seed: int):
    """A torch AdamW over the chunks' parameters holding the state of one step; its step is taken at
    learning rate 0 (the weights stay exactly as they are) and the rate set afterwards."""
    params = [p for chunk in chunks for p in chunk.parameters()]
    adam = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, generator=g)
    adam.step()
    for p in params:
        p.grad = None
    for group in adam.param_groups:
        group["lr"] = 3e-4
    return adam


def sharded_optimizer_state(chunks: list, model_state: dict, seed: int) -> dict:
    """megatron-core's FP32Optimizer.sharded_state_dict (the non-distributed optimizer of an fp32
    run): `optimizer.state.exp_avg.<parameter key>` tensors sharded as the parameters.
    Its constructor allocates a CUDA scalar the sharded state does not use, so it is skipped."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    optimizer = object.__new__(FP32Optimizer)
    optimizer.optimizer = adam_after_one_step(chunks, seed)
    optimizer.config = OptimizerConfig(optimizer="adam", lr=3e-4, params_dtype=torch.float32)
    optimizer.init_state_fn = None
    return optimizer.sharded_state_dict(model_state, metadata=sharded_metadata())


def save_torch_dist(spec: dict, chunks: list, iteration_dir: str) -> None:
    """What save_checkpoint hands dist_checkpointing.save for ckpt_format torch_dist."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"args": megatron_args(spec), "checkpoint_version": 3.0, "iteration": spec["iteration"]}
    # singleton_local_shards: per-layer keys, fc1's halves as `_w` / `_v` (a model-only save: the
    # optimizer's sharded state follows the model's metadata)
    singleton = spec.get("singleton_local_shards", False)
    metadata = dict(sharded_metadata(), singleton_local_shards=singleton)
    for key, chunk in zip(model_keys(chunks), chunks):
        state[key] = chunk.sharded_state_dict(metadata=metadata)
    if not singleton:
        state["optimizer"] = sharded_optimizer_state(chunks, state, spec["seed"])
    state["opt_param_scheduler"] = scheduler_state(spec)
    grid = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    state["rng_state"] = ShardedObject(
        "rng_state", [rng_state()], grid, (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    state["num_floating_point_operations_so_far"] = 1.5e12 * spec["iteration"]
    dist_checkpointing.save(state, iteration_dir, content_metadata=dict(CONTENT_METADATA,
                                                                        singleton_local_shards=singleton))


def save_torch(spec: dict, chunks: list, iteration_dir: str) -> None:
    """save_checkpoint's legacy format: this model-parallel rank's model_optim_rng.pt."""
    from megatron.core import parallel_state as ps

    from megatron_torch_format import rank_file_name, torch_format_state

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    optimizer = adam_after_one_step(chunks, spec["seed"]).state_dict()
    state = torch_format_state(spec, megatron_args(spec), chunks, model_keys(chunks), optimizer, rng_state(),
                               scheduler_state(spec))
    path = os.path.join(iteration_dir, rank_file_name(tp_rank, pp_rank, spec["pp"] > 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def _write_rank(rank: int, world: int, spec: dict, scratch: str) -> dict:
    """Rank `rank` of tp x pp: the TP1 PP1 reference (every rank a data-parallel replica), then
    this rank's shard of it, loaded from the reference's torch_dist save and saved as asked."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    result = {}
    with megatron_cpu():
        ps.initialize_model_parallel(1, 1)
        reference = build_model(spec)
        seed_weights(reference, spec["seed"])
        dist_checkpointing.save({"model": reference.sharded_state_dict(metadata=sharded_metadata())}, scratch,
                                content_metadata=dict(CONTENT_METADATA))
        if rank == 0:
            result["logits"] = forward_logits(reference, torch.tensor(spec["tokens"]))
        ps.destroy_model_parallel()
        dist.barrier()

        ps.initialize_model_parallel(tensor_model_parallel_size=spec["tp"], pipeline_model_parallel_size=spec["pp"],
                                     virtual_pipeline_model_parallel_size=spec["vp"])
        try:
            chunks = model_chunks(spec)
            load_model_strictly(chunks, scratch, allow_missing=())
            (save_torch_dist if spec["fmt"] == "torch_dist" else save_torch)(spec, chunks, spec["iteration_dir"])
            dist.barrier()
        finally:
            ps.destroy_model_parallel()
    return result


def write_megatron_checkpoint(root, *, fmt="torch_dist", tp=1, pp=1, vp=None, names="mcore", extra_state="none",
                              epsilon_arg="layernorm_epsilon", release=False, iteration=7, num_layers=4,
                              hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                              vocab_size=100, make_vocab_size_divisible_by=16, seq_length=16,
                              max_position_embeddings=64, rotary_base=10000, norm_epsilon=1e-5, seed=0,
                              args_overrides=None, singleton_local_shards=False) -> MegatronCheckpoint:
    """A Megatron-LM checkpoint root of a tiny LLaMA-style model, as save_checkpoint writes it."""
    if fmt not in ("torch_dist", "torch"):
        raise ValueError(f"fmt {fmt!r}: torch_dist or torch")
    if names not in ("mcore", "te", "legacy") or (fmt == "torch_dist" and names != "mcore"):
        raise ValueError(f"names {names!r} with fmt {fmt!r}: torch_dist has megatron-core's own keys")
    if extra_state not in ("none", "tensor", "bytesio"):
        raise ValueError(f"extra_state {extra_state!r}: none, tensor or bytesio")
    if vp is not None and (pp < 2 or num_layers % (pp * vp)):
        raise ValueError(f"vp {vp}: needs pp > 1 and num_layers divisible by pp x vp")
    root = os.path.abspath(root)
    iteration_dir = os.path.join(root, "release" if release else f"iter_{iteration:07d}")
    tokens = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    spec = dict(fmt=fmt, tp=tp, pp=pp, vp=vp, names=names, extra_state=extra_state, epsilon_arg=epsilon_arg,
                iteration=0 if release else iteration, num_layers=num_layers, hidden_size=hidden_size,
                num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
                ffn_hidden_size=ffn_hidden_size, vocab_size=vocab_size,
                padded_vocab_size=padded_vocab(vocab_size, make_vocab_size_divisible_by, tp),
                make_vocab_size_divisible_by=make_vocab_size_divisible_by, seq_length=seq_length,
                max_position_embeddings=max_position_embeddings, rotary_base=rotary_base, norm_epsilon=norm_epsilon,
                seed=seed, args_overrides=dict(args_overrides or {}), root=root, iteration_dir=iteration_dir,
                tokens=tokens.tolist(), singleton_local_shards=singleton_local_shards)
    with tempfile.TemporaryDirectory(prefix="megatron-reference-") as work:
        scratch, out = os.path.join(work, "reference"), os.path.join(work, "ranks")
        for folder in (scratch, out, iteration_dir):
            os.makedirs(folder, exist_ok=True)
        results = spawn_gloo(_write_rank, tp * pp, (spec, scratch), out)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release" if release else str(iteration))
    return MegatronCheckpoint(root=root, iteration_dir=iteration_dir, tokens=tokens, logits=results[0]["logits"],
                              vocab_size=vocab_size, padded_vocab_size=spec["padded_vocab_size"],
                              args=megatron_args(spec))


def _logits_rank(rank: int, world: int, spec: dict, iteration_dir: str, tokens: list) -> dict:
    from megatron.core import parallel_state as ps

    with megatron_cpu():
        ps.initialize_model_parallel(1, 1)
        try:
            model = build_model(spec)
            load_model_strictly([model], iteration_dir)
            return {"logits": forward_logits(model, torch.tensor(tokens))}
        finally:
            ps.destroy_model_parallel()


def megatron_logits(iteration_dir, tokens, **model_kwargs) -> torch.Tensor:
    """megatron-core's own logits of a torch_dist iteration folder: a TP1 PP1 GPTModel of
    `model_kwargs` (write_megatron_checkpoint's names, those that do not shape the model ignored;
    the padded vocabulary from `padded_vocab_size`, else the folder's saved args, else vocab_size
    at `tp`) loaded strictly: every key the model asks for must be there, and nothing else but
    the optimizer and RNG state."""
    defaults = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    vocab_size=100, make_vocab_size_divisible_by=16, max_position_embeddings=64, rotary_base=10000,
                    norm_epsilon=1e-5, tp=1)
    # write_megatron_checkpoint's other arguments may come along; they do not shape the model
    ignored = {"padded_vocab_size", "seq_length", "fmt", "pp", "vp", "names", "extra_state", "epsilon_arg", "release",
               "iteration", "seed", "args_overrides"}
    unknown = set(model_kwargs) - set(defaults) - ignored
    if unknown:
        raise TypeError(f"megatron_logits: unknown arguments {sorted(unknown)}")
    spec = dict(defaults, **{k: v for k, v in model_kwargs.items() if k in defaults or k == "padded_vocab_size"})
    if "padded_vocab_size" not in spec:
        common = os.path.join(iteration_dir, "common.pt")
        saved = torch.load(common, weights_only=False).get("args") if os.path.exists(common) else None
        spec["padded_vocab_size"] = getattr(saved, "padded_vocab_size", None) or padded_vocab(
            spec["vocab_size"], spec["make_vocab_size_divisible_by"], spec["tp"])
    with tempfile.TemporaryDirectory(prefix="megatron-logits-") as out:
        result = spawn_gloo(_logits_rank, 1, (spec, os.path.abspath(iteration_dir), torch.as_tensor(tokens).tolist()),
                            out)
    return result[0]["logits"]


_WRITTEN: dict = {}


def shared_megatron_checkpoint(base_dir: str, **kwargs) -> MegatronCheckpoint:
    """`write_megatron_checkpoint(**kwargs)` once per test process for each set of arguments, under
    `base_dir`: the roots are read, never changed, by the tests that share them."""
    key = repr(sorted(kwargs.items()))
    if key not in _WRITTEN:
        _WRITTEN[key] = write_megatron_checkpoint(os.path.join(base_dir, f"root{len(_WRITTEN)}"), **kwargs)
    return _WRITTEN[key]
