"""
Tests for mdlm.py, in the order of its sections, then the harness. CPU only, tiny configs, fixed
seeds. Run with (the lab's tests beside them):

    python -m pytest -q -rs test_mdlm.py lab/test_lab.py

They read Tiny Shakespeare from ./input.txt, which is in the repository; nothing reaches the network.
"""

import ast
import contextlib
import hashlib
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import mdlm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = mdlm.DEFAULT_DATA
TINY = ['--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--batch-size', '8',
        '--eval-iters', '2', '--dtype', 'float32', '--device', 'cpu', '--data', DATA]   # float32 in subprocesses too
MASK = 65

@pytest.fixture(scope='session', autouse=True)
def float32_cpu():
    """Every test runs the float32 path, whatever this CPU has: the same digits on both CPU kinds.
    Tests of the bf16 path patch this back."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mdlm, 'cpu_has_bf16', lambda: False)
        yield

def tiny_model(use_time=True, vocab_size=66, block_size=32, seed=0, dropout=0.0, causal=False):
    torch.manual_seed(seed)
    cfg = mdlm.ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                           dropout=dropout, use_time=use_time, causal=causal)
    return mdlm.MDLM(cfg).eval()

def tiny_gpt(seed=0, block_size=32):
    return tiny_model(use_time=False, block_size=block_size, seed=seed, causal=True)

def sampler(**kw):
    return mdlm.SamplerConfig(**kw)

def run_cli(*argv, timeout=120):
    """The script in a subprocess: the honest way to see exit codes and tracebacks."""
    return subprocess.run([sys.executable, os.path.join(HERE, 'mdlm.py'), *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)

def one_line_error(result, needle):
    assert result.returncode != 0, result
    assert 'Traceback' not in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr

def count_calls(model, inputs=False):
    """Wrap model.forward: returns a list that gets each call's number of rows (or its input)."""
    rows, orig = [], model.forward
    model.forward = lambda xt, t: (rows.append(xt.clone() if inputs else xt.size(0)), orig(xt, t))[1]
    return rows

@pytest.fixture(scope='module')
def text():
    return mdlm.load_text(DATA)

@pytest.fixture(scope='module')
def tok(text):
    return mdlm.Tokenizer(sorted(set(text)))

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny model trained for 40 steps: enough for the CLI paths, not for good text."""
    out = str(tmp_path_factory.mktemp('trained'))
    assert mdlm.main(['--train', '--max-iters', '40', '--eval-interval', '20', '--out-dir', out, *TINY]) == 0
    return out

@pytest.fixture(scope='module')
def trained_gpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('trained_gpt'))
    assert mdlm.main(['--train', '--gpt', '--max-iters', '40', '--eval-interval', '20', '--out-dir', out, *TINY]) == 0
    return out

# --- 2. data and tokenizer ------------------------------------------------------------------------
def test_the_data_is_tiny_shakespeare_in_the_repository_and_its_tokenizer_round_trips(text, tok):
    raw = open(DATA, 'rb').read()
    assert hashlib.sha256(raw).hexdigest() == '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
    assert len(text) == 1115394 and DATA == os.path.join(HERE, 'input.txt')
    assert tok.vocab_size == 66 and tok.mask_id == MASK and mdlm.MASK_GLYPH not in tok.stoi, '65 chars + [MASK] last'
    s = 'ROMEO:\nO, she doth teach the torches to burn bright!'
    assert tok.decode(tok.encode(s)) == s
    with pytest.raises(mdlm.CliError, match="'@'"):
        tok.encode('hello @ world')

def test_split_is_90_10_and_batches_are_windows_of_the_text(text, tok):
    train, val = mdlm.split_data(text, tok)
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert tok.decode(val[:20].tolist()) == text[len(train):len(train) + 20]
    x = mdlm.get_batch(train[:5000], 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and all(tok.decode(row.tolist()) in text[:5000] for row in x)

# --- 3. the forward process -----------------------------------------------------------------------
@pytest.mark.parametrize('t', [0.0, 0.1, 0.5])
def test_mask_rate_matches_t_row_by_row(t):
    """The empirical masking rate: a row at noise level t hides tL characters, and every position is
    hidden in a share t of the rows (the set is uniformly random), two rates in one batch."""
    ts = torch.tensor([t, 1 - t]).repeat(2000)
    xt, mask = mdlm.forward_mask(torch.zeros(4000, 10, dtype=torch.long), ts, MASK, torch.Generator().manual_seed(0))
    for r in (t, 1 - t):
        assert (mask[ts == r].sum(1) == round(10 * r)).all(), 'exactly tL in every row'
        rate = mask[ts == r].float().mean(0)                          # (10,) per position
        assert (rate - r).abs().max() <= 5 * math.sqrt(r * (1 - r) / 2000) + 1e-9, (rate, r)
    assert torch.equal(xt == MASK, mask), 'exactly the masked positions hold [MASK]'

def test_exact_masks_hold_t_times_length_at_uniformly_random_places():
    t = torch.tensor([1 / 8, 3 / 8, 1.0] * 4000)
    _, mask = mdlm.forward_mask(torch.zeros(12000, 8, dtype=torch.long), t, MASK,
                                torch.Generator().manual_seed(2))
    assert torch.equal(mask.sum(1), (t * 8).long()), 'exactly t T masks in every row'
    sets = torch.bincount((mask[1::3].long() << torch.arange(8)).sum(1), minlength=256)   # 3 of 8
    assert (sets > 0).sum() == math.comb(8, 3), 'every set of 3 places occurs'
    assert (sets[sets > 0] - 4000 / 56).abs().max() < 5 * math.sqrt(4000 / 56), 'each as often'

# --- 4. the model ---------------------------------------------------------------------------------
def test_shapes_and_mask_never_predicted():
    model, x = tiny_model(), torch.randint(66, (3, 32))
    logits = model(x, torch.rand(3))
    assert logits.shape == (3, 32, 66) and torch.isinf(logits[..., MASK]).all() and torch.isfinite(logits[...,
                                                                                                          :MASK]).all()
    assert model(x[:, :7], torch.rand(3)).shape == (3, 7, 66), 'shorter than block_size works'

def test_parameter_counts():
    """base, tiny and the tiny GPT twin, exactly: base lands in the 10-20M a char-level Shakespeare model wants."""
    count = lambda preset, **kw: mdlm.MDLM(mdlm.ModelConfig(**{**{k: v for k, v in mdlm.PRESETS[preset].items()
                                                                 if hasattr(mdlm.ModelConfig, k)}, **kw})).num_params()
    assert (count('base'), count('tiny'), count('tiny', use_time=False, causal=True)) == (11_874_048, 1_094_400,
                                                                                          797_184)

def test_adaln_zero_starts_independent_of_t():
    model = tiny_model()
    x = torch.randint(66, (2, 32))
    a, b = model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9]))
    assert torch.equal(a, b), 'zero-initialised adaLN: t has no effect at the start'
    plain = tiny_model(use_time=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    assert torch.allclose(plain(x, torch.zeros(2)), a, atol=1e-6), 'at the start it is the plain transformer'
    with torch.no_grad():
        for block in model.blocks:
            block.ada.weight.normal_(std=0.1)
    assert not torch.allclose(model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9])))
    assert all(b.ada is None for b in plain.blocks) and plain.time_mlp is None, 'use_time=False: no adaLN at all'
    assert torch.equal(plain(x, torch.zeros(2)), plain(x, torch.ones(2)))

def test_qk_norm_makes_attention_blind_to_the_size_of_queries_and_keys(monkeypatch):
    """Each head's q reaches the attention at RMS 2 and k at RMS 1 (RoPE keeps lengths): growing
    the weights that make them changes nothing."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    spy = lambda q, k, v, **kw: seen.append((q, k)) or sdpa(q, k, v, **kw)
    monkeypatch.setattr(mdlm.F, 'scaled_dot_product_attention', spy)
    model, x, t = tiny_model(), torch.randint(65, (2, 32)), torch.rand(2)
    ref = model(x, t)
    rms = lambda a: a.pow(2).mean(-1).sqrt()
    assert len(seen) == model.config.n_layer
    assert all(torch.allclose(rms(q), torch.tensor(2.0), atol=1e-3) and torch.allclose(rms(k), torch.tensor(1.0),
                                                                                       atol=1e-3)
               for q, k in seen)
    C = model.config.n_embd
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:2 * C] *= 10                   # the query and key rows
        assert torch.allclose(model(x, t), ref, atol=1e-4)
        model.blocks[0].attn.qkv.weight[2 * C:] *= 10             # the value rows do matter
        assert not torch.allclose(model(x, t), ref, atol=1e-2)

def attention(query, key, value, causal):
    """softmax(query key^T / sqrt(hs)) value, written out; causal: no looking right."""
    L = query.size(-2)
    scores = (query @ key.transpose(-2, -1)) / math.sqrt(query.size(-1))   # (B, n_head, L, L)
    if causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float('-inf'))
    return scores.softmax(dim=-1) @ value

def test_the_formula_is_the_fused_kernel_and_a_cpu_in_bf16_uses_the_math_kernel(monkeypatch):
    """The fused call computes the lesson's formula (and the GPT's causal one); bf16 on a CPU picks the math kernel."""
    q, k, v = torch.randn(3, 2, 3, 10, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    for causal in (False, True):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.allclose(attention(q, k, v, causal), ref, atol=1e-5)
    monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: True)
    model, x, t = tiny_model(), torch.randint(65, (2, 32)), torch.rand(2)
    ref = model(x, t)
    assert torch.backends.cuda.flash_sdp_enabled(), 'outside autocast: the fused kernel may run'
    with mdlm.autocast_for('cpu')():
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        fast = model(x, t)
    assert torch.backends.cuda.flash_sdp_enabled(), 'the kernel choice ends with the context'
    assert (fast.softmax(-1) - ref.softmax(-1)).abs().max() < 0.02

def test_gpt_is_causal_and_diffusion_is_not():
    gpt, diffusion = tiny_gpt(), tiny_model()
    x = torch.randint(65, (2, 32), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 65                       # change one later character
    with torch.no_grad():
        a, b = gpt(x, None), gpt(y, None)
        assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6), 'a GPT never looks right'
        assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-4)
        t = torch.full((2,), 0.5)
        assert not torch.allclose(diffusion(x, t)[:, :20], diffusion(y, t)[:, :20], atol=1e-4), 'both ways'

def test_attention_dropout_is_on_in_training_only():
    attn, x = tiny_model(dropout=0.5).blocks[0].attn, torch.randn(2, 32, 32)    # the attention alone
    rope = (tiny_model().rope_cos, tiny_model().rope_sin)
    assert torch.equal(attn(x, rope), attn(x, rope)), 'eval mode: deterministic'
    attn.train()
    assert not torch.equal(attn(x, rope), attn(x, rope)), 'training: the attention weights are dropped out'

# --- 5. the loss ----------------------------------------------------------------------------------
def test_stratified_uniform_k_hits_every_count_once():
    L = 16
    for seed in range(20):
        t = mdlm.draw_t(L, L, torch.Generator().manual_seed(seed), 'cpu')
        assert sorted((t * L).round().long().tolist()) == list(range(1, L + 1)), 'L strata: each k once'
    _, w = mdlm.PROPOSALS['uniform'](L, L, torch.Generator().manual_seed(0), 'cpu')
    assert (w == 1).all(), 'the recipe with uniform k: every weight is 1'
    many = torch.cat([mdlm.draw_t(5, L, torch.Generator().manual_seed(s), 'cpu') for s in range(2000)])
    counts = torch.bincount((many * L).round().long(), minlength=L + 1)[1:].double()
    assert (counts - len(many) / L).abs().max() < 5 * math.sqrt(len(many) / L), 'still uniform on 1..L'

def test_initial_loss_is_log_65_because_mask_is_never_predicted(text, tok):
    """Zeroed embeddings (tied to the head) make every logit 0 but [MASK]'s, -inf (SUBS): each masked
    character costs log 65, and so do the NELBO, the pooled loss and the GPT's NLL. Were [MASK] a
    possible answer (its logit 0, set here by hand), the same model would score log 66."""
    data = torch.tensor(tok.encode(text[:10000]))
    model, gpt = tiny_model(), tiny_gpt()
    with torch.no_grad():
        model.tok_emb.weight.zero_(), gpt.tok_emb.weight.zero_()
        x0, xt, mask, t = mdlm.training_batch(data, 16, 32, MASK, torch.Generator().manual_seed(0))
        logits = model(xt, t)
        assert mdlm.nelbo_loss(logits, x0, mask, t).item() == pytest.approx(math.log(65), abs=1e-5)
        assert mdlm.naive_loss(logits, x0, mask).item() == pytest.approx(math.log(65), abs=1e-5)
        assert mdlm.estimate_loss(gpt, data, 2, 16, per_seq=mdlm.nll_per_seq)[0] == pytest.approx(math.log(65),
                                                                                                  abs=1e-5)
        logits[..., MASK] = 0.0
        assert mdlm.nelbo_loss(logits, x0, mask, t).item() == pytest.approx(math.log(66), abs=1e-5)

def test_nelbo_weights_by_one_over_t_and_length():
    logits = torch.zeros(2, 4, 66)   # uniform: CE = log 66 at every position
    x0 = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.25, 0.5])
    expected = (1 / (0.25 * 4) * 1 + 1 / (0.5 * 4) * 3) / 2 * math.log(66)
    assert abs(mdlm.nelbo_loss(logits, x0, mask, t).item() - expected) < 1e-5

class MaskRateModel(torch.nn.Module):
    """A fake denoiser whose loss runs from ~0 at small t to log 65 at t = 1: the right token gets logit 6 (1 - t)."""
    def __init__(self):
        super().__init__()
        self.config = mdlm.ModelConfig(vocab_size=66, block_size=16)
    def forward(self, xt, t):
        m = (xt == MASK).float().mean(1)                                        # (B,)
        logits = torch.zeros(*xt.shape, 66)
        logits[..., 0] = 6 * (1 - m)[:, None]
        logits[..., MASK] = float('-inf')
        return logits

def proposal_losses(proposal, n_draws=300, B=64, L=16, weighted=True):
    model, data = MaskRateModel(), torch.zeros(1000, dtype=torch.long)
    out = []
    for seed in range(n_draws):
        x0, xt, mask, t, w = mdlm.weighted_batch(data, B, L, MASK, torch.Generator().manual_seed(seed),
                                                 mdlm.PROPOSALS[proposal])
        out.append(mdlm.weighted_loss(model, x0, xt, mask, t, w if weighted else torch.ones_like(w)).item())
    return torch.tensor(out)

def test_cosine_proposal_keeps_the_nelbo_unbiased():
    ref, new = proposal_losses('uniform'), proposal_losses('cosine')
    tol = 4 * math.sqrt(ref.var() / len(ref) + new.var() / len(new))      # from the measured spread
    assert abs(new.mean() - ref.mean()) < tol, (new.mean(), ref.mean(), tol)
    assert abs(proposal_losses('cosine', weighted=False).mean() - ref.mean()) > 5 * tol, \
        'the test has power: without the 1/q weight the mean moves far off'

def test_cosine_proposal_draws_more_small_k_and_weighs_each_k_by_one_over_l_q():
    L, n = 16, 200000
    t, w = mdlm.draw_t_cosine(n, L, torch.Generator().manual_seed(0), 'cpu')
    k = (t * L).round().long()
    assert torch.allclose(t * L, k.float()) and k.min() == 1 and k.max() == L, 'whole counts, 1..L'
    q = torch.bincount(k, minlength=L + 1)[1:].double() / n                  # the proposal, measured
    assert q[0].item() == pytest.approx(2 / math.pi * math.acos(1 - 1 / L), rel=1e-3), 'k = 1: 0.226, not 1/16'
    for j in range(1, L + 1):                                                 # each k has one weight,
        assert w[k == j].unique().numel() == 1                                # 1 / (L q(k)), so the weights
        assert w[k == j][0].item() == pytest.approx(1 / (L * q[j - 1].item()), rel=0.005)  # undo q
    assert w.mean().item() == pytest.approx(1.0, abs=0.01), 'importance weights average to 1'

# --- 6. one training step -------------------------------------------------------------------------
def test_get_lr_warmup_stable_decay():
    lr = lambda it, frac=0.5: mdlm.get_lr(it, 1e-3, 1e-4, 10, 100, frac)
    assert lr(0) == pytest.approx(1e-4)
    assert all(lr(i) == pytest.approx(1e-3) for i in range(9, 51)), 'stable until 50%'
    assert lr(75) == pytest.approx(5.5e-4), 'linear decay over the second half'
    assert lr(100) == pytest.approx(1e-4) and lr(150) == pytest.approx(1e-4)
    assert lr(80, 0.2) == pytest.approx(1e-3) and lr(90, 0.2) == pytest.approx(5.5e-4), 'the GPT twin: the last 20%'
    short = [mdlm.get_lr(it, 3e-3, 1e-4, 100, 30, 0.5) for it in range(30)]
    assert short[0] == pytest.approx(1e-3) and max(short) == pytest.approx(3e-3), 'a short run warms up in a tenth'
    assert mdlm.get_lr(0, 3e-3, 1e-4, 100, 5, 0.5) == pytest.approx(3e-3), 'five steps: no warmup at all'
    assert [mdlm.get_lr(it, 3e-3, 1e-4, 100, 5000, 0.5) for it in (0, 99, 100)] == pytest.approx([3e-5, 3e-3, 3e-3])

def test_train_step_sets_lr_clears_and_overfits_one_batch(text, tok):
    """Muon and AdamW at the step's lr, gradients cleared after each update, the loss detached: on one
    fixed batch and noise draw the loss falls far."""
    data = torch.tensor(tok.encode(text[:10000]))
    batch = mdlm.weighted_batch(data, 8, 32, MASK, torch.Generator().manual_seed(0))
    model = tiny_model().train()
    first = mdlm.weighted_loss(tiny_model().train(), *batch).item()
    optimizers = mdlm.make_optimizers(model, 1.0, 0.0)
    losses = [mdlm.train_step(model, optimizers, batch, 1e-2, mdlm.weighted_loss) for _ in range(60)]
    assert all(g['lr'] == 1e-2 for opt in optimizers for g in opt.param_groups), 'the step sets its learning rate'
    assert all(p.grad is None for p in model.parameters()) and not losses[0].requires_grad
    assert losses[0].item() == pytest.approx(first) and losses[-1] < 0.6 * first, [round(x.item(), 2) for x in losses]

def test_optimizer_split_muon_on_block_matrices_adamw_on_the_rest():
    model = tiny_model(use_time=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw = mdlm.make_optimizers(model, 1e-3, 0.1, 'muon')
    assert isinstance(muon, mdlm.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sorted({names[id(p)].split('.', 2)[2] for p in muon.param_groups[0]['params']}) == \
        ['attn.proj.weight', 'attn.qkv.weight', 'mlp.0.weight', 'mlp.2.weight']
    decay, no_decay = adamw.param_groups
    assert sorted(names[id(p)] for p in decay['params']) == \
        ['blocks.0.ada.weight', 'blocks.1.ada.weight', 'time_mlp.0.weight', 'time_mlp.2.weight', 'tok_emb.weight'], \
        'the embedding (= the tied head) and the time input stay on AdamW'
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 1 for p in no_decay['params'])
    assert sum(len(g['params']) for o in (muon, adamw) for g in o.param_groups) == len(list(model.parameters()))
    only, = mdlm.make_optimizers(model, 1e-3, 0.1, 'adamw')
    assert sum(len(g['params']) for g in only.param_groups) == len(list(model.parameters()))

def test_orthogonalize_pushes_singular_values_into_a_band():
    G = torch.randn(48, 16, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-1, 1, 16))
    S = torch.linalg.svdvals(mdlm.orthogonalize(G))
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 50, 'the input is far from orthogonal'
    assert 0.6 < S.min() and S.max() < 1.25, S
    assert (S - 1).abs().max() > 0.01, 'approximate, not exact: the iteration trades exactness for steps'
    assert mdlm.orthogonalize(G.T).shape == (16, 48)
    stack = mdlm.orthogonalize(torch.stack([G, 3 * G.flip(0)]))   # a stack: each matrix on its own
    torch.testing.assert_close(stack, torch.stack([mdlm.orthogonalize(G), mdlm.orthogonalize(G.flip(0))]))

@pytest.mark.parametrize('ns_dtype,tolerance', [(torch.float32, 0.02), (torch.bfloat16, 0.05)])
def test_muon_steps_match_torch_optim_muon(ns_dtype, tolerance):
    """Two steps on a 24 x 40 matrix against PyTorch's Muon (new in 2.9; Nesterov, match_rms_adamw),
    which runs Newton-Schulz in bfloat16: the same update within bf16's precision."""
    w0 = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(24, 40, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    ws = []
    for make in (lambda p: mdlm.Muon([p], lr=0.05, weight_decay=0.1, ns_dtype=ns_dtype),
                 lambda p: torch.optim.Muon([p], lr=0.05, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')):
        p = torch.nn.Parameter(w0.clone())
        opt = make(p)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        ws.append(p.detach())
    step = (ws[1] - w0).norm()
    assert (ws[0] - ws[1]).norm() < tolerance * step, ((ws[0] - ws[1]).norm(), step)

def test_loss_naive_is_the_pooled_masked_ce(text, tok):
    data = torch.tensor(tok.encode(text[:10000]))
    batch = mdlm.training_batch(data, 8, 32, MASK, torch.Generator().manual_seed(0))
    model = tiny_model()
    x0, xt, mask, t = batch
    pooled = (mdlm.masked_ce(model(xt, t), x0, mask).sum() / mask.sum()).item()
    assert mdlm.naive_loss(model(xt, t), x0, mask).item() == pytest.approx(pooled, abs=1e-5)
    assert mdlm.batch_loss(model, *batch).item() != pytest.approx(pooled, abs=1e-3), 'the NELBO weighs by 1/t'

# --- 7. sampling ----------------------------------------------------------------------------------
def textbook_ancestral(model, x, steps, seed):
    """The plain MDLM sampler, written out as the lesson states it."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    with torch.no_grad():
        for i in range(steps):
            logits = model(x, (x == MASK).float().mean(1))
            tokens, _ = mdlm.propose(logits, 1.0, 1.0, g)
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            u = torch.rand(x.shape, generator=g)
            x = torch.where((x == MASK) & (u < (t - s) / t), tokens, x)
            if not (x == MASK).any():
                break
    return x

def test_generate_with_the_ancestral_rule_is_the_textbook_loop():
    model = tiny_model(use_time=True)
    x = torch.full((3, 32), MASK)
    x[:, :4] = torch.tensor([1, 2, 3, 4])            # a prompt: given tokens
    out = mdlm.generate(model, x, sampler(rule='ancestral', steps=16, semi_ar=0), torch.Generator().manual_seed(7))
    assert torch.equal(out, textbook_ancestral(model, x, 16, 7))

@pytest.mark.parametrize('rule', ['ancestral', 'confidence', 'random'])
@pytest.mark.parametrize('semi_ar', [0, 5])
def test_generate_fills_every_mask_and_never_changes_a_committed_token(rule, semi_ar):
    model = tiny_model()
    x = torch.full((3, 32), MASK)
    x[:, :4] = torch.arange(4)
    x[:, 20:23] = 7                                  # given characters on both sides of the masks
    history = []
    s = sampler(rule=rule, steps=10, semi_ar=semi_ar, top_p=0.9)
    out = mdlm.generate(model, x, s, torch.Generator().manual_seed(0), on_step=lambda xs: history.append(xs.clone()))
    assert not (out == MASK).any() and torch.equal(history[-1], out)
    for before, after in zip([x] + history, history):
        kept = before != MASK
        assert torch.equal(after[kept], before[kept]), 'a committed or given token changed'
    assert torch.equal(out, mdlm.generate(model, x, s, torch.Generator().manual_seed(0))), 'a seed reproduces'
    assert not torch.equal(out, mdlm.generate(model, x, s, torch.Generator().manual_seed(1)))

def test_confidence_uses_exactly_steps_passes_and_spreads_the_commits():
    model = tiny_model()
    calls = count_calls(model)
    x, prev, counts = torch.full((2, 32), MASK), [], []
    def on_step(xs):
        counts.append(((prev[-1] if prev else x) == MASK).sum(1)[0].item() - (xs == MASK).sum(1)[0].item())
        prev.append(xs.clone())
    mdlm.generate(model, x, sampler(steps=7, semi_ar=0), torch.Generator().manual_seed(0), on_step)
    assert calls == [2] * 7, 'every step runs both rows once'
    assert counts == [5, 5, 5, 5, 4, 4, 4] and sum(counts) == 32

def test_confidence_commits_the_most_confident_proposal():
    class Stub(torch.nn.Module):                       # fixed logits: confidences clearly apart
        config = mdlm.ModelConfig(vocab_size=66, block_size=32)
        logits = torch.cat([3 * torch.randn(1, 32, 65, generator=torch.Generator().manual_seed(0)),
                            torch.full((1, 32, 1), float('-inf'))], -1)
        def forward(self, xt, t):
            return self.logits.repeat(xt.size(0), 1, 1)
    x = torch.randint(65, (1, 32), generator=torch.Generator().manual_seed(0))
    x[0, ::2] = MASK                                   # 16 masks, among known characters
    first = []
    mdlm.generate(Stub(), x, sampler(steps=16, semi_ar=0, temperature=0), torch.Generator().manual_seed(0),
                  lambda xs: first.append(xs.clone()))
    probs = Stub.logits.double().softmax(-1).max(-1).values[0]
    probs[x[0] != MASK] = -1
    assert ((first[0][0] != MASK) & (x[0] == MASK)).nonzero().item() == probs.argmax().item()
    assert first[0][0, probs.argmax()] == Stub.logits[0, probs.argmax()].argmax(), 'the ranked token is committed'

def test_ancestral_unmask_fraction_matches_t_minus_s_over_t():
    model = tiny_model()
    steps = 4
    frames = [torch.full((64, 32), MASK)]
    mdlm.generate(model, frames[0], sampler(rule='ancestral', steps=steps, semi_ar=0),
                  torch.Generator().manual_seed(0), lambda xs: frames.append(xs.clone()))
    for i in range(steps - 1):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        was = frames[i] == MASK
        frac = ((frames[i + 1] != MASK) & was).sum().item() / was.sum().item()
        p = (t - s) / t
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / was.sum().item()), (i, frac, p)

def test_semi_ar_goes_left_to_right_block_by_block():
    model = tiny_model()
    x = torch.full((2, 32), MASK)
    x[:, :4] = 1
    for rule in ('ancestral', 'confidence'):
        whole = mdlm.generate(model, x, sampler(rule=rule, steps=8, semi_ar=0), torch.Generator().manual_seed(0))
        one_block = mdlm.generate(model, x, sampler(rule=rule, steps=8, semi_ar=28), torch.Generator().manual_seed(0))
        assert torch.equal(whole, one_block), 'a block as wide as all the masks is no block'
    frames = []
    mdlm.generate(model, x, sampler(steps=4, semi_ar=7), torch.Generator().manual_seed(0), lambda xs: frames.append(xs))
    assert len(frames) == 16, '4 blocks of 7, 4 steps each'
    for n, f in enumerate(frames[3::4]):
        assert not (f[:, :4 + 7 * (n + 1)] == MASK).any() and (f[:, 4 + 7 * (n + 1):] == MASK).all()

def test_temperature_zero_is_the_argmax_and_its_confidence():
    logits = torch.randn(4, 9, 66, generator=torch.Generator().manual_seed(0))
    tokens, conf = mdlm.propose(logits, temperature=0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, logits.argmax(-1)) and torch.allclose(conf, logits.softmax(-1).amax(-1))
    for tiny in (1e-310, 1e-45, 1e-38):     # the division overflows: temperature 0, the same tokens and confidences
        same = mdlm.propose(logits * 30, tiny, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(same, mdlm.propose(logits * 30, 0))), tiny

def test_proposals_follow_the_model_distribution():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).expand(1, 20000, 3)
    tokens, conf = mdlm.propose(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens[0], minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.015)
    assert torch.allclose(conf[0], torch.tensor([0.7, 0.2, 0.1])[tokens[0]])

def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(1, 20000, 4)
    tokens, conf = mdlm.propose(logits, 1.0, 0.75, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens[0], minlength=4).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.015)
    assert torch.allclose(conf[0, tokens[0] == 0], torch.tensor(0.625)), 'renormalised'
    tiny, conf = mdlm.propose(logits, 1.0, 1e-6, torch.Generator().manual_seed(1))
    assert (tiny == 0).all() and torch.allclose(conf, torch.ones_like(conf)), 'the top token always stays'

# --- 8. completion and infilling ------------------------------------------------------------------
def test_generate_text_sees_the_whole_prompt_and_writes_past_the_context():
    model = tiny_model()
    seen = count_calls(model, inputs=True)
    prefix = list(range(30))                                  # 30 of the 32 positions
    g = torch.Generator().manual_seed(0)
    out = mdlm.generate_text(model, prefix, 100, 2, lambda x: mdlm.generate(model, x, sampler(steps=4), g))
    assert seen[0][0, :30].tolist() == prefix, 'the first window holds the whole prompt'
    assert out.shape == (2, 130) and not (out == MASK).any() and out[:, :30].tolist() == [prefix, prefix]

def test_long_text_infill_keeps_everything_outside_the_blanks(tok):
    """A text three contexts long, blanks near both ends and in the middle: each is filled from a
    window around it; every character outside the blanks comes back verbatim."""
    model = tiny_model()
    calls = count_calls(model)
    text = ('First Citizen:\nBefore we proceed any further, hear me [_____].\n\nAll:\nSpeak, speak.\n'
            'First Citizen:\nYou are all resolved rather to die than to [____]?\n') + 'x' * 40 + ' [___]'
    ids = mdlm.parse_infill(text, tok)
    assert len(ids) > 3 * 32
    s = sampler(rule='ancestral', steps=16, semi_ar=0)
    g = torch.Generator().manual_seed(0)
    out = mdlm.infill(model, ids, 2, lambda x: mdlm.generate(model, x, s, g))
    given = torch.tensor(ids) != MASK
    assert not (out == MASK).any() and (out[:, given] == torch.tensor(ids)[given]).all()
    assert set(calls) == {2}, 'context-sized windows of both rows'
    short = mdlm.parse_infill('To [___] or not', tok)
    g = torch.Generator().manual_seed(0)
    a = mdlm.infill(model, short, 1, lambda x: mdlm.generate(model, x, s, g))
    b = mdlm.generate(model, torch.tensor([short]), s, torch.Generator().manual_seed(0))
    assert torch.equal(a, b), 'a text that fits is one generate call'

@pytest.mark.parametrize('where', ['middle', 'start', 'end'])
def test_every_window_of_a_blank_wider_than_the_context_sees_half_a_window_of_text(where):
    """A blank of 2L between texts of L (or at either end of the text): every window that infill hands to
    sample holds at least L/2 visible characters, and the fill keeps the text."""
    model, L = tiny_model(), 32
    left, right = list(range(L)) * (where != 'start'), list(range(10, 10 + L)) * (where != 'end')
    ids = left + [MASK] * 2 * L + right
    windows = []
    def sample(x):
        windows.append(x.clone())
        return mdlm.denoise(model, x, 4, torch.Generator().manual_seed(0))
    out = mdlm.infill(model, ids, 2, sample)
    visible = [(w[0] != MASK).sum().item() for w in windows]
    assert min(visible) >= L // 2 and all(w.size(1) <= L for w in windows), visible
    assert not (out == MASK).any() and out[0, :len(left)].tolist() == left
    assert out[0, len(ids) - len(right):].tolist() == right

def test_a_text_that_fits_one_window_is_one_call_of_sample(tok):
    model, ids = tiny_model(), tok.encode('ROMEO:') + [MASK] * 10 + tok.encode('!')
    calls = []
    out = mdlm.fill_window(model, ids, 3, lambda x: calls.append(x.clone()) or x.masked_fill(x == MASK, 0))
    assert len(calls) == 1 and calls[0].tolist() == [ids] * 3 and out.shape == (3, 17) and not (out == MASK).any()
    with pytest.raises(AssertionError, match='one window'):
        mdlm.fill_window(model, [0] * 33, 1, lambda x: x)

def test_a_blank_is_as_wide_as_its_marker_and_its_window_holds_it(tok):
    assert mdlm.blank_window(50, 55, 200, 32) == 36
    assert mdlm.blank_window(2, 5, 200, 32) == 0 and mdlm.blank_window(190, 195, 200, 32) == 168
    ids = mdlm.parse_infill('To [___] or not to [_]!', tok)
    assert len(ids) == len('To [___] or not to [_]!')
    assert tok.decode(ids) == 'To ' + mdlm.MASK_GLYPH * 5 + ' or not to ' + mdlm.MASK_GLYPH * 3 + '!'
    with pytest.raises(mdlm.CliError, match='no blank'):
        mdlm.parse_infill('no blanks here', tok)

# --- 9. evaluation --------------------------------------------------------------------------------
class UnigramModel(torch.nn.Module):
    """Predicts the unigram distribution everywhere, whatever it is shown."""
    def __init__(self, data, V):
        super().__init__()
        self.config = mdlm.ModelConfig(vocab_size=V, block_size=32)
        counts = torch.bincount(data, minlength=V - 1).double()
        self.p = counts / counts.sum()
        self.logits = torch.cat([torch.log(self.p).float(), torch.tensor([float('-inf')])])
    def forward(self, xt, t):
        return self.logits.expand(*xt.shape, -1)

def test_unigram_model_nelbo_is_the_unigram_entropy(text, tok):
    data = torch.tensor(tok.encode(text[:200000]))
    model = UnigramModel(data, 66)
    entropy = -(model.p * torch.log(model.p.clamp(min=1e-30))).sum().item()
    mean, se = mdlm.estimate_loss(model, data, 40, 64)
    assert abs(mean - entropy) < 4 * se + 0.01, (mean, entropy, se)

def test_exact_k_estimator_matches_the_continuous_nelbo():
    """A t-free model on L = 6: the NELBO integral over a fine t grid, averaging over every one of
    the 2^6 masks, against the mean of the exact-k estimator over many seeds."""
    L = 6
    model = tiny_model(use_time=False, block_size=L, seed=5)
    x0 = torch.tensor([[3, 17, 40, 3, 9, 60]])
    masks = torch.tensor(list(itertools.product([0, 1], repeat=L)), dtype=torch.bool)[1:]   # (63, L)
    with torch.no_grad():
        logits = model(x0.masked_fill(masks, MASK), torch.zeros(len(masks)))
        S = mdlm.masked_ce(logits, x0.expand(len(masks), -1), masks).sum(1).double()        # (63,)
    k = masks.sum(1).double()
    ts = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000                            # midpoints
    P = ts[:, None] ** k * (1 - ts[:, None]) ** (L - k)                                      # P(mask | t)
    integral = ((P * S).sum(1) / (ts * L)).mean().item()
    g = torch.Generator().manual_seed(0)
    est = torch.cat([mdlm.nelbo_per_seq(model, x0.expand(64, -1), g) for _ in range(300)])
    se = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item() - integral) < 4 * se, (est.mean().item(), integral, se)

def test_standard_error_matches_the_spread_of_repeated_estimates(text, tok):
    """The error bar comes from independent batches: over 24 seeds the estimates scatter about as
    much as each one's reported standard error says (a per-row error was about 2x too large)."""
    data = torch.tensor(tok.encode(text[:200000]))
    model = tiny_model()
    runs = [mdlm.estimate_loss(model, data, 8, 16, seed=s) for s in range(24)]
    spread = torch.tensor([m for m, _ in runs]).std().item()
    reported = sum(se for _, se in runs) / len(runs)
    assert 0.6 < reported / spread < 1.6, (reported, spread)
    assert mdlm.estimate_loss(model, data, 2, 16) == mdlm.estimate_loss(model, data, 2, 16), 'seeded: the same digits'

def test_gpt_nll_is_the_sum_of_next_character_log_probabilities():
    """By hand: p(x) = p(x_0 | start) p(x_1 | start x_0) ..., each from its own forward pass."""
    gpt = tiny_gpt(seed=3)
    x0 = torch.tensor([[5, 17, 40, 3, 9, 60, 2]])
    total = 0.0
    with torch.no_grad():
        for i in range(x0.size(1)):
            context = torch.cat([torch.tensor([[MASK]]), x0[:, :i]], 1)     # start + the characters before i
            total -= gpt(context, None)[0, -1].log_softmax(-1)[x0[0, i]].item()
    assert mdlm.nll_per_seq(gpt, x0).item() == pytest.approx(total / x0.size(1), abs=1e-5)

# --- the file: a lesson, then the harness; a notebook too -----------------------------------------
def parts():
    """mdlm.py's three parts: the core (sections 1-9), the upgrades (10-16), the harness."""
    src = open(os.path.join(HERE, 'mdlm.py'), encoding='utf-8').read()
    core_marks = re.findall(r'(?m)^# %% =+ THE CORE IS COMPLETE .*=+$', src)
    assert len(core_marks) == 1, 'one marked line ends the core'
    core, rest = src.split(core_marks[0])
    assert rest.count('THE LESSON IS COMPLETE') == 1, 'one marked line ends the lesson'
    upgrades, harness = rest.split('THE LESSON IS COMPLETE')
    return core, upgrades, harness.split('\n', 1)[1]

def defined(src):
    names = set()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split('.')[0] for a in node.names}
    return names

def used(src):
    return {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}

def test_the_core_stands_alone_and_the_lesson_never_calls_into_the_harness():
    core, upgrades, harness = parts()
    below_core = defined(upgrades) | defined(harness)
    assert not used(core) & below_core, f'the core uses names from below it: {sorted(used(core) & below_core)}'
    harness_names = used(upgrades) & defined(harness)
    assert not harness_names, f'the lesson uses harness names: {sorted(harness_names)}'
    assert re.findall(r'(?m)^# %% (\d+)\. ', core) == [str(i) for i in range(1, 10)], 'sections 1..9 in order'
    assert re.findall(r'(?m)^# %% (\d+)\. ', upgrades) == [str(i) for i in range(10, 18)], 'then 10..17'
    for name in ('forward_mask', 'MDLM', 'nelbo_loss', 'train_step', 'denoise', 'fill_window', 'estimate_loss'):
        assert name in defined(core), f'{name} is part of the core'
    for name in ('draw_t_cosine', 'Muon', 'RECIPE', 'propose', 'exact_nll', 'generate', 'SamplerConfig', 'gpt_generate',
                 'generate_text', 'infill'):
        assert name in defined(upgrades), f'{name} is an upgrade'
    for name in ('train', 'save_checkpoint', 'ddp_setup', 'build_parser', 'main'):
        assert name in defined(harness), f'{name} is harness'

def sharp_model(use_time=True):
    """A 3-character model (+ [MASK]) with large random weights: predictions that depend strongly on x and t."""
    torch.manual_seed(0)
    model = mdlm.MDLM(mdlm.ModelConfig(vocab_size=4, block_size=4, n_layer=2, n_head=2, n_embd=16,
                                       dropout=0.0, use_time=use_time)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    return model

ALL_STRINGS = torch.tensor(list(itertools.product(range(3), repeat=4)))   # every string of length 4: (81, 4)

@pytest.mark.parametrize('use_time', [True, False])
def test_exact_likelihoods_sum_to_one_over_all_strings(use_time):
    """Orders chosen from the visible input: p(x) sums to 1 over all 81 strings; an order that peeks does not."""
    model = sharp_model(use_time)
    total = lambda order: torch.exp(-4 * mdlm.exact_nll(model, ALL_STRINGS, order).double()).sum().item()
    peek = lambda logp, masked: logp.gather(-1, ALL_STRINGS[..., None])[..., 0].masked_fill(~masked,
                                                                                            -math.inf).argmax(1)
    assert total(None) == pytest.approx(1, abs=1e-4)
    assert total(mdlm.surest) == pytest.approx(1, abs=1e-4)
    assert abs(total(peek) - 1) > 0.01, 'peeking is no generator: its "probabilities" do not sum to 1'
    p = torch.exp(-4 * mdlm.exact_nll(model, ALL_STRINGS, mdlm.surest))
    assert p.max() / p.min() > 100, 'the model is sharp: the strings differ in probability'

def test_exact_left_to_right_is_the_chain_rule_by_hand():
    """-log p(x) = -sum_i log p(x_i | x_<i, masks after), t = the fraction masked, written out."""
    model, x = sharp_model(), [2, 0, 1, 1]
    nll = 0.0
    for i in range(4):
        xt = torch.tensor([x[:i] + [3] * (4 - i)])
        p = model(xt, torch.tensor([(4 - i) / 4])).double().softmax(-1)[0, i, x[i]]
        nll -= math.log(p.item())
    assert mdlm.exact_nll(model, torch.tensor([x])).item() == pytest.approx(nll / 4, rel=1e-5)
    logp = torch.tensor([[[-3.0, -0.1], [-0.01, -5.0], [-0.5, -1.0]]])
    assert mdlm.surest(logp, torch.tensor([[True, False, True]])) == 0, 'masked only'

def fixed_order(perm):
    """An order for exact_nll that reveals the positions in the order of perm, whatever it sees."""
    perm = torch.tensor(perm)
    return lambda logp, masked: perm[masked[:, perm].float().argmax(1)]

def test_nelbo_is_the_mean_over_orders():
    """Section 5 by brute force: the mean over all L! fixed reveal orders of the exact NLL equals the
    NELBO computed with the training loss over every k-subset (t = k / L), averaged over k; and
    -log of the mean of the orders' probabilities is at most the NELBO (Jensen)."""
    model, L = sharp_model(), 4
    x0 = torch.tensor([[2, 0, 1, 1], [0, 0, 2, 1], [1, 2, 2, 0]])
    orders = [mdlm.exact_nll(model, x0, fixed_order(p)).double() for p in itertools.permutations(range(L))]
    mean_over_orders = torch.stack(orders).mean(0)                                  # (3,) per character
    per_k = []
    for k in range(1, L + 1):
        subsets = [list(c) for c in itertools.combinations(range(L), k)]
        for row in x0:
            mask = torch.zeros(len(subsets), L, dtype=torch.bool)
            for r, c in enumerate(subsets):
                mask[r, c] = True
            x = row.expand(len(subsets), L)
            t = torch.full((len(subsets),), k / L)
            logits = model(x.masked_fill(mask, 3), t)
            per_k.append(mdlm.nelbo_loss(logits, x, mask, t).double())
    nelbo = torch.stack(per_k).view(L, len(x0)).mean(0)                              # (3,)
    assert torch.allclose(mean_over_orders, nelbo, atol=1e-5), (mean_over_orders, nelbo)
    order_probs = torch.exp(-L * torch.stack(orders))                                # (L!, 3)
    assert (-torch.log(order_probs.mean(0)) / L <= nelbo + 1e-6).all(), 'the NELBO bounds -log p / L'
    assert (nelbo - (-torch.log(order_probs.mean(0)) / L)).max() > 1e-3, 'a sharp model: a strict bound'

def sampled_frequencies(model, s, n=12000):
    """How often the sampler `s` writes each of the 81 strings of length 4 (out of n draws)."""
    out = mdlm.generate(model, torch.full((n, 4), 3), s, torch.Generator().manual_seed(0))
    index = (out * torch.tensor([27, 9, 3, 1])).sum(1)
    return torch.bincount(index, minlength=81).double() / n

def test_each_likelihood_is_that_of_the_sampler_it_names():
    """--eval --exact names a sampler after each figure: 12,000 of its draws follow that likelihood. Left to
    right is --semi-ar 1 --steps 1; surest first is --rule surest, one a step; the bound's sampler,
    --rule random one a step, writes with the mean of the fixed orders' probabilities."""
    torch.manual_seed(1)             # a model whose three samplers write clearly different strings
    model = mdlm.MDLM(mdlm.ModelConfig(vocab_size=4, block_size=4, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    p_left = torch.exp(-4 * mdlm.exact_nll(model, ALL_STRINGS).double())
    p_surest = torch.exp(-4 * mdlm.exact_nll(model, ALL_STRINGS, mdlm.surest).double())
    p_random = torch.stack([torch.exp(-4 * mdlm.exact_nll(model, ALL_STRINGS, fixed_order(p)).double())
                            for p in itertools.permutations(range(4))]).mean(0)
    tv = lambda a, b: (a - b).abs().sum().item() / 2                 # total variation distance
    left = sampled_frequencies(model, sampler(rule='random', semi_ar=1, steps=1))
    surest = sampled_frequencies(model, sampler(rule='surest', semi_ar=0, steps=4))
    random = sampled_frequencies(model, sampler(rule='random', semi_ar=0, steps=4))
    assert tv(left, p_left) < 0.05 and tv(surest, p_surest) < 0.05 and tv(random, p_random) < 0.05   # noise: 0.025
    assert min(tv(p_left, p_surest), tv(p_left, p_random), tv(p_surest, p_random)) > 0.12, 'the test has power'
    assert tv(surest, p_left) > 0.12 and tv(left, p_surest) > 0.12

def test_eval_exact_prints_the_bound_and_both_orders_on_the_same_windows(trained, capsys):
    assert mdlm.main(['--eval', '--exact', '--eval-iters', '2', '--out-dir', trained]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r'(?m)^  (nelbo \(bound\)|exact, left to right|exact, surest first) +([0-9.]+)', out))
    gaps = dict(re.findall(r'(?m)^  (exact, left to right|exact, surest first) .*minus the bound: ([-+0-9.]+)', out))
    assert len(rows) == 3 and len(gaps) == 2 and 'the first 2 of those batches (16 windows)' in out, out
    model, tok = mdlm.load_model(trained)[:2]
    val = mdlm.split_data(mdlm.load_text(DATA), tok)[1]
    exact = mdlm.estimate_loss(model, val, 2, 8, per_seq=mdlm.exact_nll)[0]
    assert rows['exact, left to right'] == f'{exact:.4f}'
    surest = lambda model, x0: mdlm.exact_nll(model, x0, mdlm.surest)
    assert rows['exact, surest first'] == f'{mdlm.estimate_loss(model, val, 2, 8, per_seq=surest)[0]:.4f}'
    noise = torch.Generator().manual_seed(mdlm.EVAL_SEED + 1)     # the bound: 16 mask draws a window, averaged
    draws = lambda model, x0: torch.stack([mdlm.nelbo_per_seq(model, x0, noise)
                                           for _ in range(mdlm.EXACT_DRAWS)]).mean(0)
    bound = mdlm.estimate_loss(model, val, 2, 8, per_seq=draws)[0]
    assert rows['nelbo (bound)'] == f'{bound:.4f}', 'the bound on the same windows'
    assert float(gaps['exact, left to right']) == pytest.approx(exact - bound, abs=2e-4), 'paired: exact minus bound'

def run_as_a_notebook(src, monkeypatch):
    """Every '# %%' cell of src in order, as a Jupyter kernel runs them (no __file__, ipykernel loaded)."""
    cells = re.split(r'(?m)^(?=# %%)', src)
    monkeypatch.setitem(sys.modules, 'ipykernel', types.ModuleType('ipykernel'))
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(sys, 'argv', ['ipykernel_launcher.py', '-f', '/tmp/kernel.json'])
    ns = {'__name__': '__main__'}
    for i, cell in enumerate(cells):
        exec(compile(cell, f'<cell {i}>', 'exec'), ns)
        if 'DEMO_ITERS' in ns:       # 3 steps of a smaller tiny model: the demos run, fast
            ns['DEMO_ITERS'] = 3
            ns['PRESETS']['tiny'] = dict(ns['PRESETS']['tiny'], n_layer=2, n_head=2, n_embd=32, block_size=32)
    return ns, len(cells)

@pytest.mark.parametrize('part', ['the core alone', 'the whole file'])
def test_the_file_runs_cell_by_cell_as_a_notebook(part, monkeypatch, capsys):
    """The core's cells alone (the lines above its marker) train, sample, fill a blank and print the
    bound; the whole file runs the same way."""
    src = open(os.path.join(HERE, 'mdlm.py'), encoding='utf-8').read()
    if part == 'the core alone':
        src = src[:src.index('THE CORE IS COMPLETE')].rsplit('\n', 1)[0]
    ns, n_cells = run_as_a_notebook(src, monkeypatch)
    assert n_cells >= (10 if part == 'the core alone' else 18), n_cells
    out = capsys.readouterr().out
    assert ns['NOTEBOOK'] is True and ns['DEFAULT_DATA'] == os.path.join(HERE, 'input.txt')
    assert '1,115,394 characters' in out and 't=1.00' in out and 'step 2 | loss' in out, out
    assert f'log 65 = {math.log(65):.3f}' in out and 'val NELBO' in out and 'To be, or not ' in out, out
    assert mdlm.MASK_GLYPH not in out.split('step 2 | loss')[1], 'every demo after training fills all its masks'
    assert ('generate' in ns) == (part == 'the whole file')

def test_importing_runs_nothing(capsys):
    assert mdlm.NOTEBOOK is False, 'imported (or run as a script), no demo runs'
    before = sorted(os.listdir(HERE))
    r = subprocess.run([sys.executable, '-B', '-c', 'import mdlm'], capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '', r
    assert sorted(os.listdir(HERE)) == before, 'importing created files'
    with pytest.raises(SystemExit) as e:
        mdlm.main(['--help'])
    assert e.value.code == 0 and '--semi-ar N' in capsys.readouterr().out

# --- harness: the training run, checkpoints, resume -----------------------------------------------
def test_checkpoint_round_trip_weights_only_and_the_log(trained):
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter'] == 40 and ckpt['format'] == mdlm.FORMAT and not ckpt['config']['causal']
    (model, tok, _), fresh = mdlm.load_model(trained), mdlm.MDLM(mdlm.ModelConfig(**ckpt['config']))
    fresh.load_state_dict(ckpt['model'])
    x, t = torch.randint(66, (2, 32)), torch.rand(2)
    assert tok.vocab_size == 66 and torch.equal(model(x, t), fresh.eval()(x, t))
    rows = open(os.path.join(trained, 'log.csv')).read().splitlines()
    assert rows[0].startswith('step,train_loss,val_loss') and [r.split(',')[0] for r in rows[1:]] == ['0', '20', '40']
    assert float(rows[-1].split(',')[2]) < float(rows[1].split(',')[2]), 'val NELBO fell while training'
    assert ckpt['args']['min_lr'] == mdlm.RECIPE['min_lr'] and ckpt['args']['t_proposal'] == 'cosine'

def test_one_recipe_on_every_cpu(monkeypatch):
    """The tiny preset's steps, lr and schedule whatever the CPU; a GPU gets base, mps tiny; flags win; the
    GPT twin has no t and decays over the last 20%; the sampler's defaults are the config cell's."""
    def resolved(bf16, device='cpu', *argv):
        monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: bf16)
        args = mdlm.build_parser().parse_args(['--train', *argv])
        args.explicit, args.causal = {k for k, v in vars(args).items() if v is not None}, bool(args.causal)
        mdlm.resolve(args, device)
        return args
    recipe = lambda a: (a.preset, a.max_iters, a.lr, a.min_lr, a.warmup_iters, a.decay_frac, a.optimizer, a.t_proposal)
    assert recipe(resolved(True)) == recipe(resolved(False)) == ('tiny', 5000, 3e-3, 1e-4, 100, 0.5, 'muon', 'cosine')
    assert mdlm.autocast_for('cpu') is contextlib.nullcontext, 'without native bf16: float32 (the only difference)'
    assert resolved(False, 'cpu', '--max-iters', '7').max_iters == 7, 'flags win'
    assert resolved(False, 'mps').preset == 'tiny' and resolved(False, 'cuda').preset == 'base'
    assert (gpt := resolved(False, 'cuda', '--gpt')).use_time is False and gpt.decay_frac == mdlm.GPT_DECAY_FRAC == 0.2
    args = mdlm.build_parser().parse_args(['--sample'])
    assert mdlm.sampler_from_args(args) == mdlm.SamplerConfig() and args.seed == mdlm.SEED, 'the config cell\'s'
    assert mdlm.sampler_from_args(args, infill=True).temperature == mdlm.INFILL_TEMPERATURE == 0.0, 'one fill'
    args.num_samples = 2
    assert mdlm.sampler_from_args(args, infill=True).temperature == 1.0, 'several fills are draws'
    args = mdlm.build_parser().parse_args(['--sample', '--rule', 'ancestral', '--semi-ar', '0', '--temperature', '0.5'])
    assert mdlm.sampler_from_args(args) == mdlm.SamplerConfig(rule='ancestral', semi_ar=0, temperature=0.5)
    seen = {}
    monkeypatch.setattr(mdlm, 'train', lambda args: seen.setdefault(args.causal, args.out_dir))
    assert mdlm.main(['--train', '--gpt']) == 0 and mdlm.main(['--train']) == 0 and seen == {True: 'out-gpt',
                                                                                             False: 'out'}

def test_train_fraction_trains_and_evaluates_on_the_first_part(tmp_path, capsys):
    """--train-fraction F: training draws windows from the first F of the training split only, the
    checkpoint remembers F, and --eval's train figure scores that same part; val stays whole."""
    out = str(tmp_path)
    assert mdlm.main(['--train', '--train-fraction', '0.01', '--max-iters', '2', '--eval-interval', '2',
                      '--out-dir', out, *TINY]) == 0
    train_data, val_data = mdlm.split_data(mdlm.load_text(DATA), mdlm.Tokenizer(sorted(set(mdlm.load_text(DATA)))))
    n = int(0.01 * len(train_data))
    assert f'{n:,} training chars' in capsys.readouterr().out
    assert mdlm.load_checkpoint(os.path.join(out, 'ckpt.pt'))['args']['train_fraction'] == 0.01
    assert mdlm.main(['--eval', '--eval-iters', '2', '--out-dir', out]) == 0
    printed = dict(re.findall(r'(?m)^(val|train)(?: \(its first 0.01\))? nelbo: ([0-9.]+)', capsys.readouterr().out))
    model, _ = mdlm.load_model(out)[:2]
    assert printed['train'] == f'{mdlm.estimate_loss(model, train_data[:n], 2, 8)[0]:.4f}'
    assert printed['val'] == f'{mdlm.estimate_loss(model, val_data, 2, 8)[0]:.4f}'
    assert printed['train'] != f'{mdlm.estimate_loss(model, train_data, 2, 8)[0]:.4f}'

def test_the_best_checkpoint_is_kept_beside_the_latest(tmp_path, monkeypatch, capsys):
    """A run whose val loss rises (scripted here) leaves its best weights in best/ckpt.pt, while
    ckpt.pt, which --resume reads, holds the last step; a resumed run with no new best keeps it."""
    vals = iter([3.0, 2.0, 2.5, 2.6])
    monkeypatch.setattr(mdlm, 'estimate_loss', lambda model, data, *a, **k:
                        (1.0, 0.0) if data.numel() > 300_000 else (next(vals), 0.01))   # train split: 1.0
    out = str(tmp_path)
    assert mdlm.main(['--train', '--max-iters', '6', '--eval-interval', '2', '--out-dir', out, *TINY]) == 0
    best, last = (mdlm.load_checkpoint(os.path.join(out, *p)) for p in (('best', 'ckpt.pt'), ('ckpt.pt',)))
    assert (best['iter'], best['best_val'], last['iter'], last['best_val']) == (2, 2.0, 6, 2.0)
    assert 'best val nelbo 2.0000' in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ['best', 'ckpt.pt', 'log.csv'], 'no temporary file left'
    vals = iter([2.2, 2.1])                                    # resumed: steps 8 and 10, no new best
    assert mdlm.main(['--train', '--resume', '--max-iters', '10', '--out-dir', out, *TINY]) == 0
    best, last = (mdlm.load_checkpoint(os.path.join(out, *p)) for p in (('best', 'ckpt.pt'), ('ckpt.pt',)))
    assert (best['iter'], last['iter'], last['best_val']) == (2, 10, 2.0), 'the best survives a resume'
    monkeypatch.undo()
    assert mdlm.main(['--eval', '--eval-iters', '1', '--out-dir', os.path.join(out, 'best')]) == 0
    assert 'loaded ' + os.path.join(out, 'best') + '/ckpt.pt: step 2' in capsys.readouterr().err

def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    """SIGINT mid-run saves and exits non-zero with a resume hint; the resumed run then ends with
    exactly the weights of a run that was never interrupted (dropout on, so RNG state matters)."""
    args = ['--train', '--max-iters', '60', '--eval-interval', '25', '--dropout', '0.1', *TINY]
    straight, cut = tmp_path / 'straight', tmp_path / 'cut'
    assert mdlm.main([*args, '--out-dir', str(straight)]) == 0
    p = subprocess.Popen([sys.executable, os.path.join(HERE, 'mdlm.py'), *args, '--out-dir', str(cut)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in p.stdout:                       # interrupt once training is under way
        if line.startswith('step 30 | loss'):
            p.send_signal(signal.SIGINT)
            break
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130 and 'Traceback' not in rest and '--resume' in rest, rest
    assert 'stopping: saving the weights' in rest, 'the first Ctrl-C is answered at once'
    assert f'--resume --out-dir {cut} --device cpu' in rest, 'the hint repeats the flags it needs'
    assert 30 <= torch.load(cut / 'ckpt.pt', weights_only=True)['iter'] < 60
    assert mdlm.main([*args, '--out-dir', str(cut), '--resume']) == 0
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (straight, cut))
    assert b['iter'] == 60 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert open(straight / 'log.csv').read().splitlines()[-1].split(',')[:3] == \
        open(cut / 'log.csv').read().splitlines()[-1].split(',')[:3]

def test_ctrl_c_cuts_an_eval_short_and_a_second_exits_at_once(tmp_path, monkeypatch, capsys):
    """Ctrl-C during an evaluation: it stops at once, the step's weights are saved, exit 130. A second
    Ctrl-C, here during that save, exits at once, and the checkpoint saved before stays loadable."""
    real_estimate, real_save, calls = mdlm.estimate_loss, mdlm.save_checkpoint, []
    def slow_eval(*a, **k):                     # the second evaluation, at step 2, is cut by Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
            pytest.fail('the evaluation went on')
        return real_estimate(*a, **k)
    monkeypatch.setattr(mdlm, 'estimate_loss', slow_eval)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        mdlm.main(['--train', '--max-iters', '4', '--eval-interval', '2', '--out-dir', str(out), *TINY])
    assert e.value.code == 130 and 'stopping: saving the weights' in capsys.readouterr().err
    assert mdlm.load_checkpoint(str(out / 'ckpt.pt'))['iter'] == 2, 'the step\'s weights'
    assert [r.split(',')[0] for r in open(out / 'log.csv').read().splitlines()[1:]] == ['0'], 'no half-done eval'
    def second(path, ckpt):                     # a second Ctrl-C while the next save writes
        os.kill(os.getpid(), signal.SIGINT)
        real_save(path, ckpt)
    monkeypatch.setattr(mdlm, 'estimate_loss', real_estimate)
    def first(path, ckpt):                      # the first Ctrl-C, while the step-4 eval saves
        os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(mdlm, 'save_checkpoint', second)
        real_save(path, ckpt)
    monkeypatch.setattr(mdlm, 'save_checkpoint', first)
    assert mdlm.main(['--train', '--resume', '--max-iters', '8', '--out-dir', str(out), *TINY]) == 130
    assert 'interrupted' in capsys.readouterr().err
    assert mdlm.load_checkpoint(str(out / 'ckpt.pt'))['iter'] in (2, 3), 'a checkpoint that loads'

def test_resume_keeps_the_saved_settings_reports_changes_and_refuses_what_does_not_fit(trained, tmp_path,
                                                                                         monkeypatch, capsys):
    out = tmp_path / 'copy'
    shutil.copytree(trained, out)
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    ckpt['args']['t_proposal'] = 'uniform'                        # as if trained with another recipe
    torch.save(ckpt, out / 'ckpt.pt')
    seen, real = {}, mdlm.weighted_batch
    monkeypatch.setattr(mdlm, 'weighted_batch', lambda *a: seen.setdefault('proposal', a[5]) and real(*a))
    assert mdlm.main(['--train', '--resume', '--out-dir', str(out), '--device', 'cpu', '--max-iters', '42',
                      '--lr', '1e-3']) == 0
    err = capsys.readouterr().out
    assert 'resuming from' in err and 'max_iters: 40 -> 42' in err and 'lr: 0.003 -> 0.001' in err, err
    assert 'batch_size' not in err, 'settings not given again keep their saved values'
    saved = torch.load(out / 'ckpt.pt', weights_only=True)
    assert saved['iter'] == 42 and saved['args']['batch_size'] == 8 and seen['proposal'] is mdlm.PROPOSALS['uniform']
    saved['args']['optimizer'] = 'adamw'                          # a state that is not AdamW's alone
    torch.save(saved, out / 'ckpt.pt')
    assert mdlm.main(['--train', '--resume', '--max-iters', '44', '--out-dir', str(out), '--device', 'cpu']) == 1
    assert 'optimizer state does not fit its optimizer, adamw' in capsys.readouterr().err
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter'] == 42, 'the checkpoint is untouched'

def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    assert mdlm.main(['--train', '--max-iters', '30', '--eval-interval', '5', '--lr', '1e30', '--out-dir',
                      str(tmp_path),
                      *TINY]) == 1 and 'not finite at step' in capsys.readouterr().err
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model'].values())

def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    """torchrun with the gloo backend on CPU: 2 ranks x batch 4 give the weights of 1 process x batch 8."""
    common = ['--train', '--max-iters', '6', '--eval-interval', '6', '--eval-iters', '1', *TINY[:8], *TINY[10:]]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(HERE,
                                     'mdlm.py'), *common, '--batch-size', '4', '--out-dir', str(tmp_path / 'ddp')],
                       capture_output=True, text=True, timeout=120, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('| preset') == 1, 'only rank 0 logs'
    assert mdlm.main([*common, '--batch-size', '8', '--out-dir', str(tmp_path / 'one')]) == 0
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True)['model'] for d in ('ddp', 'one'))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    data = torch.arange(1000) % 65
    batch = mdlm.weighted_batch(data, 64, 32, MASK, torch.Generator().manual_seed(0))
    for rank in range(2):
        t = mdlm.rank_rows(batch, rank, 2)[3]
        assert len(t) == 32 and t.min() < 0.1 and t.max() > 0.9, 'every rank sees the whole range of k'
    assert sorted(torch.cat([mdlm.rank_rows(batch, r, 2)[3] for r in range(2)]).tolist()) == sorted(batch[3].tolist())

FAILING_RANK = """
import os, sys
sys.path.insert(0, {here!r})
import mdlm
real = mdlm.save_checkpoint
def failing(path, ckpt):            # rank 0's disk fills at step 2
    if ckpt['iter'] >= 2:
        raise OSError(28, 'No space left on device', path)
    real(path, ckpt)
mdlm.save_checkpoint = failing
sys.exit(mdlm.main(sys.argv[1:]))
"""

def test_an_error_on_one_rank_stops_every_rank_within_seconds(tmp_path):
    (script := tmp_path / 'failing.py').write_text(FAILING_RANK.format(here=HERE))
    argv = ['--train', '--max-iters', '40', '--eval-interval', '2', '--eval-iters', '1', *TINY[:8], '--batch-size', '4',
            *TINY[10:], '--out-dir', str(tmp_path / 'out')]
    tic = time.time()
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script), *argv], capture_output=True, text=True, timeout=120, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0 and time.time() - tic < 60, r.stderr[-2000:]
    assert 'error: No space left on device' in r.stderr and 'rank 1 stops because another rank failed' in r.stderr

def test_a_second_train_never_destroys_the_first(tmp_path, capsys):
    """--train into a folder that holds a run is refused, and nothing there changes; --overwrite starts over."""
    out = str(tmp_path)
    argv = ['--train', '--max-iters', '2', '--eval-interval', '2', '--out-dir', out, *TINY]
    assert mdlm.main(argv) == 0
    files = lambda: {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), 'rb').read()
                     for d, _, fs in os.walk(out) for f in fs}
    before = files()
    capsys.readouterr()
    assert mdlm.main(argv) == 1
    err = capsys.readouterr().err
    assert '--resume' in err and '--overwrite' in err and len(err.strip().splitlines()) == 1, err
    assert files() == before, 'the refused run changed nothing'
    assert mdlm.main(argv[:2] + ['4'] + argv[3:] + ['--overwrite']) == 0
    assert mdlm.load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter'] == 4

def test_every_mode_reads_the_text_its_checkpoint_was_trained_on(tmp_path, capsys):
    """--eval (and --resume) read the run's own text, found by its path and checked by its hash; a
    text that is gone or changed is one line naming --data. A text inside the repo is named relative to it."""
    assert mdlm.data_ref(DATA) == 'input.txt' and mdlm.data_ref('/elsewhere/x.txt') == '/elsewhere/x.txt'
    own = tmp_path / 'own.txt'
    own.write_text('abcd efgh\n' * 400)                           # another alphabet than Shakespeare's
    out = str(tmp_path / 'run')
    assert mdlm.main(['--train', '--max-iters', '2', '--eval-interval', '2', '--out-dir', out, *TINY[:-1],
                      str(own)]) == 0
    capsys.readouterr()
    assert mdlm.main(['--eval', '--eval-iters', '2', '--out-dir', out]) == 0, capsys.readouterr().err
    assert mdlm.main(['--train', '--resume', '--max-iters', '3', '--out-dir', out, '--device', 'cpu']) == 0
    own.write_text('abcd efgh\n' * 399 + 'hgfe dcba\n')           # the same alphabet, another text
    capsys.readouterr()
    assert mdlm.main(['--eval', '--eval-iters', '2', '--out-dir', out]) == 1
    assert 'has changed since this model was trained on it' in capsys.readouterr().err
    assert mdlm.main(['--eval', '--eval-iters', '2', '--out-dir', out, '--data', str(own)]) == 0, 'unless --data says'
    own.unlink()
    capsys.readouterr()
    assert mdlm.main(['--train', '--resume', '--max-iters', '4', '--out-dir', out, '--device', 'cpu']) == 1
    assert 'is gone from' in capsys.readouterr().err

def test_bf16_autocast_on_a_gpu_only_where_it_is_native(monkeypatch):
    for capability, bf16 in (((7, 5), False), ((8, 0), True), ((9, 0), True)):   # T4; A100; H100
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None, c=capability: c)
        assert (mdlm.autocast_for('cuda') is not contextlib.nullcontext) == bf16, capability

def test_nonfinite_weights_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """Weights can turn NaN while the last loss was finite: the save checks the weights too."""
    real = mdlm.train_step
    def poisoned(model, *a, **k):
        loss = real(model, *a, **k)
        with torch.no_grad():
            model.blocks[0].mlp[0].weight[0, 0] = float('nan')     # after the loss: the loss stays finite
        return loss
    out = str(tmp_path)
    assert mdlm.main(['--train', '--max-iters', '4', '--eval-interval', '2', '--out-dir', out, *TINY]) == 0
    monkeypatch.setattr(mdlm, 'train_step', poisoned)
    assert mdlm.main(['--train', '--resume', '--max-iters', '8', '--eval-interval', '2', '--out-dir', out]) == 1
    assert 'the loss or the weights are not finite at step 5' in capsys.readouterr().err
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter'] == 4 and all(torch.isfinite(v).all() for v in ckpt['model'].values())

def test_a_sampler_that_cannot_end_is_refused():
    model, x = tiny_model(), torch.full((1, 32), MASK)
    for bad in (sampler(steps=0), sampler(steps=-1), sampler(semi_ar=-1)):
        with pytest.raises(ValueError, match='steps >= 1 and semi_ar >= 0'):
            mdlm.generate(model, x, bad)

def test_the_time_mlp_is_initialised_as_a_plain_matrix_not_a_residual_projection():
    torch.manual_seed(0)
    cfg = mdlm.ModelConfig(**{k: v for k, v in mdlm.PRESETS['base'].items() if hasattr(mdlm.ModelConfig, k)})
    p = dict(mdlm.MDLM(cfg).named_parameters())
    time_std = p['time_mlp.2.weight'].std().item()
    assert time_std == pytest.approx(0.02, rel=0.03), f'N(0, 0.02), not a residual projection\'s 0.0058: {time_std}'
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert p['blocks.0.mlp.2.weight'].std().item() == pytest.approx(residual, rel=0.03)
    assert p['blocks.0.attn.proj.weight'].std().item() == pytest.approx(residual, rel=0.03)
    assert p['blocks.0.mlp.0.weight'].std().item() == pytest.approx(0.02, rel=0.03)

def test_a_prompt_longer_than_the_context_is_continued(trained, capsys):
    prompt = 'First Citizen:\nBefore we proceed any further, hear me speak.'    # 61 characters, context 32
    assert mdlm.main(['--complete', prompt, '--length', '10', '--out-dir', trained, '--device', 'cpu']) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt) and len(out.rstrip('\n')) == len(prompt) + 10, out
    assert 'the model sees the last 31 of it' in err, err

def test_out_of_memory_is_one_line(trained, monkeypatch, capsys):
    for error in (torch.OutOfMemoryError('CUDA out of memory'), MemoryError(),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")):
        def fail(*a, error=error):
            raise error
        monkeypatch.setattr(mdlm, 'generate_text', fail)
        assert mdlm.main(['--sample', '--out-dir', trained, '--device', 'cpu']) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == 'error: out of memory: ask for less (--num-samples, --length, --batch-size)', last

def test_narrow_blanks_have_their_own_form(tok):
    ids = mdlm.parse_infill('I [1] a [2] of [___]!', tok)
    assert tok.decode(ids) == 'I ' + mdlm.MASK_GLYPH + ' a ' + mdlm.MASK_GLYPH * 2 + ' of ' + mdlm.MASK_GLYPH * 5 + '!'

# --- harness: hostile and damaged files -----------------------------------------------------------
def test_damaged_checkpoints_are_refused(trained, tmp_path, capsys):
    good = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
    keys = {'format': mdlm.FORMAT, 'model': {}, 'config': {}}
    cases = [(good[:len(good) // 2], 'not a loadable checkpoint ('),
             (b'hello world\n', 'not a loadable checkpoint (not a file that torch.save wrote)'),
             ({'model': {}, 'step': 3}, 'not an mdlm checkpoint'), (keys, 'not an mdlm checkpoint'),
             ({**keys, 'format': 'mdlm-3'}, f'saved by an earlier mdlm.py (mdlm-3; this one reads {mdlm.FORMAT})')]
    for i, (content, needle) in enumerate(cases):     # an earlier network: its weights would load into another
        (path := tmp_path / str(i) / 'ckpt.pt').parent.mkdir()
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        assert mdlm.main(['--sample', '--out-dir', str(tmp_path / str(i)), '--device', 'cpu']) == 1
        assert needle in capsys.readouterr().err
    shutil.copytree(trained, tmp_path / 'run')                  # a damaged ckpt.pt beside a good best/
    (tmp_path / 'run' / 'ckpt.pt').write_bytes(good[:1000])
    assert mdlm.main(['--sample', '--out-dir', str(tmp_path / 'run'), '--device', 'cpu']) == 1
    assert f'try its best checkpoint: --out-dir {tmp_path / "run" / "best"}' in capsys.readouterr().err

def test_a_bad_out_dir_is_found_before_any_work_and_leaves_nothing(tmp_path, capsys):
    """A file, an unwritable path, or a ckpt.pt that is a folder (even with --overwrite): one line naming
    it, before the data is read (here it does not exist), and nothing left behind."""
    (tmp_path / 'afile').write_text('x')
    (tmp_path / 'run' / 'ckpt.pt').mkdir(parents=True)
    gone = ['--data', str(tmp_path / 'no-such-text.txt')]
    for argv, needle in ((['--out-dir', str(tmp_path / 'afile')], 'is a file, not a folder'),
                         (['--out-dir', '/proc/mdlm-nope'], 'cannot write to --out-dir /proc/mdlm-nope'),
                         (['--out-dir', str(tmp_path / 'run'), '--overwrite'], 'ckpt.pt is not a file')):
        assert mdlm.main(['--train', '--max-iters', '1', *argv, *TINY[:-2], *gone]) == 1
        err = capsys.readouterr().err
        assert needle in err and 'no data file' not in err, err
    assert mdlm.main(['--train', '--resume', '--out-dir', str(tmp_path / 'none'), *TINY]) == 1
    assert 'no checkpoint at' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ['afile', 'run'] and os.listdir(tmp_path / 'run') == ['ckpt.pt']

class Evil:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ["MDLM_PWNED"]}',))

def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    os.environ['MDLM_PWNED'] = str(marker)
    (tmp_path / 'evil').mkdir()
    torch.save({'format': mdlm.FORMAT, 'x': Evil()}, tmp_path / 'evil' / 'ckpt.pt')   # torch.save pickles it
    assert b'system' in (tmp_path / 'evil' / 'ckpt.pt').read_bytes(), 'the payload is really in there'
    one_line_error(run_cli('--sample', '--out-dir', str(tmp_path / 'evil')), 'not a loadable checkpoint')
    assert not marker.exists(), 'the payload ran'

@pytest.mark.parametrize('content,needle', [(None, 'no data file'), (b'', 'empty'),
                                            (b'\xff\xfe\x00bad', 'not UTF-8'), (b'abc\n' * 5,
                                                                                'too few for block_size')])
def test_bad_data_files(tmp_path, capsys, content, needle):
    path = tmp_path / 'data.txt'
    if content is not None:
        path.write_bytes(content)
    assert mdlm.main(['--train', '--out-dir', str(tmp_path / 'o'), *TINY[:-1], str(path)]) == 1
    assert needle in capsys.readouterr().err

SAVER = r'''
import sys, torch, mdlm
base, i = eval(sys.argv[2]), 0
while True:
    i += 1
    mdlm.save_checkpoint(sys.argv[1], dict(base, iter=i, w=torch.full((500_000,), float(i))))
'''

def test_sigkill_during_checkpoint_writes_never_breaks_the_checkpoint(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    base = {'format': mdlm.FORMAT, 'model': {}, 'optimizer': {}, 'config': {}, 'vocab': [], 'best_val': 0.0,
            'args': {}, 'rng': {}}
    mdlm.save_checkpoint(path, dict(base, iter=0, w=torch.zeros(500_000)))
    for delay in (0.0, 0.2, 0.5):
        before = mdlm.load_checkpoint(path)['iter']
        p = subprocess.Popen([sys.executable, '-c', SAVER, path, repr(base)], cwd=HERE)
        while mdlm.load_checkpoint(path)['iter'] == before and p.poll() is None:   # until it writes
            time.sleep(0.01)
        time.sleep(delay)
        p.kill()
        p.wait()
        ckpt = mdlm.load_checkpoint(path)
        assert torch.equal(ckpt['w'], torch.full((500_000,), float(ckpt['iter'])))
    mdlm.save_checkpoint(path, dict(base, iter=-1, w=torch.zeros(1)))       # over a killed save's leftover
    assert mdlm.load_checkpoint(path)['iter'] == -1 and os.listdir(tmp_path) == ['ckpt.pt']

# --- harness: the command line --------------------------------------------------------------------
def test_cli_sample_complete_infill_show_eval(trained, capsys):
    base = ['--out-dir', trained, '--device', 'cpu', '--seed', '3']
    assert mdlm.main(['--sample', '--num-samples', '3', '--length', '40', *base]) == 0
    texts = capsys.readouterr().out.rstrip('\n').split('\n' + '=' * 40 + '\n')
    assert len(texts) == 3 and all(len(t) == 40 for t in texts)
    assert mdlm.main(['--complete', 'ROMEO:', '--length', '50', *base]) == 0
    out = capsys.readouterr().out
    assert out.startswith('ROMEO:') and len(out.rstrip('\n')) == 56
    template = 'To [___] or not to [___], ay.'
    fills = []
    for seed in ('1', '2'):
        assert mdlm.main(['--infill', template, *base[:-1], seed]) == 0
        fills.append(capsys.readouterr().out.rstrip('\n'))
    assert len(fills[0]) == len(template) and mdlm.MASK_GLYPH not in fills[0]
    assert all(fills[0][i] == c for i, c in enumerate(template) if c not in '[_]')
    assert fills[0] == fills[1], 'one fill is the best guess: it does not depend on the seed'
    assert mdlm.main(['--sample', '--length', '70', '--show', '--rule', 'ancestral', '--semi-ar', '0', *base]) == 0
    io_ = capsys.readouterr()
    assert len(io_.out.rstrip('\n')) == 70 and 'step    8 |' in io_.err and mdlm.MASK_GLYPH in io_.err
    outs = [mdlm.main(['--eval', '--out-dir', trained, '--eval-iters', '2', '--batch-size',
                       '16']) or capsys.readouterr().out
            for _ in range(2)]
    assert outs[0] == outs[1] and 'val nelbo:' in outs[0] and 'train nelbo:' in outs[0] and 'perplexity <=' in outs[0]

def test_cli_gpt_modes(trained_gpt, tmp_path, capsys):
    base = ['--out-dir', trained_gpt, '--device', 'cpu', '--seed', '3']
    assert mdlm.main(['--sample', '--length', '40', '--num-samples', '2', *base]) == 0
    samples = capsys.readouterr().out.split('\n' + '=' * 40 + '\n')
    assert len(samples) == 2 and all(len(s.rstrip('\n')) == 40 for s in samples)
    assert mdlm.main(['--complete', 'ROMEO:', '--length', '50', *base]) == 0
    assert capsys.readouterr().out.startswith('ROMEO:')
    assert mdlm.main(['--eval', '--eval-iters', '2', '--batch-size', '8', *base]) == 0
    out = capsys.readouterr().out
    assert 'val nll:' in out and 'perplexity' in out and 'exact' in out and 'nelbo' not in out
    shutil.copytree(trained_gpt, tmp_path / 'g')          # resumed with no flag: still the GPT twin, on its recipe
    assert mdlm.main(['--train', '--resume', '--max-iters', '42', '--out-dir', str(tmp_path / 'g'), '--device',
                      'cpu']) == 0
    ckpt = mdlm.load_checkpoint(str(tmp_path / 'g' / 'ckpt.pt'))
    assert ckpt['iter'] == 42 and ckpt['config']['causal'] and not ckpt['config']['use_time']
    assert ckpt['args']['decay_frac'] == 0.2 and 'val nll' in capsys.readouterr().out

def test_gpt_generate_writes_left_to_right_past_the_context():
    gpt = tiny_gpt(block_size=8)
    calls = count_calls(gpt)
    out = mdlm.gpt_generate(gpt, [1, 2, 3], 20, 3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 23) and calls == [3] * 20 and (out[:, :3] == torch.tensor([1, 2, 3])).all()
    assert not (out == MASK).any(), 'never the start token'
    assert torch.equal(out, mdlm.gpt_generate(gpt, [1, 2, 3], 20, 3, generator=torch.Generator().manual_seed(0)))
    assert mdlm.gpt_generate(gpt, [1], 1, 1, temperature=0)[0, 1] == gpt(torch.tensor([[MASK, 1]]), None)[0,
                                                                                                          -1].argmax()

# every refusal: one line on stderr, exit 1; {d} is the diffusion model, {g} the GPT, {tmp} a fresh directory
REFUSALS = [
    (['--complete', 'hello @ caf\u00e9', '--out-dir', '{d}'], "'@' '\u00e9'"),
    (['--complete', '', '--out-dir', '{d}'], 'the prompt is empty'),
    (['--infill', 'no blank', '--out-dir', '{d}'], 'no blank'),
    (['--sample', '--out-dir', '{tmp}/none'], '--train --out-dir '),
    (['--sample', '--out-dir', '{d}', '--device', 'tpu'], 'not a device of this machine'),
    (['--sample', '--out-dir', '{d}', '--device', 'cuda:63'], 'not a device of this machine'),
    (['--train', '--n-embd', '30', '--n-head', '4', '--data', DATA, '--out-dir', '{tmp}/x'], '--n-embd 30 must split'),
    (['--train', '--resume', '--out-dir', '{d}', '--n-layer', '3', '--max-iters', '41'],
     'cannot resume with n_layer 3'),
    (['--train', '--resume', '--gpt', '--out-dir', '{d}'], 'cannot resume with causal True'),
    (['--train', '--gpt', '--max-iters', '1', '--out-dir', '{d}', *TINY], 'continue it with --resume'),
    (['--train', '--max-iters', '1', '--out-dir', '{g}', *TINY], 'start over, replacing it, with --overwrite'),
    (['--sample', '--overwrite', '--out-dir', '{d}'], '--overwrite does nothing with --sample: it is for --train'),
    (['--train', '--resume', '--overwrite', '--out-dir', '{d}'], '--overwrite starts a --train over'),
    (['--infill', 'x [99999999999999999999] y', '--out-dir', '{d}'], 'the blank [9999999999...] makes the text longer'),
    (['--infill', 'x [10000000000] y', '--out-dir', '{d}'], 'the blank [10000000000] makes the text longer'),
    (['--infill', 'x [999999] y [999999]', '--out-dir', '{d}'], 'the blank [999999] makes the text longer'),
    (['--infill', 'To [___] be', '--num-samples', '100000', '--out-dir', '{d}'], '100000 copies of a text of 11'),
    (['--infill', 'To [___] be', '--length', '5', '--out-dir', '{d}'], '--length does nothing with --infill'),
    (['--eval', '--rule', 'random', '--out-dir', '{d}'], '--rule does nothing with --eval: it is for --sample'),
    (['--sample', '--gpt', '--out-dir', '{d}'], '--gpt does nothing with --sample: it is for --train'),
    (['--sample', '--data', DATA, '--out-dir', '{d}'], '--data does nothing with --sample'),
    (['--train', '--num-samples', '2', '--out-dir', '{tmp}/x', *TINY], '--num-samples does nothing with --train'),
    (['--sample', '--rule', 'random', '--out-dir', '{g}'], '--rule is for a diffusion model'),
    (['--complete', 'a', '--steps', '3', '--out-dir', '{g}'], '--steps is for a diffusion model'),
    (['--sample', '--semi-ar', '3', '--out-dir', '{g}'], '--semi-ar is for a diffusion model'),
    (['--eval', '--exact', '--out-dir', '{g}'], "a GPT's --eval is exact already"),
    (['--sample', '--out-dir', '{d}/ckpt.pt'], 'is a file: give the folder that holds ckpt.pt'),
    (['--infill', 'To [0] or not', '--out-dir', '{d}'], 'a blank of no characters'),
    (['--sample', '--num-samples', '2000', '--length', '1000', '--out-dir', '{d}'], 'more than 1,000,000 characters'),
    (['--train', '--max-iters', '1', '--out-dir', '/proc/mdlm-cannot-write-here', *TINY], 'mdlm-cannot-write-here'),
    (['--infill', 'To [___] or not', '--out-dir', '{g}'], 'cannot fill blanks'),
    (['--sample', '--exact', '--out-dir', '{d}'], '--exact does nothing with --sample: it is for --eval'),
    (['--eval', '--out-dir', '{d}', '--data', '{tmp}/curly.txt'], "'{'"),
    (['--train', '--train-fraction', '1e-5', '--out-dir', '{tmp}/x', *TINY], 'leaves 10 characters; a window needs 33'),
]

@pytest.mark.parametrize('argv,needle', REFUSALS, ids=[n for _, n in REFUSALS])
def test_refusals_are_one_line(argv, needle, trained, trained_gpt, tmp_path, capsys):
    (tmp_path / 'curly.txt').write_text('{curly braces are not Shakespeare}' * 100)
    argv = [a.replace('{d}', trained).replace('{g}', trained_gpt).replace('{tmp}', str(tmp_path)) for a in argv]
    assert mdlm.main(argv + ['--device', 'cpu'] * ('--device' not in argv)) == 1
    err = capsys.readouterr().err
    assert needle in err and err.strip().splitlines()[-1].startswith('error: '), err
    assert not mdlm.load_checkpoint(os.path.join(trained, 'ckpt.pt'))['config']['causal'], 'the model is untouched'

@pytest.mark.parametrize('argv', [s.split() for s in (
    '--sample --steps 0', '--sample --steps -3', '--sample --length -3', '--sample --num-samples 0', '--train --bogus',
    '--train --batch-size 0', '--train --dropout 1.5', '--sample --top-p 0', '--sample --temperature nan',
    f'--sample --seed {2 ** 70}', '--train --train-fraction 0', '--train --train-fraction 1.5', '--train --sample',
    '--sample --top 3', '--sample --steps 1000000000', '--eval --eval-iters 1000000000', '--train --eval-iters 20000')])
def test_cli_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        mdlm.main(argv)
    assert e.value.code == 2 and 'error' in capsys.readouterr().err

# --- harness: devices and precision ---------------------------------------------------------------
def test_bf16_training_step_and_sampling_on_cpu(text, tok, monkeypatch):
    """bf16 autocast only where the CPU has it natively: then the step-0 loss is within 0.01 nats of
    float32's (the loss itself is computed in float32), and sampling fills every mask."""
    monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: True)
    assert mdlm.autocast_for('cpu', 'float32') is contextlib.nullcontext, 'asked for float32: float32'
    data = torch.tensor(tok.encode(text[:10000]))
    batch = mdlm.training_batch(data, 16, 32, MASK, torch.Generator().manual_seed(0))
    model = tiny_model().train()
    ref = mdlm.batch_loss(model, *batch).item()
    bf16_loss = mdlm.in_precision(mdlm.batch_loss, mdlm.autocast_for('cpu'))
    loss = mdlm.train_step(model, [torch.optim.SGD(model.parameters(), lr=0.0)], batch, 0.0, bf16_loss)
    assert abs(loss.item() - ref) < 0.01 and loss.dtype == torch.float32, (loss.item(), ref)
    with mdlm.autocast_for('cpu')():
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16 and torch.is_autocast_enabled('cpu')
        out = mdlm.generate(model.eval(), torch.full((2, 32), MASK), sampler(steps=4), torch.Generator().manual_seed(0))
    assert not (out == MASK).any()

def test_training_and_evaluation_draw_on_the_cpu_whatever_the_device(monkeypatch, tok, text):
    """Windows, counts and masks come from CPU generators and are then moved: the same on every device."""
    seen, real_rand, real_randint = [], torch.rand, torch.randint
    monkeypatch.setattr(torch, 'rand', lambda *a, **k: seen.append(k.get('device')) or real_rand(*a, **k))
    monkeypatch.setattr(torch, 'randint', lambda *a, **k: seen.append(k.get('device')) or real_randint(*a, **k))
    data = torch.tensor(tok.encode(text[:10000]))
    mdlm.weighted_batch(data, 8, 32, MASK, torch.Generator().manual_seed(0))
    mdlm.estimate_loss(tiny_model(), data, 2, 8)
    assert len(seen) >= 6 and set(seen) == {None}, 'no draw names a device: each is made on the CPU'

def test_evaluation_turns_tf32_off_and_resume_compares_the_precision(tmp_path, monkeypatch, capsys):
    flags, real = [], mdlm.estimate_loss
    monkeypatch.setattr(mdlm, 'estimate_loss', lambda *a, **k: flags.append(torch.backends.cuda.matmul.allow_tf32)
                        or real(*a, **k))
    out = str(tmp_path / 'run')
    assert mdlm.main(['--train', '--max-iters', '2', '--eval-interval', '2', '--out-dir', out, *TINY]) == 0
    assert flags and not any(flags) and torch.backends.cuda.matmul.allow_tf32, 'off while evaluating, on after'
    assert mdlm.load_checkpoint(os.path.join(out, 'ckpt.pt'))['args']['dtype'] == 'float32', 'saved as what it is'
    argv = ['--train', '--resume', '--max-iters', '3', '--out-dir', out, '--device', 'cpu']
    assert mdlm.main([*argv, '--dtype', 'bfloat16']) == 0 and 'dtype: float32 -> bfloat16' in capsys.readouterr().out
    assert mdlm.main([*argv[:3], '4', *argv[4:]]) == 0
    assert mdlm.load_checkpoint(os.path.join(out, 'ckpt.pt'))['args']['dtype'] == 'bfloat16', 'kept when not given'
    monkeypatch.setattr(os.path, 'relpath', lambda *a: (_ for _ in ()).throw(ValueError('another drive')))
    assert mdlm.data_ref('input.txt') == os.path.abspath('input.txt'), 'across Windows drives: the absolute path'

def test_a_kill_between_the_log_and_the_save_leaves_no_step_twice(tmp_path, capsys):
    out = tmp_path / 'run'
    argv = ['--train', '--eval-interval', '2', '--out-dir', str(out), *TINY]
    assert mdlm.main([*argv, '--max-iters', '2']) == 0
    at_2 = (out / 'ckpt.pt').read_bytes()
    assert mdlm.main([*argv, '--max-iters', '4', '--resume']) == 0
    (out / 'ckpt.pt').write_bytes(at_2)          # as if killed after step 4's log line, before its save
    assert mdlm.main([*argv, '--max-iters', '4', '--resume']) == 0
    steps = [r.split(',')[0] for r in (out / 'log.csv').read_text().splitlines()[1:]]
    assert steps == ['0', '2', '4'], steps

def test_a_waiting_user_sees_progress_and_samples(trained, tmp_path, monkeypatch, capsys):
    """Step lines from the first steps, one sample line at each eval (without moving the figures: the
    same weights as a run that prints none), and model passes reported during a long --eval."""
    out = str(tmp_path / 'run')
    monkeypatch.setattr(mdlm, 'show_sample', lambda run: None)
    assert mdlm.main(['--train', '--max-iters', '40', '--eval-interval', '20', '--out-dir', out, *TINY]) == 0
    assert 'sample | ' not in capsys.readouterr().out
    monkeypatch.undo()
    assert mdlm.main(['--train', '--max-iters', '40', '--eval-interval', '20', '--out-dir', out + '2', *TINY]) == 0
    printed = capsys.readouterr().out
    assert 'step 1 | loss' in printed and 'step 10 | loss' in printed and printed.count('\nsample | ') == 3
    a, b = (torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True)['model'] for d in (out, out + '2'))
    assert all(torch.equal(a[k], b[k]) for k in a), 'the samples draw on their own generator'
    model = mdlm.load_model(trained)[0]
    with mdlm.reporting(model, '--eval, val', total=3, every=0.0):
        for _ in range(3):
            model(torch.full((1, 8), MASK), torch.ones(1))
    assert '--eval, val: 3 of 3 model passes' in capsys.readouterr().err

def test_a_temperature_too_small_to_divide_by_is_temperature_zero(trained, capsys):
    outs = []
    for temperature in ('0', '1e-310'):
        assert mdlm.main(['--sample', '--temperature', temperature, '--out-dir', trained]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and mdlm.MASK_GLYPH not in outs[0]

PRETRAINED_VAL = 1.93227   # estimate_loss on the first 4 val batches of 32, as measured when pretrained/ was made

def test_the_pretrained_model_loads_and_scores_its_figure(tok, text, capsys):
    """pretrained/ holds the default run's weights: a change of format or numerics that would strand it fails here."""
    model, ptok, ckpt = mdlm.load_model(os.path.join(HERE, 'pretrained'))
    assert ptok.itos == tok.itos and model.num_params() == 1_094_400 and ckpt['iter'] == 5000
    val = mdlm.split_data(text, tok)[1]
    assert mdlm.estimate_loss(model, val, 4, 32)[0] == pytest.approx(PRETRAINED_VAL, abs=2e-4)
    assert mdlm.main(['--sample', '--out-dir', os.path.join(HERE, 'pretrained'), '--device', 'cpu']) == 0
    assert mdlm.main(['--train', '--resume', '--out-dir', os.path.join(HERE, 'pretrained'), '--device', 'cpu']) == 1
    assert 'holds weights only' in capsys.readouterr().err
