"""tools/preprocess_sft.py: LLaMA-2-chat ids as transformers renders them, loss masks on answers only,
instruction records, bad records, over-long conversations, atomic outputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from corpus_helpers import read_documents, write_jsonl
from megatron_mellama.data.chat_template import LLAMA2_CHAT_TEMPLATE
from megatron_mellama.data.indexed_writer import output_lock
from megatron_mellama.tools.preprocess_sft import main

ONE_TURN = [{"role": "user", "content": "What is the risk of the treatment?"},
            {"role": "assistant", "content": "The risk is small in the trial."}]
MULTI_TURN = ONE_TURN + [{"role": "user", "content": "  And the dose? "},
                         {"role": "assistant", "content": "A large dose, after the test.\n"},
                         {"role": "user", "content": "Thanks"},
                         {"role": "assistant", "content": "Care (health) 2024!"}]
WITH_SYSTEM = [{"role": "system", "content": "You are a clinical doctor."}] + MULTI_TURN[:4]
CONVERSATIONS = {"one turn": ONE_TURN, "multi turn": MULTI_TURN, "system": WITH_SYSTEM}


@pytest.fixture(scope="module")
def llama2_chat_dir(hf_tokenizer_dir, tmp_path_factory):
    """A LLaMA-2 tokenizer directory as meta-llama/Llama-2-7b-chat-hf ships one: the test's vocabulary,
    the legacy behaviour of the original tokenizer (text after <s> gets SentencePiece's leading space,
    as Meta's reference code encodes it) and the chat template in tokenizer_config.json."""
    from transformers import LlamaTokenizer

    model = json.loads((Path(hf_tokenizer_dir) / "tokenizer.json").read_text())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True, legacy=True)
    out = tmp_path_factory.mktemp("llama2_chat")
    tok.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    config["legacy"] = True  # transformers 5 does not save it, and rebuilds the pre-tokenizer from it
    config_path.write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return str(out)


@pytest.fixture(scope="module")
def llama2_chat(llama2_chat_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_chat_dir)
    assert tok("<s>x", add_special_tokens=False)["input_ids"][1] == tok("x", add_special_tokens=False)["input_ids"][0]
    return tok


def reference_ids(tok, messages):
    ids = tok.apply_chat_template(messages, chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def reference_mask(tok, messages):
    """1 for the tokens whose text lies in an answer's rendering (' ' + answer + ' </s>'), from the
    rendered string's character offsets: independent of how the tool finds them."""
    text = tok.apply_chat_template(messages, chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False)
    spans, at = [], 0
    for message in messages:
        if message["role"] == "assistant":
            piece = f" {message['content'].strip()} {tok.eos_token}"
            at = text.index(piece, at)
            spans.append((at, at + len(piece)))
            at += len(piece)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [int(any(lo <= start and end <= hi for lo, hi in spans)) for start, end in offsets]


def run(tmp_path, records, *extra, model, tokenizer_type="Llama2Tokenizer", name="out"):
    inputs = write_jsonl(tmp_path / f"{name}.jsonl", records)
    prefix = tmp_path / name
    argv = ["--input", str(inputs), "--output-prefix", str(prefix), "--tokenizer-type", tokenizer_type,
            "--tokenizer-model", str(model), *extra]
    return main(argv), prefix


def outputs(prefix):
    ids = [d.tolist() for d in read_documents(f"{prefix}_text_document")]
    masks = read_documents(f"{prefix}_loss_mask_document")
    assert all(m.dtype == np.uint8 for m in masks)
    return ids, [m.tolist() for m in masks]


def rejected(prefix):
    return [json.loads(line) for line in Path(f"{prefix}_rejected.jsonl").read_text().splitlines()]


def final_outputs(directory):
    return sorted(p for p in os.listdir(directory) if not p.endswith(".jsonl"))


@pytest.mark.parametrize("template", ["default", "from dir"])
def test_ids_equal_apply_chat_template(tmp_path, sentencepiece_model, llama2_chat_dir, llama2_chat, template):
    extra = ["--chat-template-from", llama2_chat_dir] if template == "from dir" else []
    records = [{"messages": m} for m in CONVERSATIONS.values()]
    rc, prefix = run(tmp_path, records, *extra, model=sentencepiece_model)
    assert rc == 0
    ids, _ = outputs(prefix)
    assert ids == [reference_ids(llama2_chat, m) for m in CONVERSATIONS.values()]
    assert ids[0][0] == 1 and ids[0][-1] == 2 and ids[1].count(1) == 3 and ids[1].count(2) == 3
    # the template is kept beside the data, for training to carry to the export
    assert Path(f"{prefix}_chat_template.jinja").read_text() == LLAMA2_CHAT_TEMPLATE


def test_hf_tokenizer_encodes_as_apply_chat_template(tmp_path, llama2_chat_dir, llama2_chat, hf_tokenizer_dir):
    from transformers import AutoTokenizer

    records = [{"messages": m} for m in CONVERSATIONS.values()]
    for name, model in (("legacy", llama2_chat_dir), ("non_legacy", hf_tokenizer_dir)):
        rc, prefix = run(tmp_path, records, "--chat-template-from", llama2_chat_dir, model=model,
                         tokenizer_type="HuggingFaceTokenizer", name=name)
        assert rc == 0
        tok = llama2_chat if name == "legacy" else AutoTokenizer.from_pretrained(hf_tokenizer_dir)
        ids, masks = outputs(prefix)
        assert ids == [reference_ids(tok, m) for m in CONVERSATIONS.values()], name
        assert masks == [reference_mask(tok, m) for m in CONVERSATIONS.values()], name


@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_loss_mask_marks_exactly_the_answers(tmp_path, sentencepiece_model, llama2_chat, kind):
    messages = CONVERSATIONS[kind]
    rc, prefix = run(tmp_path, [{"messages": messages}], model=sentencepiece_model)
    assert rc == 0
    (ids,), (mask,) = outputs(prefix)
    expected = reference_mask(llama2_chat, messages)
    assert mask == expected and len(mask) == len(ids)
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    runs = [[]]  # the trained stretches, which decode to the answers
    for i, m in zip(ids, mask):
        if m:
            runs[-1].append(i)
        elif runs[-1]:
            runs.append([])
    assert [llama2_chat.decode(r, skip_special_tokens=True).strip() for r in runs if r] == answers
    assert sum(1 for i, m in zip(ids, mask) if i == 2 and m) == len(answers)  # every closing EOS
    assert not any(m for i, m in zip(ids, mask) if i == 1)  # no BOS


def test_instruction_records(tmp_path, sentencepiece_model, llama2_chat):
    records = [{"instruction": "Summarize the clinical report.", "output": "The patient was treated."},
               {"instruction": "Classify the risk.", "input": "blood test results", "output": "Small."},
               {"instruction": "Classify the risk.", "input": "", "output": "Large."}]
    rc, prefix = run(tmp_path, records, "--system", "You are a doctor.", model=sentencepiece_model)
    assert rc == 0
    ids, masks = outputs(prefix)
    users = ["Summarize the clinical report.", "Classify the risk.\n\nblood test results", "Classify the risk."]
    expected = [[{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": u},
                 {"role": "assistant", "content": r["output"]}] for u, r in zip(users, records)]
    assert ids == [reference_ids(llama2_chat, m) for m in expected]
    assert masks == [reference_mask(llama2_chat, m) for m in expected]


BAD_RECORDS = [  # (line, reason kind): line numbers as written below, blank lines included
    (b"not json", "malformed JSON"),
    (b'{"instruction": "x", "output": "caf\xe9"}', "invalid UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"text": "no fields"}).encode(), "missing field"),
    (json.dumps({"instruction": "Classify."}).encode(), "missing field"),
    (json.dumps({"instruction": "Classify.", "output": 3}).encode(), "wrong type"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), "wrong roles"),
    (json.dumps({"messages": ONE_TURN[:1]}).encode(), "wrong roles"),
    (json.dumps({"messages": ONE_TURN + ONE_TURN[1:]}).encode(), "wrong roles"),
    (json.dumps({"messages": [ONE_TURN[0], {"role": "assistant", "content": " \n"}]}).encode(), "empty answer"),
    (json.dumps({"instruction": "Classify.", "output": ""}).encode(), "empty answer"),
    (json.dumps({"messages": [ONE_TURN[0], {"role": "assistant", "content": "risk " * 300}]}).encode(),
     "longer than --seq-length 256"),
    (json.dumps({"messages": ONE_TURN, "instruction": "Classify.", "output": "a"}).encode(), "ambiguous record"),
]


def test_bad_records_are_skipped_and_listed(tmp_path, sentencepiece_model, capsys):
    good = {"messages": ONE_TURN}
    lines = [good, b""] + [raw for raw, _ in BAD_RECORDS] + [good]
    rc, prefix = run(tmp_path, lines, "--seq-length", "256", "--max-reject-fraction", "1", model=sentencepiece_model)
    assert rc == 0
    ids, _ = outputs(prefix)
    assert len(ids) == 2
    listed = rejected(prefix)
    assert [r["line"] for r in listed] == list(range(3, 3 + len(BAD_RECORDS)))
    for record, (_, kind) in zip(listed, BAD_RECORDS):
        assert record["reason"].startswith(kind), record
        assert record["file"].endswith("out.jsonl")
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{len(lines) - 1} records read, 2 written" in summary and f"{len(BAD_RECORDS)} rejected" in summary
    assert "malformed JSON x 1" in summary and "wrong roles x 3" in summary and "trained (" in summary


def test_strict_fails_with_one_line_naming_file_and_line(tmp_path, sentencepiece_model, capsys):
    lines = [{"messages": ONE_TURN}, {"messages": ONE_TURN[:1]}]
    rc, prefix = run(tmp_path, lines, "--strict", model=sentencepiece_model)
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mellama-preprocess-sft: error: ")
    assert f"{tmp_path / 'out.jsonl'}:2: wrong roles" in err[0]
    assert final_outputs(tmp_path) == []


def test_overlong_dropped_or_truncated(tmp_path, sentencepiece_model, llama2_chat):
    long_answer = [{"role": "user", "content": "Review the evidence."},
                   {"role": "assistant", "content": "the study " * 200}]
    long_question = [{"role": "user", "content": "the study " * 200}, ONE_TURN[1]]
    records = [{"messages": ONE_TURN}, {"messages": long_answer}, {"messages": long_question}]
    seq = 64
    rc, prefix = run(tmp_path, records, "--seq-length", str(seq), "--max-reject-fraction", "1",
                     model=sentencepiece_model, name="drop")
    assert rc == 0
    assert outputs(prefix)[0] == [reference_ids(llama2_chat, ONE_TURN)]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejected(prefix)] == \
        [(2, f"longer than --seq-length {seq}"), (3, f"longer than --seq-length {seq}")]

    rc, prefix = run(tmp_path, records, "--seq-length", str(seq), "--overlong", "truncate",
                     "--max-reject-fraction", "1", model=sentencepiece_model, name="truncate")
    assert rc == 0
    ids, masks = outputs(prefix)
    assert ids == [reference_ids(llama2_chat, ONE_TURN), reference_ids(llama2_chat, long_answer)[:seq]]
    assert masks[1] == reference_mask(llama2_chat, long_answer)[:seq] and masks[1][-1] == 1
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejected(prefix)] == \
        [(3, f"no answer within --seq-length {seq}")]


def test_failure_leaves_no_output_under_final_names(tmp_path, sentencepiece_model, capsys):
    rc, prefix = run(tmp_path, [{"messages": ONE_TURN}, b"not json"], model=sentencepiece_model)
    assert rc == 1  # half the records rejected, more than --max-reject-fraction 0.1
    assert "1 of 2 records rejected" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["out.jsonl"]

    with output_lock(str(prefix)):
        rc, _ = run(tmp_path, [{"messages": ONE_TURN}], model=sentencepiece_model)
    assert rc == 1 and "is locked" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_help_and_bad_flags(tmp_path, sentencepiece_model, capsys):
    assert main(["--help"]) == 0
    assert "--chat-template-from" in capsys.readouterr().out
    rc, _ = run(tmp_path, [{"messages": ONE_TURN}], "--chat-template-from", str(tmp_path), model=sentencepiece_model)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no chat_template" in err[0]


def test_template_whose_tokens_move_between_turns_is_rejected(tmp_path, sentencepiece_model, capsys):
    """A rendering up to an answer that is not a prefix of the rendering with it gives no mask at all."""
    template_dir = tmp_path / "template"
    template_dir.mkdir()
    counting = "{{ bos_token }}{{ messages|length }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    (template_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": counting}))
    rc, prefix = run(tmp_path, [{"messages": ONE_TURN}] * 3, "--chat-template-from", str(template_dir),
                     "--max-reject-fraction", "1", "--log-interval", "2", model=sentencepiece_model)
    assert rc == 1  # every record rejected
    err = capsys.readouterr().err
    assert "processed 2 records" in err and "template boundaries" in err
    assert final_outputs(tmp_path) == ["template"]


STRIKE = [{"role": "user", "content": "Is <s>aspirin</s> the dose?"},
          {"role": "assistant", "content": "The dose is <s>small</s> large </s> now."}]


def test_special_token_text_in_messages_is_plain_text(tmp_path, sentencepiece_model):
    import sentencepiece

    rc, prefix = run(tmp_path, [{"messages": STRIKE}], model=sentencepiece_model)
    assert rc == 0
    (ids,), (mask,) = outputs(prefix)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    # Meta's chat_completion: BOS + plain "[INST] user [/INST] answer " + EOS
    user, answer = (m["content"].strip() for m in STRIKE)
    assert ids == [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST] {answer} ") + [sp.eos_id()]
    assert ids.count(sp.bos_id()) == 1 and ids.count(sp.eos_id()) == 1
    assert [i for i, m in zip(ids, mask) if m].count(sp.eos_id()) == 1  # only the closing EOS trains


def test_special_token_text_is_rejected_with_a_hf_tokenizer(tmp_path, llama2_chat_dir):
    rc, prefix = run(tmp_path, [{"messages": ONE_TURN}, {"messages": STRIKE}], "--max-reject-fraction", "1",
                     model=llama2_chat_dir, tokenizer_type="HuggingFaceTokenizer")
    assert rc == 0
    ids, _ = outputs(prefix)
    assert len(ids) == 1 and ids[0].count(1) == 1 and ids[0].count(2) == 1
    (reason,) = [r["reason"] for r in rejected(prefix)]
    assert reason.startswith("special-token text: message 0 holds '</s>'") or \
        reason.startswith("special-token text: message 0 holds '<s>'"), reason
