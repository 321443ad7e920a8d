#!/usr/bin/env python3
"""Writes Arbor's golden files from llama.cpp (llama-cpp-python) on the real GGUF models.

    pip install llama-cpp-python==0.3.36 gguf==0.19.0 numpy   # builds llama.cpp (~15 min)
    cargo run -p arbor-server -- fetch smollm2-135m            # and qwen2.5-coder-0.5b
    python3 scripts/make-goldens.py                            # writes tests/goldens/*.json

For each model:
  * <model>.logits.json: for every prompt, its llama.cpp tokens, llama.cpp's top-20 logits (ids
    and values) at a few positions with the float64 numpy reference's logits for the same ids
    (see `Reference`), and the 32-token greedy continuation (argmax of llama.cpp's logits, one
    token at a time) with the top-2 gap at each step, and the reference's own greedy
    continuation with its gaps.
  * <model>.chat.json: the model's chat template rendered by jinja2 as Hugging Face does
    (`--chat-only` writes just these).
  * <model>.tokens.json: llama.cpp's tokenization (add_bos as the model says, special=True)
    of the >= 100 texts in tests/goldens/tokenizer-texts.json.
"""
import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
MODELS_DIR = Path(os.environ.get("ARBOR_MODELS", Path.home() / ".cache" / "arbor" / "models"))
MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct.gguf",
}
# A greedy step is a sharp oracle only where it is not a near-tie: llama.cpp's own logits move
# by ~0.1 between batched and incremental evaluation (activation quantization), so a step whose
# top-2 gap is smaller than that is decided by noise. The top-2 gap of every greedy step is
# recorded ("greedy_margins") and the tests use it (see tests/src/parity.rs).
PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, Neil Armstrong became the first person to walk on the moon. Twelve astronauts",
    "One, two, three, four, five, six,",
]
TOP = 20
GREEDY = 32


class Reference:
    """An independent float64 numpy forward pass over the GGUF's dequantized weights (the `gguf`
    package's dequantizer): llama.cpp's RoPE conventions (NORM = interleaved pairs for llama,
    NEOX = halves for qwen2), no activation quantization. Arbor's f32 forward should match it to
    float rounding; llama.cpp differs from both by its 8-bit activation quantization."""

    def __init__(self, path):
        r = gguf.GGUFReader(str(path))
        field = lambda k: r.fields[k].parts[r.fields[k].data[0]]
        self.arch = bytes(field("general.architecture")).decode()
        a = self.arch
        self.n_layers = int(field(f"{a}.block_count")[0])
        self.n_heads = int(field(f"{a}.attention.head_count")[0])
        self.n_kv = int(field(f"{a}.attention.head_count_kv")[0])
        self.eps = float(field(f"{a}.attention.layer_norm_rms_epsilon")[0])
        self.theta = float(field(f"{a}.rope.freq_base")[0])
        self.w = {}
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))
            self.w[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        self.d = self.w["token_embd.weight"].shape[1]
        self.hd = self.d // self.n_heads

    def rope(self, x, pos):  # x: [n, heads, hd]
        hd = self.hd
        inv = self.theta ** (-np.arange(0, hd, 2) / hd)
        ang = np.outer(pos, inv)[:, None, :]
        c, s = np.cos(ang), np.sin(ang)
        if self.arch == "llama":
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x1 * c - x2 * s
            out[..., 1::2] = x2 * c + x1 * s
            return out
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def logits(self, tokens):
        w, n = self.w, len(tokens)
        norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * g
        lin = lambda x, name: x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)
        x = w["token_embd.weight"][tokens]
        pos = np.arange(n)
        mask = np.triu(np.full((n, n), -np.inf), 1)
        g = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}"
            h = norm(x, w[p + ".attn_norm.weight"])
            q = self.rope(lin(h, p + ".attn_q").reshape(n, self.n_heads, self.hd), pos)
            k = self.rope(lin(h, p + ".attn_k").reshape(n, self.n_kv, self.hd), pos)
            v = lin(h, p + ".attn_v").reshape(n, self.n_kv, self.hd)
            k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
            sc = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(self.hd) + mask
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            att = np.einsum("hqk,khd->qhd", sc, v).reshape(n, -1)
            x = x + lin(att, p + ".attn_output")
            h = norm(x, w[p + ".ffn_norm.weight"])
            gate = lin(h, p + ".ffn_gate")
            x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + ".ffn_up"), p + ".ffn_down")
        x = norm(x, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return x @ head.T


def texts():
    base = [
        "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a", "A", "hello", " hello", "hello world",
        "Hello, World!", "HELLO   WORLD", "It's", "it's we're they've I'm you'll he'd",
        "don't DON'T Don't", "12", "123", "1234567890", "3.14159", "-42", "1,000,000", "0x1F",
        "2024-11-23", "v1.2.3", "$100.00", "50%", "#hashtag @user", "email@example.com",
        "https://example.com/path?q=1&x=2", "C:\\Windows\\System32", "/usr/local/bin",
        "café", "naïve résumé", "Zürich Straße", "ñandú", "Ελληνικά", "русский язык",
        "日本語のテキスト", "中文文本测试", "한국어", "العربية", "עברית", "हिन्दी", "ไทย",
        "emoji 🌳🚀👍🏽", "🇫🇷", "👨‍👩‍👧‍👦", "math ∑∫√∞≠≤", "arrows →←↑↓", "«quotes» “smart” ‘single’",
        "em—dash en–dash", "ellipsis…", "non\u00a0breaking", "zero\u200bwidth", "tab\tseparated\tvalues",
        "line1\nline2\r\nline3\rline4", "trailing spaces   ", "   leading spaces", "a  b   c    d",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "fn main() { println!(\"hi\"); }", "SELECT * FROM users WHERE id = 42;",
        "<html><body><p>Hi</p></body></html>", "{\"key\": [1, 2, {\"nested\": null}]}",
        "x = [i**2 for i in range(10) if i % 2 == 0]", "#include <stdio.h>\nint main(void) {}",
        "    indented\n        more\n\tmixed", "if a != b && c >= d || !e:", "a+b-c*d/e%f^g",
        "__init__ __name__ == '__main__'", "camelCaseIdentifier snake_case_identifier",
        "CONSTANT_VALUE kebab-case-name", "print('single') + print(\"double\")",
        "```python\nprint(1)\n```", "# Heading\n\n- item 1\n- item 2", "**bold** _italic_ `code`",
        "The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "To be, or not to be, that is the question:", "I can't believe it's not butter!!!",
        "What?! No way... really???", "(parentheses) [brackets] {braces} <angles>",
        "a.b.c.d", "a,b,c,d", "a;b;c;d", "a:b:c:d", "a|b|c|d", "a~b~c", "...", "---", "===",
        "!!!", "???", "a\u0301", "ﬁ ligature", "Ⅻ roman", "½ ¾ ⅓", "°C °F", "©®™",
        "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "text<|im_end|>more",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
        "<s> </s> <unk>", "<|endoftext|><|endoftext|>", "1 2 3 4 5 6 7 8 9 10",
        "99 bottles of beer on the wall", "000123", "1e-10 2.5E+3", "０１２ full-width",
        "𝓕𝓪𝓷𝓬𝔂 𝕥𝕖𝕩𝕥", "\u2028\u2029", "tricky 's 'S 'T 'RE", "it'll 'll", "a'b'c",
    ]
    assert len(base) >= 100, len(base)
    return base


def run_model(name, file):
    path = MODELS_DIR / file
    if not path.exists():
        sys.exit(f"{path} missing: run `arbor fetch {name}` first")
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    ref = Reference(path)
    logits_out = {"model": name, "file": file, "llama_cpp_python": __import__("llama_cpp").__version__,
                  "top": TOP, "prompts": []}
    for prompt in PROMPTS:
        toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(toks)
        scores = np.array(llm.scores[: len(toks)])
        positions = sorted({0, 1, len(toks) // 3, len(toks) // 2, len(toks) - 2, len(toks) - 1})
        ref_scores = ref.logits(toks)
        tops = []
        for p in positions:
            ids = np.argsort(-scores[p], kind="stable")[:TOP]
            tops.append({"position": p, "ids": [int(i) for i in ids],
                         "logits": [float(scores[p][i]) for i in ids],
                         "reference_logits": [float(ref_scores[p][i]) for i in ids]})
        greedy, margins = [], []
        row = scores[len(toks) - 1]
        for _ in range(GREEDY):
            top2 = np.sort(row)[-2:]
            margins.append(float(top2[1] - top2[0]))
            nxt = int(np.argmax(row))
            greedy.append(nxt)
            llm.eval([nxt])
            row = np.array(llm.scores[llm.n_tokens - 1])
        ref_greedy, ref_margins, seq = [], [], list(toks)
        row = ref_scores[-1]
        for _ in range(GREEDY):
            top2 = np.sort(row)[-2:]
            ref_margins.append(float(top2[1] - top2[0]))
            ref_greedy.append(int(np.argmax(row)))
            seq.append(ref_greedy[-1])
            row = ref.logits(seq)[-1]
        logits_out["prompts"].append({"prompt": prompt, "tokens": toks, "top": tops, "greedy": greedy,
                                      "greedy_margins": margins, "reference_greedy": ref_greedy,
                                      "reference_greedy_margins": ref_margins})
    (GOLDENS / f"{name}.logits.json").write_text(json.dumps(logits_out, indent=1))

    tok_out = {"model": name, "cases": []}
    for t in texts():
        tok_out["cases"].append({"text": t, "ids": llm.tokenize(t.encode(), add_bos=True, special=True)})
    (GOLDENS / f"{name}.tokens.json").write_text(json.dumps(tok_out, ensure_ascii=False, indent=0))
    print(f"{name}: {len(logits_out['prompts'])} prompts, {len(tok_out['cases'])} tokenizer cases")


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku.\nAbout  trees."}],
]


def chat_goldens(name, file):
    """The model's chat template rendered as Hugging Face renders it (jinja2, trim_blocks,
    lstrip_blocks), with the generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    r = gguf.GGUFReader(str(MODELS_DIR / file))
    f = r.fields["tokenizer.chat_template"]
    template = bytes(f.parts[f.data[0]]).decode()
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise RuntimeError(msg)

    env.globals["raise_exception"] = raise_exception
    t = env.from_string(template)
    cases = [{"messages": m, "rendered": t.render(messages=m, add_generation_prompt=True,
                                                    bos_token="", eos_token="")}
             for m in CONVERSATIONS]
    (GOLDENS / f"{name}.chat.json").write_text(json.dumps({"model": name, "cases": cases}, indent=1))


def main():
    GOLDENS.mkdir(parents=True, exist_ok=True)
    args = sys.argv[1:]
    chat_only = "--chat-only" in args
    wanted = [a for a in args if not a.startswith("--")] or list(MODELS)
    for name in wanted:
        chat_goldens(name, MODELS[name])
        if not chat_only:
            run_model(name, MODELS[name])


if __name__ == "__main__":
    main()
