"""--sft: whole conversations packed per sample with the preprocess loss mask, every conversation once
per epoch, packed losses equal to each conversation's alone, a run end to end, mismatched pairs."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corpus_helpers import read_documents, write_jsonl
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.data.loader import collate_for
from megatron_mellama.data.sft_dataset import SFTDataset, pair_of
from megatron_mellama.model import build_model
from megatron_mellama.pretrain import load_run_config
from megatron_mellama.tools.preprocess_sft import main as preprocess_sft
from megatron_mellama.training.loop import train

SEQ = 128
EOS = 2  # the sentencepiece_model fixture's
WORDS = "the patient trial dose risk treatment small large after test care health doctor".split()


def conversation(rng, turns, words):
    """`turns` turns of up to `words` random words each."""
    def text(n):
        return " ".join(rng.choice(WORDS, n))

    messages = []
    for _ in range(turns):
        messages += [{"role": "user", "content": text(rng.randint(1, words))},
                     {"role": "assistant", "content": text(rng.randint(1, words))}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def sft_prefix(sentencepiece_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rng = np.random.RandomState(0)
    records = [conversation(rng, rng.randint(1, 4), 5) for _ in range(60)]
    records[7] = conversation(rng, 8, 12)  # longer than a sample: cut to one
    prefix = root / "med_sft"
    rc = preprocess_sft(["--input", str(write_jsonl(root / "chat.jsonl", records)), "--output-prefix", str(prefix),
                         "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sentencepiece_model,
                         "--seq-length", "200", "--overlong", "truncate"])
    assert rc == 0
    return str(prefix)


def conversations_of(prefix):
    tokens, masks = (read_documents(p) for p in pair_of(prefix))
    return tokens, masks


def _write_documents(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint8)
    for doc in documents:
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")


def test_samples_hold_whole_conversations_with_their_masks(sft_prefix):
    tokens, masks = conversations_of(sft_prefix)
    ds = SFTDataset(sft_prefix, (0.0, 1.0), SEQ, seed=1, eod=EOS)
    assert len(ds) > 1 and 0 < ds.padding_fraction < 1
    for i in range(len(ds)):
        sample = ds[i]
        seq = torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy()
        # the mask of a sequence of SEQ + 1 tokens, shifted like the labels
        full_mask = np.concatenate([[0], sample["loss_mask"].numpy()])
        positions = sample["position_ids"].numpy()
        at = 0
        for doc in ds.conversations(i):
            n = min(len(tokens[doc]), SEQ + 1)
            assert np.array_equal(seq[at:at + n], tokens[doc][:n])
            assert np.array_equal(full_mask[at + 1:at + n], masks[doc][1:n])  # its first token is BOS, mask 0
            assert np.array_equal(positions[at:min(at + n, SEQ)], np.arange(min(n, SEQ - at)))
            at += n
        assert (seq[at:] == EOS).all() and not full_mask[at:].any()
        if at < SEQ:  # the padding is a document of its own
            assert np.array_equal(positions[at:], np.arange(SEQ - at))
        assert sample["labels"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32


def test_every_conversation_of_the_split_once_per_epoch(sft_prefix):
    n = len(read_documents(pair_of(sft_prefix)[0]))
    bounds = (0.25, 0.75)
    beg, end = round(0.25 * n), round(0.75 * n)
    ds = SFTDataset(sft_prefix, bounds, SEQ, seed=7, eod=EOS)
    seen = np.concatenate([ds.conversations(i) for i in range(len(ds))])
    assert sorted(seen.tolist()) == list(range(beg, end))
    other = SFTDataset(sft_prefix, bounds, SEQ, seed=8, eod=EOS)
    assert not np.array_equal(np.concatenate([other.conversations(i) for i in range(len(other))]), seen)
    # the order is fixed by the seed alone
    again = SFTDataset(sft_prefix, bounds, SEQ, seed=7, eod=EOS)
    assert all(torch.equal(again[i]["tokens"], ds[i]["tokens"]) for i in range(len(ds)))


def test_packed_loss_is_the_sum_of_the_conversations_alone(sft_prefix):
    cfg = parse_config(["--model", "tiny", "--vocab-size", "512", "--seq-length", str(SEQ), "--sft",
                        "--data-path", sft_prefix, "--tokenizer-model", "unused"])
    model = build_model(cfg.model, seed=3)
    ds = SFTDataset(sft_prefix, (0.0, 1.0), SEQ, seed=1, eod=EOS)
    tokens, masks = conversations_of(sft_prefix)
    i = max(range(len(ds)), key=lambda k: len(ds.conversations(k)))
    assert len(ds.conversations(i)) >= 3
    batch = collate_for(cfg)([ds[i]])
    with torch.no_grad():
        logits = model(batch["tokens"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        packed = (F.cross_entropy(logits[0].float(), batch["labels"][0], reduction="none")
                  * batch["loss_mask"][0]).sum()
        alone = 0.0
        for doc in ds.conversations(i):
            seq = torch.as_tensor(tokens[doc][:SEQ + 1], dtype=torch.int64)
            mask = torch.as_tensor(masks[doc][:SEQ + 1], dtype=torch.float32)
            logits = model(seq[None, :-1])[0]
            alone = alone + (F.cross_entropy(logits.float(), seq[1:], reduction="none") * mask[1:]).sum()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sft_run_end_to_end(sft_prefix, sentencepiece_model, tmp_path, capsys):
    # a second dataset, validated on its own as pretraining's domains are
    other = str(tmp_path / "clin_sft")
    for source, target in zip(pair_of(sft_prefix), pair_of(other)):
        for ext in (".bin", ".idx"):
            shutil.copy(source + ext, target + ext)
    run = ["--model", "tiny", "--sft", "--data-path", "3", sft_prefix, "1", other,
           "--tokenizer-model", sentencepiece_model,
           "--split", "80,20,0", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
           "--lr", "3e-3", "--train-iters", "3", "--eval-iters", "1", "--eval-interval", "3", "--log-interval", "1",
           "--num-workers", "0"]
    history = train(load_run_config(run))
    assert history["iteration"] == 3 and len(history["losses"]) == 3
    assert all(math.isfinite(loss) for loss in history["losses"])
    out = capsys.readouterr().out
    assert out.count("% padding") == 2
    assert "lm loss validation/med_sft" in out and "lm loss validation/clin_sft" in out


def sft_run(prefix, tokenizer, *flags):
    return ["--model", "tiny", "--vocab-size", "512", "--sft", "--data-path", prefix, "--tokenizer-model", tokenizer,
            "--split", "100,0,0", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "3e-3", "--log-interval", "1", "--num-workers", "0", *flags]


@pytest.mark.slow
def test_sft_resumes_exactly_and_exports_its_chat_template(sft_prefix, sentencepiece_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    from megatron_mellama.data.chat_template import LLAMA2_CHAT_TEMPLATE
    from megatron_mellama.tools.mellama_to_hf import main as export

    whole = train(load_run_config(sft_run(sft_prefix, sentencepiece_model, "--train-iters", "4")))
    save = str(tmp_path / "ckpt")
    train(load_run_config(sft_run(sft_prefix, sentencepiece_model, "--train-iters", "4", "--save", save,
                                  "--exit-interval", "2")))
    resumed = train(load_run_config(sft_run(sft_prefix, sentencepiece_model, "--train-iters", "4", "--save", save,
                                            "--load", save)))
    assert resumed["start_iteration"] == 2 and resumed["losses"] == whole["losses"][2:]  # bitwise
    state = json.loads((tmp_path / "ckpt" / "iter_0000004" / "train_state.json").read_text())
    assert state["extra"]["chat_template"] == LLAMA2_CHAT_TEMPLATE

    # the export carries the template: transformers renders a conversation into the ids trained on
    hf_dir = tmp_path / "hf"
    assert export(["--load", save, "--hf-dir", str(hf_dir), "--tokenizer-model", sentencepiece_model,
                   "--no-progress"]) == 0
    assert "the chat template in tokenizer_config.json" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(hf_dir)
    record = conversation(np.random.RandomState(5), 2, 5)
    rc = preprocess_sft(["--input", str(write_jsonl(tmp_path / "one.jsonl", [record])), "--output-prefix",
                         str(tmp_path / "one"), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                         sentencepiece_model])
    assert rc == 0
    trained_on = conversations_of(str(tmp_path / "one"))[0][0].tolist()
    assert tok.apply_chat_template(record["messages"], tokenize=True, return_dict=False) == trained_on
    assert export(["--load", save, "--hf-dir", str(tmp_path / "plain"), "--tokenizer-model", sentencepiece_model,
                   "--chat-template", "none", "--no-progress"]) == 0
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_prefixes_without_one_template_record_none(sft_prefix, sentencepiece_model, tmp_path, capsys):
    other = str(tmp_path / "other")
    for source, target in zip(pair_of(sft_prefix), pair_of(other)):
        for ext in (".bin", ".idx"):
            shutil.copy(source + ext, target + ext)
    save = str(tmp_path / "ckpt")
    train(load_run_config(sft_run(sft_prefix, sentencepiece_model, "--train-iters", "1", "--save", save,
                                  "--data-path", "1", sft_prefix, "1", other)))
    assert f"no chat template beside {other}" in capsys.readouterr().out
    state = json.loads((tmp_path / "ckpt" / "iter_0000001" / "train_state.json").read_text())
    assert "chat_template" not in state["extra"]


# --- every layout trains the same on SFT batches ----------------------------------------------------

SFT_LAYOUTS = {"tp2-pp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--pipeline-model-parallel-size", "2"]),
               "dp2-fsdp": (2, ["--data-parallel-sharding", "full"])}


@pytest.fixture(scope="module")
def sft_layout_run(sft_prefix, sentencepiece_model):
    from engine_harness import reference

    argv = sft_run(sft_prefix, sentencepiece_model, "--num-layers", "4", "--global-batch-size", "8",
                   "--train-iters", "3", "--seed", "11", "--clip-grad", "1.0", "--lr", "1e-3")
    return argv, reference(argv, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SFT_LAYOUTS))
def test_sft_layout_equals_one_process(name, sft_layout_run, tmp_path):
    from engine_harness import assert_matches, run_distributed

    argv, ref = sft_layout_run
    world, flags = SFT_LAYOUTS[name]
    assert_matches(run_distributed(argv + flags, world, 3, str(tmp_path)), ref, 1e-5)


def test_sft_flags():
    cfg = parse_config(["--model", "tiny", "--sft", "--data-path", "p", "--tokenizer-model", "t"])
    assert cfg.data.reset_position_ids and cfg.data.reset_attention_mask
    with pytest.raises(ConfigError, match="--sft .* --mock-data"):
        parse_config(["--model", "tiny", "--sft", "--mock-data"])


def test_mismatched_pair_fails_with_one_line(sft_prefix, sentencepiece_model, tmp_path):
    broken = str(tmp_path / "broken")
    text, mask = pair_of(sft_prefix)
    for ext in (".bin", ".idx"):
        shutil.copy(text + ext, pair_of(broken)[0] + ext)
    # a loss mask that lost its last conversation
    _write_documents(pair_of(broken)[1], read_documents(mask)[:-1])
    cfg = parse_config(["--model", "tiny", "--sft", "--data-path", broken, "--tokenizer-model", sentencepiece_model,
                        "--seq-length", str(SEQ), "--train-iters", "1", "--global-batch-size", "1"])
    with pytest.raises(ConfigError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert "\n" not in message and pair_of(broken)[1] in message and "documents" in message
    assert os.path.basename(broken) in message


def _copy_pair(source, target):
    for src, dst in zip(pair_of(source), pair_of(target)):
        for ext in (".bin", ".idx"):
            shutil.copy(src + ext, dst + ext)


def test_sft_prefix_spelt_two_ways_is_one_domain(sft_prefix, sentencepiece_model, tmp_path, monkeypatch):
    _copy_pair(sft_prefix, str(tmp_path / "gen_sft"))
    _copy_pair(sft_prefix, str(tmp_path / "clin_sft"))
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["--model", "tiny", "--sft", "--data-path", "2", "gen_sft", "2", "./gen_sft", "1", "clin_sft",
                        "--tokenizer-model", sentencepiece_model, "--split", "80,20,0", "--seq-length", str(SEQ),
                        "--train-iters", "2", "--global-batch-size", "4"])
    sets = build_datasets(cfg)
    streams = sets.train.streams
    assert sorted(sets.train.names.values()) == ["clin_sft", "gen_sft"]
    # each domain's stream reads its own prefix's conversations
    assert all(os.path.abspath(s.one_epoch.prefix) == key for key, s in streams.items())
    assert sets.train.segments[-1]["weights"][os.path.abspath("gen_sft")] == pytest.approx(0.8)


@pytest.mark.slow
def test_conversations_whose_answers_fall_past_the_cut(sentencepiece_model, tmp_path, capsys):
    # long questions, short answers: at --seq-length 32 every answer lies past the cut
    rng = np.random.RandomState(1)
    records = [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, 40))},
                             {"role": "assistant", "content": "small risk"}]} for _ in range(12)]
    prefix = str(tmp_path / "long_sft")
    assert preprocess_sft(["--input", str(write_jsonl(tmp_path / "long.jsonl", records)), "--output-prefix", prefix,
                           "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sentencepiece_model]) == 0
    run = ["--model", "tiny", "--sft", "--data-path", prefix, "--tokenizer-model", sentencepiece_model,
           "--split", "100,0,0", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--train-iters", "2", "--log-interval", "1", "--num-workers", "0"]
    with pytest.raises(ConfigError) as err:
        train(load_run_config(run))
    assert "\n" not in str(err.value) and "holds no trained token" in str(err.value)
    out = capsys.readouterr().out
    assert "12 conversations cut to --seq-length 32 + 1 tokens, 12 of them with no answer token left" in out
    assert "lm loss" not in out  # no step was reported


def test_a_validation_batch_without_trained_tokens_is_an_error():
    from engine_harness import TINY, global_batches, micro_batches_of
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(TINY)
    engine = Engine(cfg)
    batch = global_batches(cfg, 1)[0]
    assert math.isfinite(engine.evaluate(micro_batches_of(batch, cfg, 0, 1)))
    batch["loss_mask"].zero_()
    with pytest.raises(ConfigError, match="a validation batch holds no trained token"):
        engine.evaluate(micro_batches_of(batch, cfg, 0, 1))
    with pytest.raises(ConfigError, match="a training step's global batch holds no trained token"):
        engine.step(micro_batches_of(batch, cfg, 0, 1))


def test_eod_mask_loss_is_refused_with_sft(sft_prefix, sentencepiece_model):
    cfg = parse_config(["--model", "tiny", "--sft", "--eod-mask-loss", "--data-path", sft_prefix,
                        "--tokenizer-model", sentencepiece_model, "--seq-length", str(SEQ), "--train-iters", "1",
                        "--global-batch-size", "1"])
    with pytest.raises(ConfigError, match=r"^--eod-mask-loss does not apply to --sft: [^\n]*$"):
        build_datasets(cfg)
