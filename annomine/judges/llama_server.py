"""llama-cpp-python's OpenAI-compatible server, with logits computed only where a request reads them.

    python -m annomine.judges.llama_server --model M --logits_all true ...   (the arguments of `llama_cpp.server`)

llama-cpp-python returns log-probabilities only from a model loaded with `logits_all`, and with it every prompt
token's logits are computed and copied: for Qwen2.5-1.5B a 151,936-wide output layer on each of a grading
prompt's ~220 tokens, about half of each request's time on 2 cores. A grading request reads the log-probabilities
of its answer tokens only, and each of those comes from the logits of the position before it: the last prompt
token and then each generated token. Here the model computes the logits of the last token of each evaluated
batch only (the one llama.cpp samples from), and stores them in the row the library reads; the rows of the other
prompt positions are not computed (they would only matter to `echo` with log-probabilities, which annomine never
asks for). Everything else is the stock server, started by its own `main`.
"""

from __future__ import annotations

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


def install() -> None:
    import llama_cpp

    llama_cpp.Llama.eval = eval_last_logits


def main() -> None:
    install()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()
