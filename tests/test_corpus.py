"""Corpus ingestion and packing against a direct computation."""

import json
from pathlib import Path

import numpy as np
import pytest

from kdpipe.storage.fingerprint import data_fingerprint

from kdpipe.errors import UserError
from kdpipe.stage1_extract.corpus import expand_sources, iter_documents, tokenize_documents
from kdpipe.stage1_extract.packing import pack
from tiny import make_tokenizer


def test_sources_text_jsonl_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("the first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second one", "id": 1}) + "\n\n" +
                                              json.dumps({"text": "third"}) + "\n")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    files = expand_sources([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert expand_sources([str(tmp_path / "**" / "*.jsonl")]) == [tmp_path / "sub" / "b.jsonl"]
    assert list(iter_documents(files)) == ["the first document", "second one", "third"]
    with pytest.raises(UserError, match="no field 'body'.*--text-field"):
        list(iter_documents(files, field="body"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1 is not valid JSON"):
        list(iter_documents([tmp_path / "bad.jsonl"]))


def test_compressed_jsonl_reads_as_the_plain_file_does(tmp_path):
    """.jsonl.gz and .jsonl.zst are streamed through their decompressor: same documents, same order; found in
    directories like plain jsonl; a truncated stream is one clear error, not a traceback."""
    import gzip

    zstandard = pytest.importorskip("zstandard")
    records = [{"text": f"document {i} " + "word " * (i % 7), "id": i} for i in range(500)]
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(raw)
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "d" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    files = expand_sources([str(tmp_path / "d")])
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    docs = [list(iter_documents([f])) for f in files]
    assert docs[0] == [r["text"] for r in records] and docs[1] == docs[0] and docs[2] == docs[0]
    # two frames (as pzstd and appending writers make) read as one stream
    half = raw.index(b"\n", len(raw) // 2) + 1
    frames = zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:])
    (tmp_path / "two.jsonl.zst").write_bytes(frames)
    assert list(iter_documents([tmp_path / "two.jsonl.zst"])) == docs[0]
    # a file cut short, or not compressed at all, is never a shorter corpus: one clear line
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(raw)[:-40])
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw)[:-40])
    (tmp_path / "plain.jsonl.zst").write_bytes(raw)
    for name in ("cut.jsonl.gz", "cut.jsonl.zst", "plain.jsonl.zst"):
        with pytest.raises(UserError, match=f"{name} cannot be read to the end"):
            list(iter_documents([tmp_path / name]))


def test_parquet_files_and_shard_directories_read_their_text_column_in_batches(tmp_path):
    """Parquet rows in order across row groups and batches (3,000 rows > one 1,024-row batch), only the text
    column; shard directories found like text; a wrong column or type is one line naming --text-field."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "x" * (i % 5) for i in range(3000)]
    texts[7] = None  # a null row is no document
    table = pa.table({"id": list(range(3000)), "text": texts, "n": [float(i) for i in range(3000)]})
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 1800), tmp_path / "shards" / "part-0.parquet", row_group_size=500)
    pq.write_table(table.slice(1800), tmp_path / "shards" / "part-1.parquet", row_group_size=500)
    files = expand_sources([str(tmp_path / "shards")])
    assert [f.name for f in files] == ["part-0.parquet", "part-1.parquet"]
    assert list(iter_documents(files)) == [t for t in texts if t]
    with pytest.raises(UserError, match="no column 'body' \\(it has: id, text, n\\): set --text-field"):
        list(iter_documents(files, field="body"))
    with pytest.raises(UserError, match="column 'n' holds double, not text"):
        list(iter_documents(files, field="n"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="bad.parquet is not a readable parquet file"):
        list(iter_documents([tmp_path / "bad.parquet"]))


def test_packed_blocks_are_the_documents_joined_by_eos():
    tok = make_tokenizer()
    docs = ["the of and to in a is", "that for it", "as was with be by on not he this are or his"]
    ids = list(tokenize_documents(iter(docs), tok))
    stream = [t for d in ids for t in d.ids + [tok.eos_token_id]]
    blocks, dropped = pack(iter(ids), 5, tok.eos_token_id, "packed", tok.pad_token_id)
    n = len(stream) // 5
    np.testing.assert_array_equal(blocks[:], np.asarray(stream[: n * 5]).reshape(n, 5))
    assert (blocks.lengths == 5).all() and dropped == len(stream) - n * 5
    assert blocks.fingerprint == data_fingerprint([blocks[:]], blocks.lengths, 5)


def test_padded_rows_hold_one_document_each():
    tok = make_tokenizer()
    ids = list(tokenize_documents(iter(["the of and to in a is that", "for it"]), tok))
    blocks, _ = pack(iter(ids), 6, tok.eos_token_id, "padded", tok.pad_token_id)
    assert blocks.lengths.tolist() == [6, 2, 2]
    np.testing.assert_array_equal(blocks[1][:2], ids[0].ids[6:])
    assert (blocks[1][2:] == tok.pad_token_id).all()
    capped, _ = pack(iter(ids), 6, tok.eos_token_id, "padded", tok.pad_token_id, max_sequences=2)
    assert len(capped) == 2


def _bpe_tokenizer():
    """A byte-level BPE (GPT-2 / SmolLM2's kind) trained on the sonnets: merges across whitespace are real here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import kdpipe

    text = (Path(kdpipe.__file__).parent / "data" / "sonnets.txt").read_text()
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<bos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", bos_token="<bos>"), text


def test_a_large_text_file_is_read_in_pieces_that_tokenize_like_the_whole(tmp_path, monkeypatch):
    import kdpipe.stage1_extract.corpus as corpus
    tok, text = _bpe_tokenizer()
    text = text.replace("\n\n", "\n \n\n\t")  # blank lines, and whitespace that BPE merges, around piece ends
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 2000)
    pieces = list(iter_documents([tmp_path / "big.txt"]))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert not isinstance(pieces[0], corpus.Continued) and all(isinstance(p, corpus.Continued) for p in pieces[1:])
    whole = tok(text, add_special_tokens=False)["input_ids"]
    blocks, dropped = pack(tokenize_documents(iter(pieces), tok), 64, tok.eos_token_id, "packed", 0, keep_tail=True)
    stream = blocks[:].ravel()[: int(blocks.lengths.sum())].tolist()
    assert stream == whole + [tok.eos_token_id]  # one document: one EOS, at its end, no BOS inside


def test_datasets_directories_read_their_own_shards_in_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"the {w}", "n": i} for i, w in enumerate(["of", "and", "to", "in", "a"])]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    (tmp_path / "ds" / "stray.arrow").write_bytes(b"not listed in state.json, not read")
    files = expand_sources([str(tmp_path / "ds")])
    assert [f.name for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert list(iter_documents(files)) == [r["text"] for r in rows]
    with pytest.raises(UserError, match="column 'n' holds int64, not text"):
        list(iter_documents(files, field="n"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict with splits train: pass one of them.*dd/train"):
        expand_sources([str(tmp_path / "dd")])
    state = tmp_path / "ds" / "state.json"  # a directory is input: its file names must stay inside it
    state.write_text(json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}))
    with pytest.raises(UserError, match="outside its directory"):
        expand_sources([str(tmp_path / "ds")])


def test_arrow_files_in_both_ipc_formats(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather
    table = pa.table({"text": ["the of", None, "and to"]})
    feather.write_feather(table, str(tmp_path / "a.feather"))
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    files = expand_sources([str(tmp_path)])
    assert list(iter_documents(files)) == ["the of", "and to"] * 2
