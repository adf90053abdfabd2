"""Long-context evaluation: perplexity by position against NumPy, retrieval with an oracle."""
import jax.numpy as jnp
import numpy as np
import ml_collections

from ctxjax import evaluate
from ctxjax.data import make_tokenizer


def test_perplexity_by_position_matches_numpy():
    rng = np.random.default_rng()
    vocab, b, t = 11, 3, 40
    table = rng.standard_normal((vocab, vocab))
    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
    seg[0, -5:] = 0
    pos = np.zeros_like(seg)
    for r in range(b):  # positions reset per document
        for i in range(1, t):
            pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
    batch = dict(tokens=rng.integers(0, vocab, (b, t)), segment_ids=seg, token_index=np.tile(np.arange(t), (b, 1)),
                 rope_positions=pos)
    rows = evaluate.perplexity_by_position(lambda x: jnp.asarray(table[x["tokens"]], jnp.float32), [batch], 8)
    logits = table[batch["tokens"]]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for row in rows:
        lo = int(row["positions"].split("-")[0])
        losses = [-logp[r, i, batch["tokens"][r, i + 1]] for r in range(b) for i in range(t - 1)
                  if seg[r, i] != 0 and seg[r, i + 1] == seg[r, i] and lo <= pos[r, i] < lo + 8]
        assert row["tokens"] == len(losses)
        np.testing.assert_allclose(row["loss"], np.mean(losses), rtol=1e-5)


def test_retrieval_finds_the_key_with_an_oracle_and_not_by_chance():
    tokenizer = make_tokenizer(ml_collections.ConfigDict({"tokenizer": "byte"}))
    ids = evaluate.insert_at_depth(tokenizer, evaluate.FILLER, "NEEDLE", " Q?", 300, 0.25)
    assert len(ids) == 300 and ids[0] == tokenizer.bos_id
    at = bytes(i for i in ids[1:] if i < 256).find(b"NEEDLE")
    assert abs(at - 0.25 * (300 - 1 - 6 - 3)) <= 1

    def oracle(batch):  # reads the key back from the prompt: what a perfect model would do
        text = tokenizer.decode([int(t) for t in batch["tokens"][0]])
        key = text.split("pass key is ")[1][:5] if "pass key is " in text else text.split(" is ")[1][:5]
        answered = text.rsplit(" is ", 1)[1]
        logits = np.zeros((1, len(batch["tokens"][0]), tokenizer.vocab_size), np.float32)
        logits[0, -1, ord(key[len(answered)])] = 1.0
        return jnp.asarray(logits)

    perfect = evaluate.retrieval_accuracy(oracle, tokenizer, evaluate.FILLER, [200], [0.1, 0.9], 2, 0, "passkey")
    assert all(row["accuracy"] == 1.0 for row in perfect)
    constant = lambda batch: jnp.zeros((1, len(batch["tokens"][0]), tokenizer.vocab_size))
    blind = evaluate.retrieval_accuracy(constant, tokenizer, evaluate.FILLER, [200], [0.5], 3, 0, "niah")
    assert blind[0]["accuracy"] == 0.0
