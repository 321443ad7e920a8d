"""Helpers shared by the scripts that time llama.cpp through llama-cpp-python."""
import numpy as np


def greedy_next(llm):
    """The argmax of the logits after the last token `llm.eval` processed.

    llama-cpp-python 0.3.x fills `llm.scores` only with `logits_all=True` (without it the
    rows stay zero and an argmax over them always reads token 0), so the last row is read
    from the context itself, as llama.cpp's own samplers do.
    """
    row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(np.argmax(row))


def is_end(llm, token):
    """Whether `token` ends generation (any end-of-generation token of the vocabulary, as
    llama.cpp's own generation loop and Arbor check — Qwen2.5 ends code with `<|endoftext|>`,
    not the `<|im_end|>` that `token_eos()` names)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))
