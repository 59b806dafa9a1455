"""Chat data: the assistant's tokens found by the chat template, packing that keeps conversations whole, and a
cache whose loss mask every logit loss honours."""

import json

import numpy as np
import pytest
import torch

from kdpipe.errors import UserError
from kdpipe.stage1_extract.chat import render_conversation
from kdpipe.stage1_extract.corpus import iter_documents, tokenize_documents
from kdpipe.stage1_extract.packing import pack
from tiny import make_chat_tokenizer, make_tokenizer

CONVERSATION = [{"role": "system", "content": "we are good"},
                {"role": "user", "content": "what is the world"},
                {"role": "assistant", "content": "the world is old"},
                {"role": "user", "content": "and the man"},
                {"role": "assistant", "content": "he is here"}]


def test_the_assistant_turns_and_their_end_are_learned_nothing_else():
    tok = make_chat_tokenizer()
    piece = render_conversation(CONVERSATION, tok)
    words = tok.convert_ids_to_tokens(piece.ids)
    learned = [w for w, m in zip(words, piece.learn) if m]
    # each answer with its end-of-turn marker, as TRL's assistant-only loss counts it; not the "me" role word
    assert learned == "the world is old [EOS] he is here [EOS]".split()
    assert piece.ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    assert all(render_conversation(CONVERSATION, tok, learn_all=True).learn)


def test_a_template_that_rewrites_earlier_turns_and_a_tokenizer_without_one_are_one_line():
    from kdpipe.stage1_extract.chat import check_chat_template
    with pytest.raises(UserError, match="no chat template"):
        check_chat_template(make_tokenizer())
    tok = make_chat_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {{ messages|length }} {% endfor %}"
    with pytest.raises(UserError, match="--learn-all-tokens"):
        render_conversation(CONVERSATION, tok)


def test_packing_keeps_a_conversation_in_one_row_and_its_mask_aligned():
    tok = make_chat_tokenizer()
    pieces = [render_conversation(CONVERSATION[:3], tok), render_conversation(CONVERSATION, tok),
              render_conversation(CONVERSATION[1:3], tok)]
    seq_len = 40
    assert all(len(p.ids) + 1 <= seq_len for p in pieces) and sum(len(p.ids) + 1 for p in pieces) > seq_len
    blocks, dropped = pack(iter(pieces), seq_len, tok.eos_token_id, "packed", tok.pad_token_id, keep_tail=True)
    rows, masks = blocks[:], blocks.masks[:]
    # every conversation lies whole in one row, with its own mask beside it
    for piece in pieces:
        found = [r for r in range(len(rows)) for start in range(seq_len - len(piece.ids) + 1)
                 if rows[r, start:start + len(piece.ids)].tolist() == piece.ids
                 and masks[r, start:start + len(piece.ids)].tolist() == piece.learn]
        assert found, "a conversation was cut across rows"
    assert blocks.learned_tokens == sum(sum(p.learn) for p in pieces) == int(masks.sum())
    assert (masks[np.arange(seq_len)[None, :] >= blocks.lengths[:, None]] == 0).all()  # padding learns nothing
    assert dropped == 0


def test_messages_from_jsonl_and_datasets_and_bad_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = make_chat_tokenizer()
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    datasets.Dataset.from_list([{"messages": CONVERSATION}]).save_to_disk(str(tmp_path / "ds"))
    from kdpipe.stage1_extract.corpus import expand_sources
    for source in (tmp_path / "chat.jsonl", tmp_path / "ds"):
        docs = list(iter_documents(expand_sources([str(source)]), "messages", "messages"))
        assert docs == [CONVERSATION]
        (piece,) = tokenize_documents(iter(docs), tok)
        assert piece == render_conversation(CONVERSATION, tok)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    with pytest.raises(UserError, match="not a list of \\{role, content\\} messages"):
        list(iter_documents([tmp_path / "bad.jsonl"], "messages", "messages"))
    with pytest.raises(UserError, match="plain text, not chat records"):
        (tmp_path / "a.txt").write_text("the")
        list(iter_documents([tmp_path / "a.txt"], "messages", "messages"))


def write_chats(path, n=40, seed=0):
    import random
    from tiny import WORDS
    rng = random.Random(seed)
    say = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": say()} for i in range(rng.choice([2, 4]))]
            f.write(json.dumps({"messages": turns, "id": rng.random()}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory):
    from kdpipe.stage1_extract.extractor import ExtractConfig, extract
    from tiny import save_teacher
    root = tmp_path_factory.mktemp("chat")
    teacher = save_teacher(root / "teacher", "llama", sharpness=30)
    make_chat_tokenizer().save_pretrained(teacher)
    data = write_chats(root / "chats.jsonl")
    extract(ExtractConfig(teacher=str(teacher), data=[str(data)], out=str(root / "cache"), seq_len=48, top_k=16,
                          sample_count=8, messages_field="messages", sequences_per_unit=4, quiet=True))
    return teacher, data, root / "cache"


def test_the_cache_stores_the_mask_of_the_packed_conversations(chat_cache):
    from kdpipe.storage.reader import TeacherCache
    _, data, cache_path = chat_cache
    tok = make_chat_tokenizer()
    pieces = [render_conversation(json.loads(line)["messages"], tok) for line in data.read_text().splitlines()]
    blocks, _ = pack(iter(pieces), 48, tok.eos_token_id, "packed", tok.pad_token_id)
    cache = TeacherCache(cache_path)
    np.testing.assert_array_equal(cache.input_ids(), blocks[:])
    np.testing.assert_array_equal(cache.loss_mask(), blocks.masks[:].astype(bool))
    d = cache.manifest.data
    assert d.loss_mask == "assistant" and d.learned_tokens == int(cache.loss_mask().sum()) > 0
    assert 0.2 < d.learned_tokens / d.num_tokens < 0.8  # the users' turns and the template are not learned


@pytest.mark.parametrize("spec", ["kd", "kd:estimator=renorm", "kd:estimator=sampled", "lm", "annealing_kd"])
def test_every_logit_loss_ignores_what_the_student_does_not_learn(spec, chat_cache):
    """Logits at positions whose next token is not learned (a user's turn, the template) cannot move the loss;
    logits that predict an assistant token do."""
    from kdpipe.stage2_distill.methods import Batch, Context, StudentOutput
    from kdpipe.stage2_distill.methods.base import build_methods
    from kdpipe.storage.reader import TeacherCache
    cache = TeacherCache(chat_cache[2])
    m, rows = cache.manifest, slice(0, 8)
    ids, logp, lse = cache.topk_logprobs(rows)
    sampled_ids, counts = cache.sampled(rows)
    lengths = torch.from_numpy(cache.lengths(rows))
    t = m.data.seq_len
    batch = Batch(input_ids=torch.from_numpy(cache.input_ids(rows)).long(), mask=torch.arange(t)[None] < lengths[:, None],
                  loss_mask=torch.from_numpy(cache.loss_mask(rows)), topk_ids=torch.from_numpy(ids),
                  topk_logprobs=torch.from_numpy(logp), logsumexp=torch.from_numpy(lse),
                  logtail=torch.from_numpy(cache.logtail(rows)), sampled_ids=torch.from_numpy(sampled_ids),
                  sampled_counts=torch.from_numpy(counts), sampled_logprobs=torch.from_numpy(cache.sampled_logprobs(rows)))
    ctx = Context(teacher=m.teacher, temperatures=m.signals.temperatures, student_layers=2, student_hidden=32,
                  total_steps=10, teachers=[m.teacher], teacher_temperatures=[m.signals.temperatures],
                  teacher_sample_temperatures=[m.signals.sample_temperature])
    (method,) = build_methods([spec], ctx)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, t, m.teacher.vocab_size, generator=g)
    learned_next = torch.cat([batch.targets[:, 1:], batch.loss_mask[:, -1:] & batch.mask[:, -1:]], 1)
    free = ~(batch.predicts | learned_next)
    assert free.any() and (~free).any()
    base = sum(method.loss(batch, StudentOutput(logits=logits), 9).values())
    moved = logits.clone()
    moved[free] += 5 * torch.randn(int(free.sum()), logits.shape[-1], generator=g)
    torch.testing.assert_close(sum(method.loss(batch, StudentOutput(logits=moved), 9).values()), base)
    moved = logits.clone()
    moved[~free] += 5 * torch.randn(int((~free).sum()), logits.shape[-1], generator=g)
    assert not torch.isclose(sum(method.loss(batch, StudentOutput(logits=moved), 9).values()), base)


def test_a_student_distilled_on_chat_moves_toward_the_teacher_on_the_assistant_tokens(chat_cache, tmp_path):
    from kdpipe.stage2_distill.trainer import DistillConfig, distill
    r = distill(DistillConfig(cache=[str(chat_cache[2])], student="teacher:layers=2", out=str(tmp_path / "run"),
                              method=["kd", "lm:weight=0.5"], steps=60, batch_size=4, lr=3e-3, eval_sequences=4,
                              quiet=True))
    # a random tiny teacher: its KL on the assistant's tokens is the property (perplexity is the slow test's)
    assert r.final["eval/kl_teacher"] < 0.85 * r.initial["eval/kl_teacher"]
