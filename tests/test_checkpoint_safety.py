"""What a checkpoint run refuses (issue 14): a --load that finds nothing, architecture values or
data settings that differ from the checkpoint's, and corrupted files (checksums)."""

import os
import shutil

import pytest

from checkpoint_harness import copy_checkpoint, drop_checksums, edit_train_state, load_with
from engine_harness import TINY, spawn_gloo
from megatron_mellama.checkpoint.layout import CheckpointError
from megatron_mellama.checkpoint.manager import CheckpointManager
from megatron_mellama.checkpoint.resume import checkpoint_to_load
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.training.engine import Engine

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")




@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    cfg = parse_config(TINY + ["--save", str(root)])
    CheckpointManager(cfg, Engine(cfg)).save(1, 8)
    return str(root)




# -- 1. a --load that finds no checkpoint -----------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--finetune"]], ids=["resume", "finetune"])
def test_load_of_a_directory_without_a_checkpoint_is_an_error(tmp_path, extra):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(CheckpointError, match=r"--load .*empty: no checkpoint there \(no 'latest' file\)"):
        load_with(["--load", empty] + extra)
    with pytest.raises(CheckpointError, match=r"--load .*nope: no such directory"):
        load_with(["--load", str(tmp_path / "nope")] + extra)


def test_only_the_first_save_load_launch_starts_from_scratch(tmp_path):
    same = str(tmp_path / "run")
    assert checkpoint_to_load(parse_config(TINY + ["--load", same, "--save", same])) is None
    os.makedirs(same)
    assert checkpoint_to_load(parse_config(TINY + ["--load", same, "--save", same + "/"])) is None
    # --finetune means "start from these weights": never from scratch
    with pytest.raises(CheckpointError, match="--finetune needs a checkpoint"):
        checkpoint_to_load(parse_config(TINY + ["--load", same, "--save", same, "--finetune"]))
    # a different --save: the --load names a checkpoint that is not there
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        checkpoint_to_load(parse_config(TINY + ["--load", same, "--save", str(tmp_path / "other")]))


def test_iteration_directories_without_latest_are_an_error(saved, tmp_path):
    root = copy_checkpoint(saved, tmp_path / "c")
    os.remove(os.path.join(root, "latest"))
    with pytest.raises(CheckpointError, match=r"no 'latest' file, but it holds iter_0000001"):
        load_with(["--load", root, "--save", root])


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20, b"\xff\xfe", b"", b"12abc\n", b"\xd9\xa3"],
                         ids=["binary", "bom", "empty", "text", "arabic-digit"])
def test_garbage_latest_is_one_line(saved, tmp_path, content):
    root = copy_checkpoint(saved, tmp_path / "c")
    with open(os.path.join(root, "latest"), "wb") as fh:
        fh.write(content)
    with pytest.raises(CheckpointError) as info:
        load_with(["--load", root])
    assert "expected an iteration number" in str(info.value) and "\n" not in str(info.value)


def test_pretrain_refuses_a_load_without_checkpoint_in_one_line(tmp_path, capsys):
    from megatron_mellama.pretrain import main

    empty = tmp_path / "empty"
    empty.mkdir()
    run = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "1", "--eval-iters", "0", "--num-workers", "0"]
    assert main(run + ["--load", str(empty), "--finetune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint there" in err[0], err


# -- 2. architecture values beyond the shapes ---------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--finetune"]], ids=["resume", "finetune"])
@pytest.mark.parametrize("flag,value,want", [
    ("--rotary-base", "500000", r"--rotary-base 500000.0 but the checkpoint has 10000.0"),
    ("--norm-epsilon", "1e-6", r"--norm-epsilon 1e-06 but the checkpoint has 1e-05"),
    ("--max-position-embeddings", "512", r"--max-position-embeddings 512 but the checkpoint has 256"),
    ("--num-query-groups", "4", r"--num-query-groups 4 but the checkpoint has 2"),
    ("--num-layers", "2", r"--num-layers 2 but the checkpoint has 4"),
    ("--vocab-size", "256", r"--vocab-size \(padded\) 256 but the checkpoint has 128"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("--") else None)
def test_architecture_values_are_compared(saved, flag, value, want, extra):
    with pytest.raises(CheckpointError, match=r"the model flags do not match the checkpoint: " + want) as info:
        load_with(["--load", saved, flag, value] + extra)
    assert "\n" not in str(info.value)


def test_extend_context_changes_the_positions_of_a_new_run_only(saved, capsys):
    longer = ["--rotary-base", "500000", "--max-position-embeddings", "512", "--use-rope-scaling",
              "--rope-scaling-factor", "2"]
    with pytest.raises(CheckpointError, match=r"--rotary-base 500000.0 but .*--max-position-embeddings 512 but the "
                                              r"checkpoint has 256 \(a new run that changes the positions on purpose: "
                                              r"--finetune --extend-context\)$"):
        load_with(["--load", saved, "--finetune"] + longer)
    capsys.readouterr()
    assert load_with(["--load", saved, "--finetune", "--extend-context"] + longer)["iteration"] == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "extending the context" in x]
    assert len(line) == 1 and "--rotary-base 500000.0 but the checkpoint has 10000.0" in line[0]
    assert "RoPE scaling --use-rope-scaling --rope-scaling-factor 2.0" in line[0]
    # weights and other architecture values still must match
    with pytest.raises(CheckpointError, match=r"--norm-epsilon 1e-06 but the checkpoint has 1e-05$"):
        load_with(["--load", saved, "--finetune", "--extend-context", "--norm-epsilon", "1e-6"] + longer)
    with pytest.raises(ConfigError, match=r"--extend-context .* needs --finetune"):
        load_with(["--load", saved, "--extend-context"] + longer)


def test_every_difference_is_named_at_once(saved):
    with pytest.raises(CheckpointError, match=r"--norm-epsilon 1e-06 but .*; --rotary-base 1000.0 but"):
        load_with(["--load", saved, "--norm-epsilon", "1e-6", "--rotary-base", "1000"])


def test_finetune_may_use_shorter_rotary_tables_but_resume_may_not(saved):
    assert load_with(["--load", saved, "--finetune", "--max-position-embeddings", "64"])["iteration"] == 0
    with pytest.raises(CheckpointError, match=r"--max-position-embeddings 64 but the checkpoint has 256"):
        load_with(["--load", saved, "--max-position-embeddings", "64"])


def test_values_an_older_checkpoint_did_not_record_are_not_compared(saved, tmp_path):
    root = copy_checkpoint(saved, tmp_path / "c")

    def forget(state):
        for key in ("norm_epsilon", "rotary_base", "max_position_embeddings"):
            del state["config"]["model"][key]

    edit_train_state(root, 1, forget)
    assert load_with(["--load", root, "--rotary-base", "500000", "--norm-epsilon", "1e-6"])["iteration"] == 1




# -- 3. data settings on resume -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """A checkpoint saved by a run on a 3-domain blend with a tokenizer file: (root, its flags)."""
    tmp = tmp_path_factory.mktemp("data")
    for name in ("bio", "clin", "gen"):
        for ext in ("bin", "idx"):
            (tmp / f"{name}.{ext}").write_bytes(b"x" * (len(name) * 10 + len(ext)))
    (tmp / "tok.model").write_bytes(b"a tokenizer")
    (tmp / "tok2.model").write_bytes(b"another tokenizer")
    (tmp / "moved").mkdir()
    for ext in ("bin", "idx"):
        shutil.copy(tmp / f"bio.{ext}", tmp / "moved" / f"bio.{ext}")
    (tmp / "tok_copy.model").write_bytes(b"a tokenizer")
    (tmp / "other").mkdir()
    for ext in ("bin", "idx"):
        (tmp / "other" / f"clin.{ext}").write_bytes(b"y" * 7)
        (tmp / f"extra.{ext}").write_bytes(b"z" * 9)
    flags = ["--data-path", "15", str(tmp / "bio"), "1", str(tmp / "clin"), "4", str(tmp / "gen"),
             "--split", "98,2,0", "--tokenizer-model", str(tmp / "tok.model")]
    root = str(tmp / "ckpt")
    cfg = parse_config(TINY + flags + ["--save", root])
    CheckpointManager(cfg, Engine(cfg)).save(2, 16)
    return root, flags, tmp


def _with(flags, flag, *values):
    out = list(flags)
    i = out.index(flag)
    n = 6 if flag == "--data-path" else 1
    return out[:i + 1] + list(values) + out[i + 1 + n:]


@pytest.mark.slow
def test_resume_with_the_same_data_settings(data_run):
    root, flags, tmp = data_run
    assert load_with(flags + ["--load", root])["consumed_samples"] == 16
    # the same blend written otherwise, the same files elsewhere, the same tokenizer elsewhere
    same = _with(flags, "--data-path", "30", str(tmp / "bio"), "2", str(tmp / "clin"), "8", str(tmp / "gen"))
    same = _with(same, "--split", "0.98,0.02,0")
    same = _with(same, "--tokenizer-model", str(tmp / "tok_copy.model"))
    same = _with(same, "--data-path", "15", str(tmp / "moved" / "bio"), "1", str(tmp / "clin"), "4", str(tmp / "gen"))
    assert load_with(same + ["--load", root])["consumed_samples"] == 16


@pytest.mark.slow
def test_resume_with_another_blend(data_run):
    # weights, order, a prefix added or dropped: each domain continues where it stopped (test_mixture.py)
    root, flags, tmp = data_run
    for blend in (("1", str(tmp / "bio"), "1", str(tmp / "clin"), "2", str(tmp / "gen")),
                  ("15", str(tmp / "bio"), "4", str(tmp / "gen"), "1", str(tmp / "clin")),
                  ("15", str(tmp / "bio"), "4", str(tmp / "gen"), "1", str(tmp / "extra"))):
        assert load_with(_with(flags, "--data-path", *blend) + ["--load", root])["consumed_samples"] == 16


@pytest.mark.parametrize("change,want", [
    (("--data-path", "15", "{t}/bio", "1", "{t}/other/clin", "4", "{t}/gen"),
     r"--data-path \S+/other/clin is not the data the checkpoint read as \S+/clin \(.bin 7 bytes, .idx 7 sha256 "
     r"\w{12}; it read .bin 43, .idx 43 sha256 \w{12}\) \(--finetune"),
    (("--split", "90,10,0"), r"--split 90,10,0 but the checkpoint has 98,2,0"),
    (("--seed", "12"), r"--seed 12 but the checkpoint has 11"),
    (("--seq-length", "8"), r"--seq-length 8 but the checkpoint has 16"),
    (("--tokenizer-model", "{t}/tok2.model"),
     r"--tokenizer-model \S+tok2.model \(sha256 \w{12}\) but the checkpoint was trained with \S+tok.model \(sha256"),
], ids=["changed-files", "split", "seed", "seq-length", "tokenizer"])
def test_resume_refuses_changed_data_settings(data_run, change, want):
    root, flags, tmp = data_run
    flag, *values = [v.format(t=tmp) for v in change]
    argv = _with(flags, flag, *values) if flag in flags else flags + [flag] + values
    with pytest.raises(CheckpointError, match=r"the data settings differ from the run that saved it, so its 16 "
                                              r"consumed samples would index another sample sequence: " + want) as e:
        load_with(argv + ["--load", root])
    assert "\n" not in str(e.value)
    # --finetune starts a new run on whatever data
    assert load_with(argv + ["--load", root, "--finetune"])["iteration"] == 0


def test_resume_refuses_mock_data_for_a_blend(data_run):
    root, flags, tmp = data_run
    with pytest.raises(CheckpointError, match=r"--mock-data but the checkpoint was trained on --data-path 15 "):
        load_with(["--mock-data", "--load", root])


def test_checkpoint_without_data_record_is_not_checked(data_run, tmp_path):
    root, flags, tmp = data_run
    copy = copy_checkpoint(root, tmp_path / "c")
    edit_train_state(copy, 2, lambda state: state.pop("data"))
    assert load_with(["--mock-data", "--seed", "5", "--load", copy])["iteration"] == 2


def test_prefixes_of_one_file_name_in_two_folders_resume(tmp_path):
    # bio/text_document and clin/text_document: each prefix is compared with itself, not with the
    # other of the same file name
    for folder, size in (("bio", 40), ("clin", 70)):
        (tmp_path / folder).mkdir()
        for ext in ("bin", "idx"):
            (tmp_path / folder / f"text_document.{ext}").write_bytes(b"x" * size)
    flags = ["--data-path", "15", str(tmp_path / "bio" / "text_document"), "1",
             str(tmp_path / "clin" / "text_document"), "--split", "98,2,0", "--tokenizer-model", str(tmp_path / "t")]
    (tmp_path / "t").write_bytes(b"a tokenizer")
    root = str(tmp_path / "ckpt")
    cfg = parse_config(TINY + flags + ["--save", root])
    CheckpointManager(cfg, Engine(cfg)).save(2, 16)
    assert load_with(flags + ["--load", root])["consumed_samples"] == 16


def test_resume_refuses_data_preprocessed_again_at_the_same_sizes(data_run, tmp_path, capsys):
    root, flags, tmp = data_run
    again = tmp_path / "again"
    again.mkdir()
    for name in ("bio", "clin", "gen"):
        for ext in ("bin", "idx"):
            shutil.copy(tmp / f"{name}.{ext}", again / f"{name}.{ext}")
    (again / "clin.idx").write_bytes(b"w" * len((tmp / "clin.idx").read_bytes()))
    argv = _with(flags, "--data-path", "15", str(again / "bio"), "1", str(again / "clin"), "4", str(again / "gen"))
    with pytest.raises(CheckpointError, match=r"--data-path \S+/again/clin is not the data the checkpoint read as "
                                              r"\S+/clin \(.bin 43 bytes, .idx 43 sha256 \w{12}; it read .bin 43, "
                                              r".idx 43 sha256 \w{12}\)"):
        load_with(argv + ["--load", root])
    # a checkpoint written before the fingerprint was recorded resumes, saying what was not checked
    old = copy_checkpoint(root, tmp_path / "old")

    def forget_fingerprints(state):
        for record in state["data"]["blend"]:
            record.pop("idx_sha256")
    edit_train_state(old, 2, forget_fingerprints)
    capsys.readouterr()
    assert load_with(argv + ["--load", old])["consumed_samples"] == 16
    assert "records no .idx fingerprint of its data" in capsys.readouterr().out


# -- 4. checksums --------------------------------------------------------------------------------------
def _flip(path, offset=None):
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_save_records_a_checksum_of_every_file(saved):
    from megatron_mellama.checkpoint.checksums import file_checksum, files_under, read_checksums

    ckpt = os.path.join(saved, "iter_0000001")
    files = read_checksums(ckpt)
    assert set(files) == set(files_under(ckpt)) >= {".metadata", "__0_0.distcp", "train_state.json",
                                                   "rng/rank_00000.pt"}
    assert all(file_checksum(os.path.join(ckpt, n)) == v for n, v in files.items())


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "train_state.json", "rng/rank_00000.pt"])
def test_a_flipped_byte_is_reported_before_loading(saved, tmp_path, name):
    root = copy_checkpoint(saved, tmp_path / "c")
    _flip(os.path.join(root, "iter_0000001", name))
    with pytest.raises(CheckpointError) as info:
        load_with(["--load", root])
    message = str(info.value)
    assert "\n" not in message
    assert f"iter_0000001: unreadable or corrupt checkpoint (checksums: {name}: crc32 " in message, message


def test_a_missing_or_truncated_file_is_named(saved, tmp_path):
    root = copy_checkpoint(saved, tmp_path / "c")
    os.remove(os.path.join(root, "iter_0000001", "rng", "rank_00000.pt"))
    with open(os.path.join(root, "iter_0000001", "__0_0.distcp"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CheckpointError, match=r"checksums: __0_0.distcp: 100 bytes, expected \d+; "
                                              r"rng/rank_00000.pt: missing\)"):
        load_with(["--load", root, "--finetune"])


def test_an_unreadable_checksum_list_is_one_line(saved, tmp_path):
    root = copy_checkpoint(saved, tmp_path / "c")
    with open(os.path.join(root, "iter_0000001", "checksums.json"), "wb") as fh:
        fh.write(b"\x00\xff garbage")
    with pytest.raises(CheckpointError, match=r"checksums.json: unreadable checksum list"):
        load_with(["--load", root])


@pytest.mark.slow
def test_async_save_writes_checksums_before_latest(tmp_path, monkeypatch):
    from megatron_mellama.checkpoint import checksums, manager

    order = []
    write_checksums, write_latest = checksums.write_checksums, manager.write_latest
    monkeypatch.setattr(checksums, "write_checksums", lambda d, f: (order.append("checksums"), write_checksums(d, f)))
    monkeypatch.setattr(manager, "write_latest", lambda r, i: (order.append("latest"), write_latest(r, i)))
    cfg = parse_config(TINY + ["--save", str(tmp_path), "--async-save"])
    mgr = CheckpointManager(cfg, Engine(cfg))
    mgr.save(1, 8)
    mgr.save(2, 16)
    mgr.close()
    assert order == ["checksums", "latest"] * 2
    ckpt = os.path.join(tmp_path, "iter_0000002")
    files = checksums.read_checksums(ckpt)
    assert set(files) == set(checksums.files_under(ckpt)) and not checksums.verify(ckpt, files)


@pytest.mark.slow
def test_two_ranks_checksum_their_files_and_verify_their_shares(tmp_path):
    from checkpoint_harness import train_segment_distributed
    from megatron_mellama.checkpoint.checksums import read_checksums

    save = str(tmp_path / "ckpt")
    argv = TINY + ["--data-parallel-sharding", "optimizer", "--save", save]
    train_segment_distributed(argv, 2, 0, 1, True, str(tmp_path))
    ckpt = os.path.join(save, "iter_0000001")
    assert {"__0_0.distcp", "__1_0.distcp", "rng/rank_00001.pt", ".metadata"} <= set(read_checksums(ckpt))
    _flip(os.path.join(ckpt, "__1_0.distcp"))
    # whichever rank read the bad file, both stop with the same line (neither waits in a collective)
    errors = spawn_gloo(_load_rank, 2, (TINY + ["--load", save],), str(tmp_path))
    assert errors[0] == errors[1] and "(checksums: __1_0.distcp: crc32 " in errors[0], errors


def _load_rank(rank, world, argv):
    from megatron_mellama.parallel.mesh import ParallelDims

    cfg = parse_config(argv, world_size=world)
    dims = ParallelDims.from_config(cfg, world)
    engine = Engine(cfg, dims.build_mesh("cpu"), initialise=False)
    try:
        CheckpointManager(cfg, engine).load()
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_verify_checkpoint_tool(saved, tmp_path, capsys):
    import subprocess
    import sys

    from megatron_mellama.tools.verify_checkpoint import main

    root = copy_checkpoint(saved, tmp_path / "c")
    assert main([root]) == 0 and "all match their checksums" in capsys.readouterr().out
    assert main([os.path.join(root, "iter_0000001"), "--workers", "2"]) == 0
    capsys.readouterr()
    _flip(os.path.join(root, "iter_0000001", "__0_0.distcp"))
    assert main([root, "--all"]) == 1
    out = capsys.readouterr().out
    assert "1 of " in out and "iter_0000001/__0_0.distcp: crc32 " in out
    drop_checksums(root)
    assert main([root]) == 2
    assert "no checksums.json" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(here, "tools", "verify_checkpoint.py"), saved],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_values_not_set_by_this_run_are_taken_from_the_checkpoint(saved, tmp_path):
    """Without --rotary-base / --norm-epsilon the checkpoint's values are used (a preset's are
    defaults); with them, a difference is refused (test_architecture_values_are_compared)."""
    from megatron_mellama.pretrain import resolve_run_config

    root = copy_checkpoint(saved, tmp_path / "c")
    edit_train_state(root, 1, lambda state: state["config"]["model"].update(rotary_base=500000.0, norm_epsilon=1e-6))
    cfg, lines = resolve_run_config(TINY + ["--load", root])
    assert (cfg.model.rotary_base, cfg.model.norm_epsilon) == (500000.0, 1e-6)
    assert len(lines) == 2 and "--rotary-base 500000.0: the checkpoint's value" in lines[1]
    assert CheckpointManager(cfg, Engine(cfg)).load()["iteration"] == 1
    # a value the run sets stays, and is compared
    cfg, _ = resolve_run_config(TINY + ["--load", root, "--rotary-base", "10000"])
    assert cfg.model.rotary_base == 10000.0 and cfg.model.norm_epsilon == 1e-6
    with pytest.raises(CheckpointError, match=r"--rotary-base 10000.0 but the checkpoint has 500000.0"):
        CheckpointManager(cfg, Engine(cfg)).load()


# -- issue 23: a run never writes over checkpoints it does not continue -------------------------------
_RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--eval-iters", "0", "--num-workers", "0", "--log-interval", "100",
        "--lr-decay-iters", "10"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished 2-iteration run saved at iterations 1 and 2."""
    from megatron_mellama.pretrain import main

    root = tmp_path_factory.mktemp("pretrained") / "run"
    assert main(_RUN + ["--train-iters", "2", "--save", str(root), "--save-interval", "1"]) == 0
    return root


def _files(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _refused(argv, root, capsys) -> str:
    from megatron_mellama.pretrain import main

    before = _files(root)
    capsys.readouterr()
    assert main(_RUN + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite-save" in err[0], err
    assert _files(root) == before  # nothing written, moved or deleted
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["finetune-same-root", "fresh-run", "another-run", "older-iteration"])
def test_a_run_that_does_not_continue_the_checkpoints_in_save_is_refused(pretrained, tmp_path, capsys, case):
    root = tmp_path / "run"
    shutil.copytree(pretrained, root)
    other = tmp_path / "other"
    shutil.copytree(pretrained, other)
    argv = {"finetune-same-root": ["--finetune", "--load", str(root), "--keep-last", "1"],
            "fresh-run": [],
            "another-run": ["--load", str(other)],
            "older-iteration": ["--load", str(root / "iter_0000001")]}[case]
    err = _refused(argv + ["--train-iters", "4", "--save", str(root), "--save-interval", "1"], root, capsys)
    assert f"--save {root} already holds the checkpoints of a run (latest: iteration 2)" in err


def test_iterations_without_latest_in_save_are_refused_too(pretrained, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(pretrained, root)
    os.remove(root / "latest")
    err = _refused(["--train-iters", "2", "--save", str(root)], root, capsys)
    assert "iter_0000001, iter_0000002" in err and "no 'latest' file" in err


@pytest.mark.slow
def test_a_plain_resume_and_an_explicit_overwrite_may_write_there(pretrained, tmp_path, capsys):
    from megatron_mellama.pretrain import main

    root = tmp_path / "run"
    shutil.copytree(pretrained, root)
    # the same directory, spelled differently: a plain resume from its latest
    assert main(_RUN + ["--train-iters", "3", "--save", str(root) + "/", "--load", str(root / "iter_0000002")]) == 0
    assert (root / "latest").read_text().strip() == "3"
    assert main(_RUN + ["--train-iters", "1", "--save", str(root), "--load", str(root), "--finetune",
                        "--overwrite-save"]) == 0
    assert (root / "latest").read_text().strip() == "1"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000001", "iter_0000002", "iter_0000003"]


@pytest.mark.slow
def test_one_command_line_starts_from_the_pretrained_checkpoint_then_resumes_its_own(pretrained, tmp_path, capsys):
    """--pretrained-checkpoint (Megatron-LM's): the first launch starts from its weights as --finetune
    does, a relaunch of the same command (a requeue) resumes the run's own checkpoints instead of
    starting over, and never reads the pretrained one again."""
    from megatron_mellama.pretrain import main

    own = tmp_path / "own"
    argv = _RUN + ["--pretrained-checkpoint", str(pretrained), "--save", str(own), "--save-interval", "1"]
    capsys.readouterr()
    assert main(argv + ["--train-iters", "1"]) == 0
    out = capsys.readouterr().out
    assert f"starting from --pretrained-checkpoint {pretrained} (weights only, iteration 0" in out
    assert (own / "latest").read_text().strip() == "1"
    # the requeued job: same flags, a longer run
    assert main(argv + ["--train-iters", "3"]) == 0
    out = capsys.readouterr().out
    assert f"--load {own} holds iteration 1: resuming it" in out
    assert f"resumed from {own} at iteration 1" in out
    assert (own / "latest").read_text().strip() == "3"
    assert (pretrained / "latest").read_text().strip() == "2"  # the source run is untouched


def test_pretrained_checkpoint_without_a_checkpoint_or_with_finetune_is_one_line(tmp_path, capsys):
    from megatron_mellama.pretrain import main

    capsys.readouterr()
    assert main(_RUN + ["--train-iters", "1", "--pretrained-checkpoint", str(tmp_path / "none"),
                        "--save", str(tmp_path / "own")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrained-checkpoint" in err[0] and "no checkpoint there" in err[0], err
    assert main(_RUN + ["--train-iters", "1", "--pretrained-checkpoint", str(tmp_path), "--finetune",
                        "--save", str(tmp_path / "own")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--finetune and --pretrained-checkpoint" in err[0], err
