"""llama-cpp-python's OpenAI-compatible server, with logits computed only where a request reads them.

    python -m annomine.judges.llama_server --model M --logits_all true ...   (the arguments of `llama_cpp.server`)

llama-cpp-python returns log-probabilities only from a model loaded with `logits_all`, and with it every prompt
token's logits are computed and copied: for Qwen2.5-1.5B a 151,936-wide output layer on each of a grading
prompt's ~220 tokens, about half of each request's time on 2 cores. A grading request reads the log-probabilities
of its answer tokens only, and each of those comes from the logits of the position before it: the last prompt
token and then each generated token. Here the model computes the logits of the last token of each evaluated
batch only (the one llama.cpp samples from), and stores them in the row the library reads; the rows of the other
prompt positions are not computed (they would only matter to `echo` with log-probabilities, which annomine never
asks for).

The library then builds a completion's log-probabilities with a log-softmax over every row of the context and a
Python sort of the whole vocabulary for each answer token: ~1.9 s of a ~4.4 s grading request for Qwen2.5-1.5B.
Here the log-softmax covers the answer tokens' rows only and the top alternatives come from a partial selection,
with the library's order (by log-probability, ties by the higher token id) and its response shape, so the answers
and the numbers are the library's. Streaming and `echo` requests take the library's own path. Everything else is
the stock server, started by its own `main`.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def eval_last_logits(self, tokens) -> None:
    """`llama_cpp.Llama.eval` computing and storing the logits of each batch's last token only."""
    self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
    for start in range(0, len(tokens), self.n_batch):
        batch = tokens[start:min(len(tokens), start + self.n_batch)]
        n_past = self.n_tokens
        self._batch.set_batch(batch=batch, n_past=n_past, logits_all=False)  # flags the last token only
        self._ctx.decode(self._batch)
        self.input_ids[n_past:n_past + len(batch)] = batch
        if self._logits_all:
            last = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(self._n_vocab,))
            self.scores[n_past + len(batch) - 1, :] = last
        self.n_tokens += len(batch)
        self._requires_eval = False


def top_alternatives(row: np.ndarray, k: int) -> list[tuple[Any, int]]:
    """The k highest (log-probability, token id) pairs of a row, in `sorted(zip(row, ids), reverse=True)` order."""
    k = min(k, len(row))
    if k <= 0:
        return []
    kth = np.partition(row, len(row) - k)[len(row) - k]
    candidates = np.flatnonzero(row >= kth)
    return sorted(((row[i], int(i)) for i in candidates), reverse=True)[:k]


def completion_logprobs(llm, prompt_tokens: list[int], completion_tokens: list[int], top_k: int,
                        text_offset: int) -> dict:
    """A completion's `logprobs` (without echo) as llama-cpp-python shapes them, reading the answer tokens' rows only.

    The log-probabilities of answer token i come from the logits of the position before it: row P - 1 + i of the
    context's scores, P the prompt's length.
    """
    import llama_cpp

    first = len(prompt_tokens) - 1
    rows = llama_cpp.Llama.logits_to_logprobs(llm._scores[first:first + len(completion_tokens)])
    out: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    bos = llm.token_bos()
    for idx, (token, row) in enumerate(zip(completion_tokens, rows)):
        if token == bos:
            continue
        before = completion_tokens[:idx]
        token_str = llm.detokenize([token], prev_tokens=before).decode("utf-8", errors="ignore")
        out["text_offset"].append(text_offset + len(llm.detokenize(before).decode("utf-8", errors="ignore")))
        out["tokens"].append(token_str)
        out["token_logprobs"].append(row[int(token)])
        top = {llm.detokenize([i], prev_tokens=before).decode("utf-8", errors="ignore"): logprob
               for logprob, i in top_alternatives(row, top_k)}
        top.update({token_str: row[int(token)]})
        out["top_logprobs"].append(top)
    return out


_stock_create_completion = None


def create_completion_answer_logprobs(self, *args, **kwargs) -> Iterator[dict]:
    """`llama_cpp.Llama._create_completion`, with a request's log-probabilities built by `completion_logprobs`."""
    top_k = kwargs.get("logprobs")
    if args or top_k is None or kwargs.get("stream") or kwargs.get("echo") or not self._logits_all:
        yield from _stock_create_completion(self, *args, **kwargs)  # (without logits_all: the library's error)
        return
    import llama_cpp

    seen: dict[str, list[int]] = {}
    stock_generate = self.generate

    def recording_generate(tokens, *gen_args, **gen_kwargs):
        seen["prompt"], seen["answer"] = list(tokens), []
        for token in stock_generate(tokens, *gen_args, **gen_kwargs):
            seen["answer"].append(token)
            yield token

    self.generate = recording_generate
    try:
        for chunk in _stock_create_completion(self, **{**kwargs, "logprobs": None}):
            answer = seen.get("answer", [])
            if answer and llama_cpp.llama_vocab_is_eog(self._model.vocab, answer[-1]):
                answer = answer[:-1]  # the end-of-generation token ends the loop without joining the completion
            chunk["choices"][0]["logprobs"] = completion_logprobs(
                self, seen.get("prompt", []), answer, int(top_k), len(kwargs.get("prompt") or ""))
            yield chunk
    finally:
        del self.generate


def install() -> None:
    import llama_cpp

    global _stock_create_completion
    llama_cpp.Llama.eval = eval_last_logits
    if llama_cpp.Llama._create_completion is not create_completion_answer_logprobs:
        _stock_create_completion = llama_cpp.Llama._create_completion
        llama_cpp.Llama._create_completion = create_completion_answer_logprobs


def main() -> None:
    install()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()
