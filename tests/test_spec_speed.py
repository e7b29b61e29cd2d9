"""The pieces that make speculative decoding fast on a CPU, held to the plain computation.

The lean draft runner: its logits equal HF's forward for each supported decoder family, through prefill,
single steps, multi-token feeds, crops, an embedded prefix and buffer growth; other models keep HF's forward.
The weight-first product for the few-row check: the same logits, only inside its block."""

import pytest
import torch

from medmm.errors import ConfigError
from medmm.inference.decoding import CausalRunner, DraftProposer, crop_cache, narrow_linears, quantize_draft
from medmm.inference.lean import LeanRunner, lean_unsupported

SMALL = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _model(kind: str, **extra):
    import transformers as tf

    torch.manual_seed(0)
    cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig, "gpt2": tf.GPT2Config}[kind]
    kw = dict(SMALL)
    if kind == "gpt2":
        kw = {"vocab_size": 97, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}
    if kind == "llama":
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}  # a scaled rope: the model's own tables
    if kind == "qwen3":
        kw["head_dim"] = 16  # qwen3 sets head_dim on its own; q/k norms per head
    model = tf.AutoModelForCausalLM.from_config(cfg(**kw, **extra), attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.rand_like(p) * 0.5)
    return model


class _Reference:
    """HF's forward with a DynamicCache, the runner the lean one replaces."""

    def __init__(self, llm):
        self.runner, self.cache = CausalRunner(llm), None

    def forward(self, ids=None, embeds=None):
        logits, self.cache, _ = self.runner.forward(self.cache, ids=ids, embeds=embeds)
        return logits[-1]

    def crop(self, n):
        crop_cache(self.cache, n)


def _check_same(llm, capacity: int = 4, tol: float = 1e-4):
    lean, ref = LeanRunner(llm, capacity=capacity), _Reference(llm)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(1, 5, llm.config.hidden_size, generator=g) * 0.5  # spliced prompt embeddings
    feeds = [("embeds", prefix), ("ids", [3, 7, 11]), ("ids", [5]), ("ids", [9]), ("crop", 6), ("ids", [2, 8, 4, 1]),
             ("ids", [6]), ("crop", 9), ("ids", [10, 12])] + [("ids", [i % 90 + 3]) for i in range(20)]
    for kind, x in feeds:
        if kind == "crop":
            lean.crop(x)
            ref.crop(x)
            continue
        a = lean.forward(embeds=x) if kind == "embeds" else lean.forward(ids=x)
        b = ref.forward(embeds=x) if kind == "embeds" else ref.forward(ids=x)
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=tol, rtol=tol), (kind, (a - b).abs().max())
    assert lean.length == ref.cache.get_seq_length() and lean.capacity > capacity  # it grew past 4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_lean_runner_matches_hf_forward(kind):
    _check_same(_model(kind))


def test_lean_runner_on_an_int8_draft_matches_hf_forward_of_the_same_draft():
    # dynamic int8 scales activations by the rows in the call, and HF's head sees every fed position where the
    # lean runner's sees the last: a multi-token feed differs in rounding (single steps agree exactly)
    _check_same(quantize_draft(_model("llama")), tol=2e-2)


def test_unsupported_models_keep_hf_forward():
    gpt2 = _model("gpt2")
    assert "gpt2" in lean_unsupported(gpt2)
    with pytest.raises(ValueError, match="lean runner"):
        LeanRunner(gpt2)
    assert DraftProposer(gpt2).lean is None  # auto falls back to HF's forward
    with pytest.raises(ConfigError, match="draft_runner=lean"):
        DraftProposer(gpt2, runner="lean")
    windowed = _model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert "sliding" in lean_unsupported(windowed)
    mistral = _model("mistral", sliding_window=8)
    runner = LeanRunner(mistral)  # within the window it is full attention; past it, an error, never a wrong answer
    runner.forward(ids=list(range(1, 9)))
    with pytest.raises(ValueError, match="sliding window"):
        runner.forward(ids=[3])


def test_draft_proposer_guesses_the_same_with_either_runner():
    llm = _model("llama")
    seq = [4, 9, 13, 2, 7]
    lean, hf = DraftProposer(llm, runner="lean"), DraftProposer(llm, runner="hf")
    assert lean.lean is not None and hf.lean is None
    for extra in ([], [5, 6], [5, 8, 1]):  # the next call shares a prefix with the last one (a crop, then a feed)
        assert lean(seq + extra, 4) == hf(seq + extra, 4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_narrow_linears_give_the_same_logits_and_leave_the_model_as_it_was(kind):
    llm = _model(kind)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 41, 8, 2, 13, 17, 30, 11, 6, 19, 23, 4, 12]])  # 18 tokens
    linears = [m for m in llm.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        plain = llm(input_ids=ids).logits
        with narrow_linears(llm):
            assert all("forward" in m.__dict__ for m in linears)
            for t in (1, 2, 7, 16, 17, 18):  # 2..16 rows take W @ x.T; 1 and 17+ keep F.linear
                got = llm(input_ids=ids[:, :t]).logits
                assert torch.allclose(got, plain[:, :t], atol=1e-5, rtol=1e-5), t
        assert not any("forward" in m.__dict__ for m in linears)  # restored
        boom = pytest.raises(RuntimeError, match="inside")
        with boom, narrow_linears(llm):
            raise RuntimeError("inside")
        assert not any("forward" in m.__dict__ for m in linears)  # restored after an error too
