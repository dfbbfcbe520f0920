"""One BOS, never two: a Llama-class tokenizer adds BOS to any text and a Llama 3- or Gemma-style chat template
writes it too. Every path that tokenises a prompt (SFT, the PPO query, hf and vLLM generation, the scorer, the
RM) must give the same ids, starting with exactly one BOS - also where the template writes none and the tokenizer
adds it (`model.chat_template: plain` on a base model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.generation import Generator, Sampling, chat_prompt
from align.models import PLAIN_TEMPLATE, prompt_ids
from align.reward import rm_ids
from align.scoring import Scorer
from align.training import tokenize_pair
from tests.conftest import ROOT
from tests.helpers import engine
from tests.tiny import LLAMA3_TEMPLATE, make_llama_base

QUESTIONS = ["What is the capital of France?", "Add 1 and 2."]


@pytest.fixture(scope="module", params=["template writes bos", "plain template"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 128: head_dim 32, which vLLM's CPU attention has a kernel for."""
    template = LLAMA3_TEMPLATE if request.param == "template writes bos" else PLAIN_TEMPLATE
    return make_llama_base(tmp_path_factory.mktemp("bos") / "model", chat_template=template, hidden=128)


def one_bos(ids: list[int], bos: int) -> bool:
    return ids[0] == bos and bos not in ids[1:]


def chat(tokenizer, question: str) -> str:  # noqa: ANN001
    return chat_prompt(tokenizer, [{"role": "user", "content": question}], system="Be brief.")


def test_sft_and_the_ppo_query_start_with_one_bos_and_agree(model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    for question in QUESTIONS:
        query = prompt_ids(tokenizer, chat(tokenizer, question))  # what PPO scores a rollout's response after
        example = tokenize_pair(tokenizer, question, "Paris.", system="Be brief.")
        assert one_bos(query, tokenizer.bos_token_id) and one_bos(example["input_ids"], tokenizer.bos_token_id)
        assert example["input_ids"][: len(query)] == query and example["labels"][len(query)] != -100


def test_hf_generation_scoring_and_the_rm_feed_one_bos(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = Generator(model, engine(backend="hf"))
    tokenizer, bos = generator.tokenizer, generator.tokenizer.bos_token_id
    fed = []
    original = generator._impl.base.generate

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        fed.extend(row[mask.bool()].tolist() for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(generator._impl.base, "generate", spy)
    texts = [chat(tokenizer, q) for q in QUESTIONS]
    generator.generate(texts, Sampling(max_new_tokens=2))
    assert fed == [prompt_ids(tokenizer, t) for t in texts] and all(one_bos(ids, bos) for ids in fed)

    scorer = Scorer(model)
    scored = []
    forward = scorer._forward

    def record(ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        scored.extend(ids)
        return forward(ids, **kwargs)

    monkeypatch.setattr(scorer, "_forward", record)
    scorer.next_token_logits(texts, [5])
    scorer.continuation_logprobs(texts[0], [" Paris", " Rome"])
    assert len(scored) == 4 and all(one_bos(ids, bos) for ids in scored)

    template = (ROOT / "assets/rm_prompt.txt").read_text()
    assert one_bos(rm_ids(tokenizer, template, ["Be brief."], QUESTIONS[0], "Paris.", 64, 64), bos)


@pytest.mark.slow
def test_vllm_is_given_the_same_ids(model: Path) -> None:
    pytest.importorskip("vllm")
    with Generator(model, engine(backend="vllm", kv_cache_gb=1)) as generator:
        texts = [chat(generator.tokenizer, q) for q in QUESTIONS]
        llm = generator._impl.llm
        outputs = []
        original = llm.generate

        def record(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            outputs.extend(original(*args, **kwargs))
            return outputs

        llm.generate = record
        generator.generate(texts, Sampling(max_new_tokens=2))
        bos = generator.tokenizer.bos_token_id
        assert [o.prompt_token_ids for o in outputs] == [prompt_ids(generator.tokenizer, t) for t in texts]
        assert all(one_bos(o.prompt_token_ids, bos) for o in outputs)
