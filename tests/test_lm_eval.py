"""lm-eval's HFLM on RaBiT models (in memory: quantized, or loaded by rabit.load; or a saved directory that lm-eval
loads itself): a multiple-choice task written here (JSONL + task YAML, no network) scores exactly what the model's
own log-likelihoods give."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import rabit_compiler as rabit

WORDS = [f"w{i}" for i in range(30)]
TASK = "rabit_tiny_mc"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per word, so a context and its choice tokenize to the concatenation of their tokens."""
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(WORDS)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def packed() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    assert len(rabit.quantize_(model, progress=False).quantized) == 14
    return model


def write_task(directory: Path, docs: list[dict]) -> None:
    (directory / "docs.jsonl").write_text("\n".join(json.dumps(doc) for doc in docs))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {directory / 'docs.jsonl'}}}\n"
        f"  cache_dir: {directory / 'datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n")


def choice_loglikelihoods(model: torch.nn.Module, tokenizer, doc: dict) -> list[float]:
    """``log p(choice | question)`` per choice: the sum over the choice's tokens, each scored by the logits at the
    position before it (lm-eval joins question and choice with its target delimiter, a space)."""
    context = tokenizer(doc["question"])["input_ids"]
    scores = []
    for choice in doc["choices"]:
        continuation = tokenizer(choice)["input_ids"]
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
        scores.append(logp[positions, ids[0, positions + 1]].sum().item())
    return scores


@pytest.mark.parametrize("source", ["quantize_", "rabit.load", "directory"])
def test_lm_eval_accuracy_equals_the_one_from_the_models_loglikelihoods(packed, tokenizer, tmp_path, source):
    rng = random.Random(0)
    docs = [{"question": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))),
             "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(3)],
             "answer": rng.randrange(3)} for _ in range(12)]
    write_task(tmp_path, docs)
    by_hand = [choice_loglikelihoods(packed, tokenizer, doc) for doc in docs]
    predictions = [max(range(3), key=scores.__getitem__) for scores in by_hand]
    assert all(sorted(s)[-1] - sorted(s)[-2] > 1e-3 for s in by_hand)  # no near-tie: the argmax is well defined
    correct = sum(p == doc["answer"] for p, doc in zip(predictions, docs, strict=True))
    assert 0 < correct < len(docs)  # the accuracy separates right from wrong answers

    model = packed
    if source != "quantize_":  # "directory": lm-eval loads it with from_pretrained (rabit_compiler is imported)
        rabit.save(packed, tmp_path / "model")
        model = rabit.load(tmp_path / "model") if source == "rabit.load" else str(tmp_path / "model")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    results = simple_evaluate(model=lm, tasks=[TASK], log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))

    assert results["results"][TASK]["acc,none"] == correct / len(docs)
    for sample in results["samples"][TASK]:
        reported = [response[0][0] for response in sample["resps"]]
        assert reported == pytest.approx(by_hand[sample["doc_id"]], rel=1e-5, abs=1e-5)  # fp32, other batching
