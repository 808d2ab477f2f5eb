"""
Tests for mdlm.py. CPU only, tiny configs, fixed seeds. Run with:

    python -m pytest -q test_mdlm.py

They need Tiny Shakespeare at ./input.txt (`python mdlm.py --train` downloads it; CI copies it).
"""

import ast
import inspect
import io
import itertools
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import types
import urllib.error

import pytest
import torch

import mdlm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = mdlm.DEFAULT_DATA
TINY = ['--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--batch-size', '8',
        '--eval-iters', '2', '--dtype', 'float32', '--device', 'cpu', '--data', DATA]   # float32: no compile

@pytest.fixture(scope='session', autouse=True)
def float32_cpu():
    """Every test runs the float32 path, whatever this CPU has: the same digits on both CPU kinds,
    and no test compiles (compile is the default only with native bf16). Tests of the bf16 path
    patch this back."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mdlm, 'cpu_has_bf16', lambda: False)
        yield

def tiny_model(use_time=True, rope=True, vocab_size=66, block_size=32, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = mdlm.ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                           dropout=dropout, use_time=use_time, rope=rope)
    return mdlm.MDLM(cfg).eval()

def run_cli(*argv, timeout=120):
    """The script in a subprocess: the honest way to see exit codes and tracebacks."""
    return subprocess.run([sys.executable, os.path.join(HERE, 'mdlm.py'), *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)

def one_line_error(result, needle):
    assert result.returncode != 0, result
    assert 'Traceback' not in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr

@pytest.fixture(scope='module')
def text():
    return mdlm.load_text(DATA)

@pytest.fixture(scope='module')
def tok(text):
    return mdlm.Tokenizer.from_text(text)

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny model trained for 40 steps: enough for the CLI paths, not for good text."""
    out = str(tmp_path_factory.mktemp('trained'))
    assert mdlm.main(['--train', '--max-iters', '40', '--eval-interval', '20', '--log-interval', '20',
                      '--out-dir', out, *TINY]) == 0
    return out

# -----------------------------------------------------------------------------
# data and tokenizer

def test_data_is_tiny_shakespeare(text, tok):
    assert len(text) == 1115394
    assert tok.vocab_size == 66 and tok.mask_id == 65, 'the 65 chars + [MASK] as the last id'
    assert mdlm.MASK_GLYPH not in tok.stoi

def test_encode_decode_round_trip(tok):
    s = 'ROMEO:\nO, she doth teach the torches to burn bright!'
    assert tok.decode(tok.encode(s)) == s

def test_unknown_character_is_an_error_naming_it(tok):
    with pytest.raises(mdlm.CliError, match="'@'"):
        tok.encode('hello @ world')

def test_split_is_90_10(text, tok):
    train, val = mdlm.split_data(text, tok, 64)
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert tok.decode(val[:20].tolist()) == text[len(train):len(train) + 20]

def test_get_batch_windows_are_contiguous_text(text, tok):
    data = torch.tensor(tok.encode(text[:5000]))
    x = mdlm.get_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16)
    for row in x:
        assert tok.decode(row.tolist()) in text[:5000]

class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self
    def __exit__(self, *a):
        self.close()

def test_download_good_file_is_written(tmp_path, text):
    raw = text.encode()
    path = tmp_path / 'input.txt'
    mdlm.download_data(str(path), opener=lambda url, timeout: FakeResponse(raw))
    assert path.read_bytes() == raw
    assert os.listdir(tmp_path) == ['input.txt'], 'no temporary file left behind'

def test_download_bad_checksum_writes_nothing(tmp_path):
    path = tmp_path / 'input.txt'
    with pytest.raises(mdlm.CliError, match='sha256'):
        mdlm.download_data(str(path), opener=lambda url, timeout: FakeResponse(b'not shakespeare'))
    assert os.listdir(tmp_path) == []

def test_download_offline_says_where_to_put_the_file(tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError('no network')
    path = tmp_path / 'input.txt'
    with pytest.raises(mdlm.CliError, match=str(path)):
        mdlm.download_data(str(path), opener=offline)
    assert os.listdir(tmp_path) == []

# -----------------------------------------------------------------------------
# forward process

@pytest.mark.parametrize('t', [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mask_rate_matches_t(t):
    x0 = torch.zeros(64, 1024, dtype=torch.long)
    xt, mask = mdlm.forward_mask(x0, torch.full((64,), t), 65, torch.Generator().manual_seed(0))
    n = mask.numel()
    rate = mask.float().mean().item()
    assert abs(rate - t) <= 5 * math.sqrt(t * (1 - t) / n) + 1e-9, (rate, t)
    assert torch.equal(xt == 65, mask), 'exactly the masked positions hold [MASK]'

def test_mask_rate_is_per_sample():
    t = torch.tensor([0.1, 0.9])
    _, mask = mdlm.forward_mask(torch.zeros(2, 20000, dtype=torch.long), t, 65, torch.Generator().manual_seed(1))
    assert torch.allclose(mask.float().mean(1), t, atol=0.01)

def test_show_noise_picture(tok):
    lines = mdlm.show_noise('To be, or not to be', tok).splitlines()
    assert [line[:6] for line in lines] == ['t=0.00', 't=0.25', 't=0.50', 't=0.75', 't=1.00']
    assert lines[0].endswith('To be, or not to be') and lines[-1].endswith(mdlm.MASK_GLYPH * 19)
    masked = [{i for i, c in enumerate(line[8:]) if c == mdlm.MASK_GLYPH} for line in lines]
    assert not masked[0] and all(a <= b for a, b in zip(masked, masked[1:])), '[MASK] absorbs: masks nest as t grows'
    assert 0 < len(masked[2]) < 19, 'half-way, some of the line is left'

# -----------------------------------------------------------------------------
# model

def test_shapes_and_mask_never_predicted():
    model = tiny_model()
    x = torch.randint(66, (3, 32))
    logits = model(x, torch.rand(3))
    assert logits.shape == (3, 32, 66)
    assert torch.isinf(logits[..., 65]).all() and torch.isfinite(logits[..., :65]).all()
    assert model(x[:, :7], torch.rand(3)).shape == (3, 7, 66), 'shorter than block_size works'

@pytest.mark.parametrize('use_time', [True, False])
def test_base_preset_is_10_to_20M_parameters(use_time):
    p = mdlm.PRESETS['base']
    cfg = mdlm.ModelConfig(n_layer=p['n_layer'], n_head=p['n_head'], n_embd=p['n_embd'],
                           block_size=p['block_size'], use_time=use_time)
    n = mdlm.MDLM(cfg).num_params()
    assert 10e6 <= n <= 20e6, n

def test_lesson_plan_parameter_figure_was_wrong():
    """The plan's size (6 x 256, 8 heads, block 128, learned positions) has 5.6M parameters in
    this architecture (about 6.5M in the plan's own, with biases): nowhere near its 12.45M."""
    cfg = mdlm.ModelConfig(n_layer=6, n_head=8, n_embd=256, block_size=128, rope=False)
    assert 5.5e6 < mdlm.MDLM(cfg).num_params() < 5.7e6

def test_adaln_zero_starts_independent_of_t():
    model = tiny_model()
    x = torch.randint(66, (2, 32))
    a, b = model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9]))
    assert torch.equal(a, b), 'zero-initialised adaLN: t has no effect at the start'
    plain = tiny_model(use_time=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    assert torch.allclose(plain(x, torch.zeros(2)), a, atol=1e-6), 'at the start it is the plain transformer'
    for block in model.blocks:
        assert torch.equal(block.ln1.weight, torch.ones(32)) and torch.equal(block.ln2.bias, torch.zeros(32))
    with torch.no_grad():
        for block in model.blocks:
            block.ada.weight.normal_(std=0.1)
    assert not torch.allclose(model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9])))

def test_no_time_model_has_no_adaln_and_ignores_t():
    model = tiny_model(use_time=False)
    assert all(b.ada is None for b in model.blocks) and model.time_mlp is None
    x = torch.randint(66, (2, 32))
    assert torch.equal(model(x, torch.zeros(2)), model(x, torch.ones(2)))

def test_attention_is_bidirectional_and_matches_the_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(mdlm.manual_attention(q, k, v), y, atol=1e-5)
    model = tiny_model()
    x = torch.randint(65, (1, 32))
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 1) % 65
    assert not torch.allclose(model(x, torch.ones(1))[0, 0], model(x2, torch.ones(1))[0, 0]), \
        'changing the last token changes the first position: no causal mask'

def test_learned_positions_variant_runs():
    model = tiny_model(rope=False)
    assert model.pos_emb is not None
    assert model(torch.randint(66, (2, 32)), torch.rand(2)).shape == (2, 32, 66)

# -----------------------------------------------------------------------------
# loss

def test_antithetic_t_is_stratified_in_range():
    B = 16
    t, w = mdlm.draw_t(B, torch.Generator().manual_seed(3), 'cpu')
    assert (w == 1).all(), 'uniform t: every weight is 1'
    assert ((t >= mdlm.EPS) & (t <= 1)).all()
    bins = ((t - mdlm.EPS) / (1 - mdlm.EPS) * B).floor().long()
    assert sorted(bins.tolist()) == list(range(B)), 'one t in each of B equal strata'
    many = torch.cat([mdlm.draw_t(B, torch.Generator().manual_seed(s), 'cpu')[0] for s in range(500)])
    assert abs(many.mean().item() - (1 + mdlm.EPS) / 2) < 0.01, 'still uniform on [eps, 1]'

def test_untrained_loss_is_about_log_65(text, tok):
    """[MASK] is out of the softmax, so chance level is log 65 = 4.17 (log 66 = 4.19 with it)."""
    data = torch.tensor(tok.encode(text[:100000]))
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x0 = mdlm.get_batch(data, 512, 32, g)    # the 1/t weight makes one small batch's NELBO noisy
    t = mdlm.draw_t(512, g, 'cpu')[0]
    xt, mask = mdlm.forward_mask(x0, t, 65, g)
    with torch.no_grad():
        nelbo = mdlm.nelbo_loss(model(xt, t), x0, mask, t).item()
        naive = mdlm.naive_loss(model, x0, g).item()
    assert abs(naive - math.log(65)) < 0.1, naive
    assert abs(nelbo - math.log(65)) < 0.15, nelbo
    est, _ = mdlm.estimate_loss(model, data, 4, 32)
    assert abs(est - math.log(65)) < 0.1, est

def test_nelbo_weights_by_one_over_t_and_length():
    logits = torch.zeros(2, 4, 66)   # uniform: CE = log 66 at every position
    x0 = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.25, 0.5])
    expected = (1 / (0.25 * 4) * 1 + 1 / (0.5 * 4) * 3) / 2 * math.log(66)
    assert abs(mdlm.nelbo_loss(logits, x0, mask, t).item() - expected) < 1e-5

def test_loss_falls_when_overfitting_one_batch(text, tok):
    data = torch.tensor(tok.encode(text[:10000]))
    model = tiny_model().train()
    g = torch.Generator().manual_seed(0)
    x0 = mdlm.get_batch(data, 8, 32, g)
    t = mdlm.draw_t(8, g, 'cpu')[0]
    xt, mask = mdlm.forward_mask(x0, t, 65, g)             # one fixed batch, one fixed noise draw
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = mdlm.nelbo_loss(model(xt, t), x0, mask, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses

def test_get_lr_warmup_then_cosine():
    class A:
        lr, min_lr, warmup_iters, max_iters, schedule = 1e-3, 1e-4, 10, 110, 'cosine'
    assert mdlm.get_lr(0, A) == pytest.approx(1e-4)
    assert mdlm.get_lr(9, A) == pytest.approx(1e-3)
    assert mdlm.get_lr(60, A) == pytest.approx(5.5e-4)
    assert mdlm.get_lr(110, A) == pytest.approx(1e-4)
    lrs = [mdlm.get_lr(i, A) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))

def test_get_lr_warmup_stable_decay():
    class A:
        lr, min_lr, warmup_iters, max_iters, schedule = 1e-3, 1e-4, 10, 100, 'wsd'
    assert mdlm.get_lr(0, A) == pytest.approx(1e-4)
    assert all(mdlm.get_lr(i, A) == pytest.approx(1e-3) for i in range(9, 81)), 'stable until 80%'
    assert mdlm.get_lr(90, A) == pytest.approx(5.5e-4), 'linear decay over the last 20%'
    assert mdlm.get_lr(100, A) == pytest.approx(1e-4)

# -----------------------------------------------------------------------------
# training, checkpoints, resume

def test_checkpoint_round_trip_weights_only(trained):
    path = os.path.join(trained, 'ckpt.pt')
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['iter'] == 40 and ckpt['format'] == 'mdlm-1'
    model, tok = mdlm.model_from_checkpoint(ckpt)
    assert tok.vocab_size == 66
    fresh = mdlm.MDLM(mdlm.ModelConfig(**ckpt['config']))
    fresh.load_state_dict(ckpt['model'])
    x, t = torch.randint(66, (2, 32)), torch.rand(2)
    assert torch.equal(model(x, t), fresh.eval()(x, t))
    rows = open(os.path.join(trained, 'log.csv')).read().splitlines()
    assert rows[0].startswith('step,train_nelbo,val_nelbo') and [r.split(',')[0] for r in rows[1:]] == ['0', '20', '40']
    assert float(rows[-1].split(',')[2]) < float(rows[1].split(',')[2]), 'val NELBO fell while training'

def test_max_iters_zero_builds_evaluates_and_saves(tmp_path):
    assert mdlm.main(['--train', '--max-iters', '0', '--out-dir', str(tmp_path), *TINY]) == 0
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter'] == 0

def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    """SIGINT mid-run saves and exits non-zero with a resume hint; the resumed run then ends with
    exactly the weights of a run that was never interrupted (dropout on, so RNG state matters)."""
    args = ['--train', '--max-iters', '60', '--eval-interval', '25', '--log-interval', '1', '--dropout', '0.1',
            *TINY]
    straight = tmp_path / 'straight'
    assert mdlm.main([*args, '--out-dir', str(straight)]) == 0
    cut = tmp_path / 'cut'
    p = subprocess.Popen([sys.executable, os.path.join(HERE, 'mdlm.py'), *args, '--out-dir', str(cut)],
                         stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in p.stderr:                       # interrupt once training is under way
        if line.startswith('step 30 | loss'):
            p.send_signal(signal.SIGINT)
            break
    rest = p.stderr.read()
    assert p.wait(timeout=60) != 0
    assert 'Traceback' not in rest and '--resume' in rest, rest
    stopped_at = torch.load(cut / 'ckpt.pt', weights_only=True)['iter']
    assert 30 <= stopped_at < 60
    assert mdlm.main([*args, '--out-dir', str(cut), '--resume']) == 0
    a = torch.load(straight / 'ckpt.pt', weights_only=True)
    b = torch.load(cut / 'ckpt.pt', weights_only=True)
    assert b['iter'] == 60
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert open(straight / 'log.csv').read().splitlines()[-1].split(',')[:3] == \
        open(cut / 'log.csv').read().splitlines()[-1].split(',')[:3]

def test_resume_refuses_a_changed_architecture(trained, tmp_path, capsys):
    rc = mdlm.main(['--train', '--resume', '--out-dir', trained, *TINY[:-6], '--n-layer', '3', '--device', 'cpu',
                    '--data', DATA, '--max-iters', '41'])
    assert rc == 1 and '--n-layer 3' in capsys.readouterr().err

def test_resume_keeps_the_saved_training_flags_and_reports_changes(trained, tmp_path, capsys):
    import shutil
    out = tmp_path / 'copy'
    shutil.copytree(trained, out)
    assert mdlm.main(['--train', '--resume', '--out-dir', str(out), '--device', 'cpu', '--data', DATA,
                      '--max-iters', '42', '--log-interval', '1']) == 0
    err = capsys.readouterr().err
    assert 'resuming from' in err and 'max_iters: 40 -> 42' in err and 'step 42 |' in err, err
    assert 'batch_size' not in err, 'flags not given again keep their saved values'
    assert mdlm.main(['--train', '--resume', '--out-dir', str(out), '--device', 'cpu', '--data', DATA,
                      '--max-iters', '43', '--weight-decay', '0.5']) == 0
    assert 'weight_decay: 0.1 -> 0.5' in capsys.readouterr().err
    saved = torch.load(out / 'ckpt.pt', weights_only=True)
    assert saved['optimizer']['param_groups'][0]['weight_decay'] == 0.5 and saved['args']['batch_size'] == 8
    assert saved['iter'] == 43

def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    rc = mdlm.main(['--train', '--max-iters', '30', '--eval-interval', '10', '--log-interval', '1',
                    '--lr', '1e30', '--warmup-iters', '0', '--out-dir', str(tmp_path), *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and 'not finite at step' in err, err
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())

# -----------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize('rule', mdlm.RULES)
def test_generate_fills_every_mask_and_never_changes_a_committed_token(rule):
    model = tiny_model()
    x = torch.full((3, 32), 65)
    x[:, :5] = torch.arange(5)                       # fixed tokens
    history = []
    out, passes = mdlm.generate(model, x, 10, rule, generator=torch.Generator().manual_seed(0),
                                on_step=lambda i, xs: history.append(xs.clone()))
    assert not (out == 65).any()
    assert torch.equal(out[:, :5], x[:, :5])
    for before, after in zip([x] + history, history):
        kept = before != 65
        assert torch.equal(after[kept], before[kept]), 'a committed token changed'
    assert len(history) == 10 and torch.equal(history[-1], out)

def test_confidence_uses_exactly_steps_passes_and_spreads_the_commits():
    model = tiny_model()
    x = torch.full((2, 32), 65)
    counts = []
    prev = [x]
    def on_step(i, xs):
        counts.append(((prev[-1] == 65) & (xs != 65)).sum(1).tolist())
        prev.append(xs.clone())
    _, calls = mdlm.generate(model, x, 7, 'confidence', generator=torch.Generator().manual_seed(0), on_step=on_step)
    assert calls == 7 * 2, 'every step runs both rows'
    assert [c[0] for c in counts] == [5, 5, 5, 5, 4, 4, 4] and sum(c[0] for c in counts) == 32

def test_confidence_commits_the_most_confident_proposal():
    class Stub(torch.nn.Module):                       # fixed logits: confidences clearly apart
        config = mdlm.ModelConfig(vocab_size=66, block_size=32)
        logits = torch.cat([3 * torch.randn(1, 32, 65, generator=torch.Generator().manual_seed(0)),
                            torch.full((1, 32, 1), float('-inf'))], -1)
        def forward(self, xt, t):
            return self.logits.repeat(xt.size(0), 1, 1)
    x = torch.randint(65, (1, 32), generator=torch.Generator().manual_seed(0))
    x[0, ::2] = 65                                     # 16 masks, among known characters
    first = []
    mdlm.generate(Stub(), x, 16, 'confidence', temperature=0, generator=torch.Generator().manual_seed(0),
                  on_step=lambda i, xs: first.append(xs.clone()) if i == 0 else None)
    probs = Stub.logits.double().softmax(-1).max(-1).values[0]
    probs[x[0] != 65] = -1
    assert ((first[0][0] != 65) & (x[0] == 65)).nonzero().item() == probs.argmax().item()
    assert first[0][0, probs.argmax()] == Stub.logits[0, probs.argmax()].argmax(), 'the ranked token is committed'

def test_ancestral_unmask_fraction_matches_t_minus_s_over_t():
    model = tiny_model()
    steps, B, T = 4, 64, 32
    x = torch.full((B, T), 65)
    frames = [x]
    mdlm.generate(model, x, steps, 'ancestral', generator=torch.Generator().manual_seed(0),
                  on_step=lambda i, xs: frames.append(xs.clone()))
    for i in range(steps - 1):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        was = frames[i] == 65
        frac = ((frames[i + 1] != 65) & was).sum().item() / was.sum().item()
        p = (t - s) / t
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / was.sum().item()), (i, frac, p)

def test_ancestral_cache_skips_passes_when_nothing_changed():
    model = tiny_model()
    x = torch.full((1, 32), 65)
    x[0, :28] = 0                                       # 4 masks, 100 steps: most steps commit nothing
    out, passes = mdlm.generate(model, x, 100, 'ancestral', generator=torch.Generator().manual_seed(0))
    assert passes <= 5 and not (out == 65).any()
    # and the cache changes nothing: recomputing each step gives the same text
    uncached, all_passes = mdlm.generate(model, x, 100, 'ancestral', generator=torch.Generator().manual_seed(0),
                                         cache=False)
    assert passes < all_passes <= 100 and torch.equal(out, uncached), 'reusing logits changes nothing'

def test_per_row_cache_matches_recomputing_every_row():
    model = tiny_model()
    x = torch.full((4, 32), 65)
    x[:, :24] = torch.randint(65, (4, 24), generator=torch.Generator().manual_seed(1))
    x[1, 24:30] = 3                                     # rows with different numbers of masks
    runs = [mdlm.generate(model, x, 40, rule, generator=torch.Generator().manual_seed(2), cache=c)
            for rule in mdlm.RULES for c in (True, False)]
    for (a, pa), (b, pb) in zip(runs[::2], runs[1::2]):
        assert torch.equal(a, b) and pa <= pb <= 40 * 4
    assert runs[0][1] < runs[1][1], 'ancestral: steps that commit nothing skip the model'

def test_seeds_reproduce_and_differ():
    model = tiny_model()
    x = torch.full((2, 32), 65)
    def run(seed, rule='confidence', temperature=1.0):
        return mdlm.generate(model, x, 8, rule, temperature, generator=torch.Generator().manual_seed(seed))[0]
    for rule in mdlm.RULES:
        assert torch.equal(run(1, rule), run(1, rule))
        assert not torch.equal(run(1, rule), run(2, rule))
    assert torch.equal(run(1, 'confidence', 0.0), run(2, 'confidence', 0.0)), 'temperature 0 is argmax'

def test_top_k_one_is_argmax():
    model = tiny_model()
    logits = model(torch.full((1, 32), 65), torch.ones(1))
    tokens, _ = mdlm.propose(logits, 1.0, 1, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, logits.argmax(-1))

def test_proposals_follow_the_model_distribution():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).expand(1, 20000, 3)
    tokens, conf = mdlm.propose(logits, 1.0, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens[0], minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.015)
    assert torch.allclose(conf[0], torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)[tokens[0]])

def test_generate_text_beyond_block_size_keeps_prefix():
    model = tiny_model()
    prefix = list(range(10))
    out, passes = mdlm.generate_text(model, prefix, 100, 2, 4, 'confidence',
                                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 110) and not (out == 65).any()
    assert out[:, :10].tolist() == [prefix, prefix]

def test_parse_infill_blank_is_as_wide_as_its_marker(tok):
    ids = mdlm.parse_infill('To [___] or not to [_]!', tok)
    assert len(ids) == len('To [___] or not to [_]!')
    assert tok.decode(ids) == 'To ' + mdlm.MASK_GLYPH * 5 + ' or not to ' + mdlm.MASK_GLYPH * 3 + '!'
    with pytest.raises(mdlm.CliError, match='no blank'):
        mdlm.parse_infill('no blanks here', tok)

def test_cli_sample_complete_infill(trained, capsys):
    base = ['--out-dir', trained, '--device', 'cpu', '--steps', '8', '--seed', '3']
    assert mdlm.main(['--sample', '--num-samples', '3', '--length', '40', *base]) == 0
    texts = capsys.readouterr().out.rstrip('\n').split('\n' + '=' * 40 + '\n')
    assert len(texts) == 3 and all(len(t) == 40 for t in texts)
    assert mdlm.main(['--complete', 'ROMEO:', '--length', '50', *base]) == 0
    out = capsys.readouterr().out
    assert out.startswith('ROMEO:') and len(out.rstrip('\n')) == 56
    template = 'To [___] or not to [___], ay.'
    assert mdlm.main(['--infill', template, *base]) == 0
    filled = capsys.readouterr().out.rstrip('\n')
    assert len(filled) == len(template) and mdlm.MASK_GLYPH not in filled
    for i, c in enumerate(template):
        if template[i] not in '[_]':
            assert filled[i] == c
    assert mdlm.main(['--sample', '--length', '70', '--show', *base]) == 0   # beyond block_size 32
    io_ = capsys.readouterr()
    assert len(io_.out.rstrip('\n')) == 70 and 'step    8 |' in io_.err and mdlm.MASK_GLYPH in io_.err

@pytest.mark.parametrize('argv,needle', [
    (['--complete', 'hello @'], "'@'"),
    (['--complete', ''], 'empty'),
    (['--complete', 'x' * 40], 'at most 31'),
    (['--infill', 'no blank'], 'no blank'),
])
def test_cli_bad_generation_input(trained, capsys, argv, needle):
    assert mdlm.main([*argv, '--out-dir', trained, '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) <= 2, err

@pytest.mark.parametrize('argv', [['--sample', '--steps', '0'], ['--sample', '--length', '-3'],
                                  ['--sample', '--num-samples', '0'], ['--train', '--batch-size', '0'],
                                  ['--train', '--dropout', '1.5'], ['--train', '--sample'], ['--bogus']])
def test_cli_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        mdlm.main(argv)
    assert e.value.code == 2 and 'error' in capsys.readouterr().err

def test_cli_heads_must_divide_width(capsys):
    assert mdlm.main(['--train', '--n-embd', '30', '--n-head', '4', '--device', 'cpu', '--data', DATA]) == 1
    assert '--n-embd 30' in capsys.readouterr().err

def test_subprocess_errors_have_no_traceback(tmp_path, trained):
    one_line_error(run_cli('--sample', '--out-dir', str(tmp_path / 'none')), 'python mdlm.py --train')
    one_line_error(run_cli('--complete', 'caf\u00e9', '--out-dir', trained), "'\u00e9'")

# -----------------------------------------------------------------------------
# hostile and damaged files

def test_damaged_checkpoints_are_refused(trained, tmp_path, capsys):
    good = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
    cases = {'truncated': good[:len(good) // 2], 'not a checkpoint': b'hello world\n'}
    for name, raw in cases.items():
        d = tmp_path / name.replace(' ', '_')
        d.mkdir()
        (d / 'ckpt.pt').write_bytes(raw)
        assert mdlm.main(['--sample', '--out-dir', str(d), '--device', 'cpu']) == 1
        assert 'not a loadable checkpoint' in capsys.readouterr().err
    other = tmp_path / 'other'
    other.mkdir()
    torch.save({'model': {}, 'step': 3}, other / 'ckpt.pt')
    assert mdlm.main(['--sample', '--out-dir', str(other), '--device', 'cpu']) == 1
    assert 'not an mdlm checkpoint' in capsys.readouterr().err

class Evil:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ["MDLM_PWNED"]}',))

def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    os.environ['MDLM_PWNED'] = str(marker)
    d = tmp_path / 'evil'
    d.mkdir()
    torch.save({'format': 'mdlm-1', 'x': Evil()}, d / 'ckpt.pt')   # torch.save pickles it
    with open(d / 'ckpt.pt', 'rb') as f:                             # the payload is really in there
        assert b'system' in f.read()
    one_line_error(run_cli('--sample', '--out-dir', str(d)), 'not a loadable checkpoint')
    assert not marker.exists(), 'the payload ran'


@pytest.mark.parametrize('content,needle', [(None, 'no data file'), (b'', 'empty'),
                                            (b'\xff\xfe\x00bad', 'not UTF-8'), (b'abc\n' * 5, 'too few')])
def test_bad_data_files(tmp_path, capsys, content, needle):
    path = tmp_path / 'data.txt'
    if content is not None:
        path.write_bytes(content)
    assert mdlm.main(['--train', '--out-dir', str(tmp_path / 'o'), *TINY[:-1], str(path)]) == 1
    assert needle in capsys.readouterr().err

SAVER = r'''
import sys, torch, mdlm
i = 0
while True:
    i += 1
    mdlm.save_checkpoint(sys.argv[1], {'format': 'mdlm-1', 'model': {}, 'optimizer': {}, 'config': {}, 'vocab': [],
                                       'iter': i, 'best_val': 0.0, 'args': {}, 'rng': {},
                                       'w': torch.full((500_000,), float(i))})
'''

def test_sigkill_during_checkpoint_writes_never_breaks_the_checkpoint(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    mdlm.save_checkpoint(path, {'format': 'mdlm-1', 'model': {}, 'optimizer': {}, 'config': {}, 'vocab': [],
                                'iter': 0, 'best_val': 0.0, 'args': {}, 'rng': {}, 'w': torch.zeros(500_000)})
    for delay in (0.0, 0.05, 0.13, 0.31, 0.57, 0.83):
        before = mdlm.load_checkpoint(path)['iter']
        p = subprocess.Popen([sys.executable, '-c', SAVER, path], cwd=HERE)
        while mdlm.load_checkpoint(path)['iter'] == before and p.poll() is None:   # until it writes
            time.sleep(0.01)
        time.sleep(delay)
        p.kill()
        p.wait()
        ckpt = mdlm.load_checkpoint(path)
        assert torch.equal(ckpt['w'], torch.full((500_000,), float(ckpt['iter'])))

# -----------------------------------------------------------------------------
# evaluation

class UnigramModel(torch.nn.Module):
    """Predicts the unigram distribution everywhere, whatever it is shown."""
    def __init__(self, data, V):
        super().__init__()
        self.config = mdlm.ModelConfig(vocab_size=V, block_size=32)
        counts = torch.bincount(data, minlength=V - 1).double()
        self.p = counts / counts.sum()
        logp = torch.log(self.p).float()
        self.logits = torch.cat([logp, torch.tensor([float('-inf')])])
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
    model = tiny_model(use_time=False, block_size=L, vocab_size=66, seed=5)
    x0 = torch.tensor([[3, 17, 40, 3, 9, 60]])
    masks = torch.tensor(list(itertools.product([0, 1], repeat=L)), dtype=torch.bool)[1:]   # (63, L)
    with torch.no_grad():
        logits = model(x0.masked_fill(masks, 65), torch.zeros(len(masks)))
        S = mdlm.masked_ce(logits, x0.expand(len(masks), -1), masks).sum(1).double()        # (63,)
    k = masks.sum(1).double()
    ts = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000                            # midpoints
    P = ts[:, None] ** k * (1 - ts[:, None]) ** (L - k)                                      # P(mask | t)
    integral = ((P * S).sum(1) / (ts * L)).mean().item()
    g = torch.Generator().manual_seed(0)
    est = torch.cat([mdlm.nelbo_per_seq(model, x0.expand(64, -1), g) for _ in range(300)])
    se = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item() - integral) < 4 * se, (est.mean().item(), integral, se)

def test_standard_error_shrinks_with_more_samples(text, tok):
    data = torch.tensor(tok.encode(text[:100000]))
    model = tiny_model()
    _, se_small = mdlm.estimate_loss(model, data, 2, 32)
    _, se_large = mdlm.estimate_loss(model, data, 32, 32)
    assert se_large < 0.5 * se_small, (se_small, se_large)

def test_eval_is_deterministic_and_labels_the_naive_average(trained):
    runs = [run_cli('--eval', '--out-dir', trained, '--eval-iters', '2', '--batch-size', '16') for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    out = runs[0].stdout
    assert 'val nelbo:' in out and 'bits/char' in out and 'train nelbo:' in out
    assert 't=0.1' in out and 't=1.0' in out and 'neither a bound nor a perplexity' in out

def test_eval_on_other_text_needs_the_vocabulary(trained, tmp_path, capsys):
    path = tmp_path / 'other.txt'
    path.write_text('{curly braces are not Shakespeare}' * 100)
    assert mdlm.main(['--eval', '--out-dir', trained, '--data', str(path), '--device', 'cpu']) == 1
    assert "'{'" in capsys.readouterr().err

def test_plot_without_matplotlib_draws_in_the_terminal(trained, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)      # import matplotlib -> ImportError
    assert mdlm.main(['--plot', '--out-dir', trained]) == 0
    out = capsys.readouterr().out
    chart = [line.split('|', 1)[1] for line in out.splitlines() if line.count('|') == 1 and line.strip()[0].isdigit()]
    assert len(chart) == 12 and any(c in row for row in chart for c in 't*') and any(c in row for row in chart for c in 'v*'), out

# -----------------------------------------------------------------------------
# devices, precision, bench

def test_pick_device_prefers_the_request_and_refuses_what_is_missing():
    assert mdlm.pick_device('cpu') == 'cpu'
    best = mdlm.pick_device()
    assert best == ('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
    if torch.cuda.is_available():
        assert mdlm.pick_device('cuda') == 'cuda'
    else:
        with pytest.raises(mdlm.CliError, match='not available'):
            mdlm.pick_device('cuda')
    with pytest.raises(mdlm.CliError, match='unknown --device'):
        mdlm.pick_device('tpu')

def test_fast_path_picks_bf16_only_where_the_cpu_has_it(monkeypatch):
    """bf16 autocast is emulated (17x slower) on a CPU without native bf16: never the default there."""
    null = __import__('contextlib').nullcontext
    monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: False)
    assert mdlm.fast_path('cpu', 'auto') == (null, False), 'float32, manual attention'
    assert mdlm.fast_path('cpu', 'auto', dropout=0.1)[1] is True, 'the manual formula has no dropout'
    monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: True)
    autocast, fused = mdlm.fast_path('cpu', 'auto')
    assert autocast is not null and not fused
    with autocast():
        assert torch.ones(2, 2) @ torch.ones(2, 2) is not None and torch.get_autocast_dtype('cpu') == torch.bfloat16
    assert mdlm.fast_path('cpu', 'float32')[0] is null, '--dtype float32 wins'

def test_bf16_autocast_training_step_and_sampling_on_cpu(text, tok):
    data = torch.tensor(tok.encode(text[:10000]))
    model = tiny_model().train()
    autocast, _ = mdlm.fast_path('cpu', 'bfloat16')
    g = torch.Generator().manual_seed(0)
    x0 = mdlm.get_batch(data, 4, 32, g)
    t = mdlm.draw_t(4, g, 'cpu')[0]
    xt, mask = mdlm.forward_mask(x0, t, 65, g)
    with autocast():
        loss = mdlm.nelbo_loss(model(xt, t), x0, mask, t)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with autocast():
        out, _ = mdlm.generate(model.eval(), torch.full((2, 32), 65), 4, generator=g)
    assert not (out == 65).any()

def test_bench_prints_figures(capsys):
    assert mdlm.main(['--bench', '--max-iters', '3', '--n-layer', '1', '--n-embd', '32', '--n-head', '2',
                      '--block-size', '16', '--batch-size', '4', '--steps', '4', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'tok/s' in out and 'speed-up' in out and 'GPT of the same shape' in out
    assert all(f'sample ({r} rule' in out for r in mdlm.RULES) and 'sample (the GPT twin' in out

def test_importing_runs_nothing():
    before = sorted(os.listdir(HERE))
    r = subprocess.run([sys.executable, '-B', '-c', 'import mdlm'], capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '', r
    assert sorted(os.listdir(HERE)) == before, 'importing created files'
    r = run_cli('--help')
    assert r.returncode == 0 and r.stderr == '' and '--png FILE' in r.stdout, 'help prints no warning'

def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    """torchrun with the gloo backend on CPU: 2 ranks x batch 4 give the weights of 1 process x batch 8."""
    common = ['--train', '--max-iters', '6', '--eval-interval', '6', '--log-interval', '3', '--eval-iters', '1',
              '--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--device', 'cpu',
              '--dtype', 'float32', '--data', DATA]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(HERE, 'mdlm.py'), *common, '--batch-size', '4', '--out-dir', str(tmp_path / 'ddp')],
                       capture_output=True, text=True, timeout=120, cwd=HERE, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count('| preset') == 1, 'only rank 0 logs'
    assert mdlm.main([*common, '--batch-size', '8', '--out-dir', str(tmp_path / 'one')]) == 0
    a = torch.load(tmp_path / 'ddp' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k

def test_grad_accum_matches_a_larger_batch(tmp_path):
    common = ['--train', '--max-iters', '4', '--eval-interval', '4', '--log-interval', '2', '--eval-iters', '1',
              *TINY[:-4], '--device', 'cpu', '--dtype', 'float32', '--data', DATA]
    assert mdlm.main([*common, '--batch-size', '8', '--out-dir', str(tmp_path / 'big')]) == 0
    assert mdlm.main([*common, '--batch-size', '4', '--grad-accum', '2', '--out-dir', str(tmp_path / 'acc')]) == 0
    a = torch.load(tmp_path / 'big' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'acc' / 'ckpt.pt', weights_only=True)['model']
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k

def test_first_window_sees_the_whole_prompt():
    model = tiny_model()
    seen = []
    orig = model.forward
    model.forward = lambda xt, t: (seen.append(xt.clone()), orig(xt, t))[1]
    prefix = list(range(30))                                  # 30 of the 32 positions
    out, _ = mdlm.generate_text(model, prefix, 40, 1, 2, 'confidence', generator=torch.Generator().manual_seed(0))
    assert seen[0][0, :30].tolist() == prefix and out.shape == (1, 70) and not (out == 65).any()

def test_more_one_line_errors(trained, tmp_path, capsys):
    assert mdlm.main(['--show-noise', '']) == 1 and 'give some text' in capsys.readouterr().err
    d = tmp_path / 'crafted'
    d.mkdir()
    torch.save({'format': 'mdlm-1', 'model': {}, 'config': {}}, d / 'ckpt.pt')     # keys missing
    assert mdlm.main(['--sample', '--out-dir', str(d), '--device', 'cpu']) == 1
    assert 'not an mdlm checkpoint' in capsys.readouterr().err
    (d / 'log.csv').write_text('step,train_nelbo,val_nelbo,val_se,seconds\n500,2.6\n')
    assert mdlm.main(['--plot', '--out-dir', str(d)]) == 1 and 'log' in capsys.readouterr().err
    assert mdlm.main(['--sample', '--out-dir', trained, '--device', 'cpu:x']) == 1
    assert 'unknown --device' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mdlm.main(['--sample', '--seed', str(2 ** 70)])

# -----------------------------------------------------------------------------
# the GPT twin and the judge

@pytest.fixture(scope='module')
def trained_gpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('trained_gpt'))
    assert mdlm.main(['--train', '--gpt', '--max-iters', '40', '--eval-interval', '20', '--log-interval', '20',
                      '--out-dir', out, *TINY]) == 0
    return out

def tiny_gpt(seed=0, block_size=32):
    torch.manual_seed(seed)
    cfg = mdlm.ModelConfig(vocab_size=66, block_size=block_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                           use_time=False, causal=True)
    return mdlm.MDLM(cfg).eval()

@pytest.mark.parametrize('fused', [True, False])
def test_gpt_is_causal_and_diffusion_is_not(fused):
    gpt, diffusion = tiny_gpt(), tiny_model()
    x = torch.randint(65, (2, 32), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 65                       # change one later character
    for model in (gpt, diffusion):
        for block in model.blocks:
            block.attn.fused = fused
    with torch.no_grad():
        a, b = gpt(x, None), gpt(y, None)
        assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6), 'a GPT never looks right'
        assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-4)
        t = torch.full((2,), 0.5)
        c, d = diffusion(x, t), diffusion(y, t)
        assert not torch.allclose(c[:, :20], d[:, :20], atol=1e-4), 'a diffusion LM looks both ways'

def test_causal_manual_attention_matches_the_fused_kernel():
    q, k, v = torch.randn(3, 2, 2, 16, 8).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(mdlm.manual_attention(q, k, v, causal=True), ref, atol=1e-5)

def test_untrained_gpt_loss_is_about_log_65(text, tok):
    """The GPT predicts over the 65 characters (the start token's logit is -inf, like [MASK]'s)."""
    data = torch.tensor(tok.encode(text[:100000]))
    mean, se = mdlm.estimate_loss(tiny_gpt(), data, 4, 32)
    assert abs(mean - math.log(65)) < 0.05, mean
    assert (mdlm.nll_per_seq(tiny_gpt(), data[:32][None]) > 0).all()

def test_gpt_nll_is_the_sum_of_next_character_log_probabilities():
    """By hand: p(x) = p(x_0 | start) p(x_1 | start x_0) ..., each from its own forward pass."""
    gpt = tiny_gpt(seed=3)
    x0 = torch.tensor([[5, 17, 40, 3, 9, 60, 2]])
    total = 0.0
    with torch.no_grad():
        for i in range(x0.size(1)):
            context = torch.cat([torch.tensor([[65]]), x0[:, :i]], 1)       # start + the characters before i
            total -= gpt(context, None)[0, -1].log_softmax(-1)[x0[0, i]].item()
    assert mdlm.nll_per_seq(gpt, x0).item() == pytest.approx(total / x0.size(1), abs=1e-5)
    assert mdlm.gpt_nll_of_text(gpt, x0).sum().item() == pytest.approx(total, abs=1e-4)

def test_gpt_scores_long_text_with_a_sliding_window():
    """Past block_size each character is predicted from the start token and the block_size - 1 before it."""
    gpt = tiny_gpt(seed=1, block_size=8)
    ids = torch.randint(65, (2, 20), generator=torch.Generator().manual_seed(2))
    nll = mdlm.gpt_nll_of_text(gpt, ids)
    assert nll.shape == (2, 20)
    with torch.no_grad():
        for j in (8, 13, 19):
            x = torch.cat([torch.full((2, 1), 65), ids[:, j - 7:j]], 1)
            expect = -gpt(x, None)[:, -1].log_softmax(-1).gather(1, ids[:, j:j + 1])[:, 0]
            assert torch.allclose(nll[:, j], expect, atol=1e-5), j

def test_gpt_generate_writes_left_to_right_past_the_context():
    gpt = tiny_gpt(block_size=8)
    g = torch.Generator().manual_seed(0)
    out, passes = mdlm.gpt_generate(gpt, [1, 2, 3], 20, 3, generator=g)
    assert out.shape == (3, 23) and passes == 20 * 3 and (out[:, :3] == torch.tensor([1, 2, 3])).all()
    assert not (out == 65).any(), 'never the start token'
    again, _ = mdlm.gpt_generate(gpt, [1, 2, 3], 20, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    greedy, _ = mdlm.gpt_generate(gpt, [1], 1, 1, temperature=0)
    with torch.no_grad():
        assert greedy[0, 1] == gpt(torch.tensor([[65, 1]]), None)[0, -1].argmax()

def test_unigram_entropy():
    assert mdlm.unigram_entropy_bits(torch.full((50,), 7)) == 0
    assert mdlm.unigram_entropy_bits(torch.arange(8).repeat(4)) == pytest.approx(3.0)

def test_judge_prefers_real_text_to_shuffled(text, tok):
    """A GPT trained a little already finds real text likelier than the same characters shuffled."""
    data = torch.tensor(tok.encode(text[:200000]))
    gpt = tiny_gpt(block_size=32).train()
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x0 = mdlm.get_batch(data, 32, 32, g)
        loss = mdlm.gpt_loss(gpt(mdlm.gpt_input(x0, 65), None), x0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    gpt.eval()
    real = mdlm.get_batch(data, 8, 64, g)
    shuffled = real[:, torch.randperm(64, generator=g)]
    assert mdlm.gpt_nll_of_text(gpt, real).mean() < mdlm.gpt_nll_of_text(gpt, shuffled).mean() - 0.1

def test_gpt_checkpoint_kind_round_trips_and_resumes(trained_gpt, tmp_path, capsys):
    ckpt = mdlm.load_checkpoint(os.path.join(trained_gpt, 'ckpt.pt'))
    assert ckpt['kind'] == 'gpt' and ckpt['config']['causal'] and not ckpt['config']['use_time']
    model, _ = mdlm.model_from_checkpoint(ckpt)
    assert model.config.causal
    d = tmp_path / 'g'
    assert mdlm.main(['--train', '--gpt', '--max-iters', '2', '--eval-interval', '2', '--out-dir', str(d), *TINY]) == 0
    assert mdlm.main(['--train', '--resume', '--max-iters', '4', '--eval-interval', '2', '--out-dir', str(d),
                      '--device', 'cpu']) == 0
    ckpt = mdlm.load_checkpoint(str(d / 'ckpt.pt'))
    assert ckpt['iter'] == 4 and ckpt['kind'] == 'gpt', 'resume keeps the kind'
    assert 'val nll' in capsys.readouterr().err

def test_old_checkpoints_without_a_kind_are_diffusion(trained, tmp_path):
    ckpt = mdlm.load_checkpoint(os.path.join(trained, 'ckpt.pt'))
    del ckpt['kind']
    del ckpt['config']['causal']
    model, _ = mdlm.model_from_checkpoint(ckpt)
    assert not model.config.causal

def test_gpt_trains_into_out_gpt_by_default(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(mdlm, 'train', lambda args: seen.setdefault('out', args.out_dir))
    assert mdlm.main(['--train', '--gpt']) == 0 and seen['out'] == 'out-gpt'
    seen.clear()
    assert mdlm.main(['--train']) == 0 and seen['out'] == 'out'

def test_cli_gpt_modes(trained_gpt, trained, capsys):
    base = ['--out-dir', trained_gpt, '--device', 'cpu', '--seed', '3']
    assert mdlm.main(['--sample', '--length', '40', '--num-samples', '2', *base]) == 0
    samples = capsys.readouterr().out.split('\n' + '=' * 40 + '\n')
    assert len(samples) == 2 and all(len(s.rstrip('\n')) == 40 for s in samples)
    assert mdlm.main(['--complete', 'ROMEO:', '--length', '50', *base]) == 0
    assert capsys.readouterr().out.startswith('ROMEO:')
    assert mdlm.main(['--eval', '--eval-iters', '2', '--batch-size', '8', *base]) == 0
    out = capsys.readouterr().out
    assert 'val nll:' in out and 'perplexity' in out and 'exact' in out and 't=0.1' not in out
    assert mdlm.main(['--eval', '--eval-iters', '2', '--batch-size', '8', '--out-dir', trained, '--device', 'cpu']) == 0
    assert 'perplexity <=' in capsys.readouterr().out
    assert mdlm.main(['--sample', '--length', '40', '--num-samples', '2', '--out-dir', trained, '--device', 'cpu',
                      '--steps', '8', '--judge', trained_gpt]) == 0
    err = capsys.readouterr().err
    assert 'bits/char' in err and 'entropy' in err and 'real val text' in err

def test_score_a_file_under_either_kind(trained_gpt, trained, tmp_path, capsys):
    f = tmp_path / 'mine.txt'
    f.write_text('To be, or not to be, that is the question.\n' * 2)
    for out_dir, what in ((trained_gpt, 'exact'), (trained, 'upper bound')):
        assert mdlm.main(['--score', str(f), '--out-dir', out_dir, '--device', 'cpu']) == 0
        line = capsys.readouterr().out
        assert 'bits/char' in line and what in line and '86 chars' in line
    # deterministic, and the GPT's figure is the mean of its exact per-character NLL over the windows
    model, tok = mdlm.model_from_checkpoint(mdlm.load_checkpoint(os.path.join(trained_gpt, 'ckpt.pt')))
    ids = torch.tensor(tok.encode(f.read_text()))
    expect = sum(mdlm.nll_per_seq(model, w[None]).item() * len(w) for w in ids.split(32)) / len(ids) / math.log(2)
    assert mdlm.main(['--score', str(f), '--out-dir', trained_gpt, '--device', 'cpu']) == 0
    assert f'{expect:.4f} bits/char' in capsys.readouterr().out

def test_gpt_one_line_errors(trained_gpt, trained, tmp_path):
    one_line_error(run_cli('--infill', 'To [___] or not', '--out-dir', trained_gpt, '--device', 'cpu'),
                   'cannot fill blanks')
    one_line_error(run_cli('--sample', '--out-dir', trained_gpt, '--steps', '8', '--device', 'cpu'),
                   '--steps means nothing for a GPT')
    one_line_error(run_cli('--sample', '--out-dir', trained, '--judge', trained, '--device', 'cpu'),
                   'a judge must be a GPT')
    one_line_error(run_cli('--train', '--gpt', '--time', '--out-dir', str(tmp_path / 'x'), *TINY),
                   '--time means nothing for a GPT')
    one_line_error(run_cli('--train', '--gpt', '--max-iters', '1', '--out-dir', trained, *TINY),
                   'holds a diffusion model')
    one_line_error(run_cli('--train', '--max-iters', '1', '--out-dir', trained_gpt, *TINY), 'holds a gpt model')
    one_line_error(run_cli('--train', '--resume', '--gpt', '--out-dir', trained, '--device', 'cpu'),
                   'cannot resume with --gpt')
    one_line_error(run_cli('--sample', '--gpt', '--out-dir', trained_gpt), '--gpt is for --train')
    assert os.path.exists(os.path.join(trained, 'ckpt.pt')) and not mdlm.load_checkpoint(
        os.path.join(trained, 'ckpt.pt'))['config']['causal'], 'the diffusion model is untouched'

def test_judge_with_another_vocabulary_is_refused(trained, tmp_path):
    data = tmp_path / 'abc.txt'
    data.write_text('abcab cabca bcabc\n' * 400)
    assert mdlm.main(['--train', '--gpt', '--max-iters', '1', '--eval-iters', '1', '--n-layer', '1', '--n-head', '2',
                      '--n-embd', '16', '--block-size', '16', '--batch-size', '4', '--device', 'cpu',
                      '--data', str(data), '--out-dir', str(tmp_path / 'abc')]) == 0
    one_line_error(run_cli('--sample', '--out-dir', trained, '--steps', '4', '--judge', str(tmp_path / 'abc'),
                           '--device', 'cpu'), 'another vocabulary')

def test_compile_failure_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    """No test compiles: torch.compile is replaced by one whose compiled model fails on first use."""
    def broken_compile(model):
        def fail(*a, **k):
            raise RuntimeError('no C++ compiler found\nmore detail')
        return fail
    monkeypatch.setattr(torch, 'compile', broken_compile)
    assert mdlm.main(['--train', '--compile', '--max-iters', '2', '--eval-interval', '2',
                      '--out-dir', str(tmp_path), *TINY]) == 0
    err = capsys.readouterr().err
    assert '--compile: could not compile (no C++ compiler found); training without it' in err
    assert 'step 2 |' in err and os.path.exists(tmp_path / 'ckpt.pt')

# -----------------------------------------------------------------------------
# faster training: time proposals, complementary masks, the fast path, honest error bars

class MaskRateModel(torch.nn.Module):
    """A fake denoiser whose loss depends strongly on the mask rate m of its input: the right
    token (0) gets logit 6 (1 - m). Its NELBO integrand runs from ~0 at small t to log 65 at t = 1,
    so a proposal weighed wrongly would show at once."""
    def __init__(self):
        super().__init__()
        self.config = mdlm.ModelConfig(vocab_size=66, block_size=16)
    def forward(self, xt, t):
        m = (xt == 65).float().mean(1)                                          # (B,)
        logits = torch.zeros(*xt.shape, 66)
        logits[..., 0] = 6 * (1 - m)[:, None]
        logits[..., 65] = float('-inf')
        return logits

def proposal_losses(proposal, complementary, n_draws=300, B=64, L=16, weighted=True):
    model, data = MaskRateModel(), torch.zeros(1000, dtype=torch.long)
    out = []
    for seed in range(n_draws):
        g = torch.Generator().manual_seed(seed)
        x0, xt, mask, t, w = mdlm.training_batch(data, B, L, 65, g, False, proposal, complementary)
        out.append(mdlm.batch_loss(model, x0, xt, mask, t, w if weighted else None).item())
    return torch.tensor(out)

@pytest.mark.parametrize('proposal,complementary', [('cosine', False), ('uniform', True), ('cosine', True)])
def test_time_proposals_and_complementary_masks_keep_the_nelbo_unbiased(proposal, complementary):
    ref = proposal_losses('uniform', False)
    new = proposal_losses(proposal, complementary)
    tol = 4 * math.sqrt(ref.var() / len(ref) + new.var() / len(new))      # from the measured spread
    assert abs(new.mean() - ref.mean()) < tol, (new.mean(), ref.mean(), tol)
    if not complementary:   # the test has power: without the 1/q weight the mean moves far off
        assert abs(proposal_losses(proposal, complementary, weighted=False).mean() - ref.mean()) > 5 * tol

def test_cosine_proposal_draws_more_small_t_and_stays_in_range():
    t, w = mdlm.draw_t(10000, torch.Generator().manual_seed(0), 'cpu', 'cosine')
    assert t.min() >= mdlm.EPS - 1e-7 and t.max() <= 1
    assert (t < 0.1).float().mean() > 0.2, 'uniform would give 10%'
    assert w.mean().item() == pytest.approx(1.0, abs=0.02), 'importance weights average to 1'
    t, _ = mdlm.draw_t(10000, torch.Generator().manual_seed(0), 'cpu', 'cosine', hi=1 - mdlm.EPS)
    assert t.max() <= 1 - mdlm.EPS + 1e-7

def test_complementary_masks_are_exactly_complementary(text, tok):
    data = torch.tensor(tok.encode(text[:10000]))
    g = torch.Generator().manual_seed(0)
    x0, xt, mask, t, w = mdlm.training_batch(data, 16, 32, 65, g, False, 'uniform', True)
    assert x0.shape == (16, 32) and torch.equal(x0[:8], x0[8:]), 'half the windows, each twice'
    assert torch.equal(mask[:8], ~mask[8:]), 'each position masked in exactly one of the two'
    assert torch.equal(xt[:8] == 65, mask[:8]) and torch.equal(xt[8:] == 65, mask[8:])
    assert torch.allclose(t[8:], 1 - t[:8]) and ((t >= mdlm.EPS) & (t <= 1 - mdlm.EPS)).all()
    assert torch.equal(w[:8], w[8:])

def test_fast_path_step_zero_loss_matches_float32(text, tok, monkeypatch):
    """bf16 autocast with the manual attention formula: the same step-0 loss as eager float32 within
    0.01 nats (bf16 keeps 8 bits of mantissa; the loss itself is computed in float32)."""
    monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: True)
    data = torch.tensor(tok.encode(text[:10000]))
    batch = mdlm.training_batch(data, 16, 32, 65, torch.Generator().manual_seed(0), False)
    model = tiny_model()
    ref = mdlm.batch_loss(model, *batch).item()
    autocast, fused = mdlm.fast_path('cpu', 'auto')
    for block in model.blocks:
        block.attn.fused = fused
    with autocast():
        fast = mdlm.batch_loss(model, *batch).item()
    assert abs(fast - ref) < 0.01, (fast, ref)

def test_standard_error_matches_the_spread_of_repeated_estimates(text, tok):
    """The error bar comes from independent batches: over 24 seeds the estimates scatter about as
    much as each one's reported standard error says (a per-row error was about 2x too large)."""
    data = torch.tensor(tok.encode(text[:200000]))
    model = tiny_model()
    runs = [mdlm.estimate_loss(model, data, 8, 16, seed=s) for s in range(24)]
    spread = torch.tensor([m for m, _ in runs]).std().item()
    reported = sum(se for _, se in runs) / len(runs)
    assert 0.6 < reported / spread < 1.6, (reported, spread)

# -----------------------------------------------------------------------------
# sampler options: nucleus, choice temperature, threshold, remasking, semi-autoregressive blocks

SAMPLER_OPTIONS = [dict(rule='ancestral', top_p=0.8), dict(rule='confidence', choice_temperature=3.0),
                   dict(rule='threshold', threshold=0.5), dict(rule='ancestral', remask=0.05),
                   dict(rule='confidence', semi_ar=8), dict(rule='ancestral', semi_ar=5)]

@pytest.mark.parametrize('opts', SAMPLER_OPTIONS, ids=lambda o: '-'.join(f'{k}={v}' for k, v in o.items()))
def test_every_sampler_option_fills_all_keeps_given_and_reproduces(opts):
    model = tiny_model()
    x = torch.full((3, 32), 65)
    x[:, :4] = torch.arange(4)
    x[:, 20:23] = 7                                  # given characters on both sides of the masks
    given = x != 65
    frames = []
    def run(seed, on_step=None):
        return mdlm.generate(model, x, 10, generator=torch.Generator().manual_seed(seed), on_step=on_step, **opts)[0]
    out = run(0, lambda i, xs: frames.append(xs.clone()))
    assert not (out == 65).any(), 'no [MASK] left'
    assert all(torch.equal(f[given], x[given]) for f in frames), 'given characters untouched at every step'
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))

def test_top_p_one_is_plain_sampling_and_small_top_p_is_argmax():
    logits = torch.randn(2, 16, 66, generator=torch.Generator().manual_seed(0))
    plain = mdlm.propose(logits, 1.0, None, torch.Generator().manual_seed(1))
    nucleus = mdlm.propose(logits, 1.0, None, torch.Generator().manual_seed(1), top_p=1.0)
    assert torch.equal(plain[0], nucleus[0]) and torch.equal(plain[1], nucleus[1])
    tiny, conf = mdlm.propose(logits, 1.0, None, torch.Generator().manual_seed(1), top_p=1e-6)
    assert torch.equal(tiny, logits.argmax(-1)) and torch.allclose(conf, torch.ones_like(conf)), 'the top token always stays'

def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(1, 20000, 4)
    tokens, conf = mdlm.propose(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=0.75)
    freq = torch.bincount(tokens[0], minlength=4).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.015)
    assert torch.allclose(conf[0, tokens[0] == 0], torch.tensor(0.625, dtype=torch.float64)), 'renormalised'

def test_choice_temperature_zero_is_the_plain_confidence_rule():
    model = tiny_model()
    x = torch.full((2, 32), 65)
    a = mdlm.generate(model, x, 8, 'confidence', generator=torch.Generator().manual_seed(0))[0]
    b = mdlm.generate(model, x, 8, 'confidence', generator=torch.Generator().manual_seed(0), choice_temperature=0.0)[0]
    c = mdlm.generate(model, x, 8, 'confidence', generator=torch.Generator().manual_seed(0), choice_temperature=5.0)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)

def test_threshold_commits_all_above_p_and_at_least_one_per_step():
    model = tiny_model()
    x = torch.full((4, 32), 65)
    g = torch.Generator().manual_seed(0)
    frames, confs = [x], []
    real_propose = mdlm.propose
    def spy(*a, **k):
        out = real_propose(*a, **k)
        confs.append(out[1])
        return out
    mdlm.propose = spy
    try:
        out, passes = mdlm.generate(model, x, 32, 'threshold', generator=g, threshold=1 / 65, cache=False,
                                    on_step=lambda i, xs: frames.append(xs.clone()))
    finally:
        mdlm.propose = real_propose
    assert not (out == 65).any() and passes < 32 * 4, 'steps are a cap: it stops when all are committed'
    for before, after, conf in zip(frames, frames[1:], confs):
        was, now = before == 65, after != 65
        sure = was & (conf > 1 / 65)
        assert (now[sure]).all(), 'every proposal above P is committed'
        assert ((was & now).sum(1) >= was.any(1).long()).all(), 'at least one per row with masks'

def test_remasking_ends_with_no_masks_and_never_remasks_given():
    model = tiny_model()
    x = torch.full((8, 32), 65)
    x[:, ::3] = 5
    frames = [x]
    out, _ = mdlm.generate(model, x, 20, 'ancestral', generator=torch.Generator().manual_seed(0), remask=0.2,
                           on_step=lambda i, xs: frames.append(xs.clone()))
    assert not (out == 65).any()
    remasked = sum(((a != 65) & (b == 65)).sum().item() for a, b in zip(frames, frames[1:]))
    assert remasked > 0, 'something was remasked'
    assert all((f[:, ::3] == 5).all() for f in frames), 'given characters never remasked'

def test_remask_zero_is_the_ancestral_rule():
    model = tiny_model()
    x = torch.full((2, 32), 65)
    a = mdlm.generate(model, x, 8, 'ancestral', generator=torch.Generator().manual_seed(0))[0]
    b = mdlm.generate(model, x, 8, 'ancestral', generator=torch.Generator().manual_seed(0), remask=0.0)[0]
    assert torch.equal(a, b)

def test_semi_ar_with_the_whole_length_is_one_block_and_goes_left_to_right():
    model = tiny_model()
    x = torch.full((2, 32), 65)
    x[:, :4] = 1
    for rule in ('ancestral', 'confidence'):
        a = mdlm.generate(model, x, 8, rule, generator=torch.Generator().manual_seed(0))
        b = mdlm.generate(model, x, 8, rule, generator=torch.Generator().manual_seed(0), semi_ar=28)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    frames = []
    mdlm.generate(model, x, 4, 'confidence', generator=torch.Generator().manual_seed(0), semi_ar=7,
                  on_step=lambda i, xs: frames.append(xs.clone()))
    assert len(frames) == 16, '4 blocks of 7, 4 steps each'
    for n, f in enumerate(frames[3::4]):
        assert not (f[:, :4 + 7 * (n + 1)] == 65).any() and (f[:, 4 + 7 * (n + 1):] == 65).all()

def test_sampler_flags_with_the_wrong_rule_are_refused(trained, capsys):
    for argv, needle in [(['--remask', '0.01', '--rule', 'confidence'], '--remask is for --rule ancestral'),
                         (['--choice-temperature', '1', '--rule', 'ancestral'], '--choice-temperature is for --rule confidence'),
                         (['--remask', '0.01'], '--remask is for --rule ancestral, not confidence'),
                         (['--threshold', '0.5', '--rule', 'random'], '--threshold is for --rule threshold')]:
        assert mdlm.main(['--sample', '--out-dir', trained, '--device', 'cpu', *argv]) == 1
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mdlm.main(['--sample', '--top', '3'])       # no prefix matching: --top is not --top-k
    with pytest.raises(SystemExit):
        mdlm.main(['--sample', '--top-p', '0'])

def test_long_text_infill_keeps_everything_outside_the_blanks(tok):
    """A text three contexts long, blanks near both ends and in the middle: each is filled from a
    window around it; every character outside the blanks comes back verbatim."""
    model = tiny_model()
    text = ('First Citizen:\nBefore we proceed any further, hear me [_____].\n\nAll:\nSpeak, speak.\n'
            'First Citizen:\nYou are all resolved rather to die than to [____]?\n') + 'x' * 40 + ' [___]'
    ids = mdlm.parse_infill(text, tok)
    assert len(ids) > 3 * 32
    windows = []
    real = mdlm.generate
    def spy(model, x, *a, **k):
        windows.append(x.shape)
        return real(model, x, *a, **k)
    mdlm.generate = spy
    try:
        out, _ = mdlm.infill(model, ids, 2, 16, 'ancestral', generator=torch.Generator().manual_seed(0))
    finally:
        mdlm.generate = real
    given = torch.tensor(ids) != 65
    assert not (out == 65).any() and (out[:, given] == torch.tensor(ids)[given]).all()
    assert len(windows) == 3 and all(w == (2, 32) for w in windows), 'one context-sized window per blank'
    short = mdlm.parse_infill('To [___] or not', tok)
    a = mdlm.infill(model, short, 1, 8, 'confidence', generator=torch.Generator().manual_seed(0))[0]
    b = mdlm.generate(model, torch.tensor([short]), 8, 'confidence', generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(a, b), 'a text that fits is one generate call'

def test_blanked_words_are_real_words_at_their_place(text):
    qs = mdlm.blanked_words(text[:50000], 5, 20)
    assert len(qs) == 20 and len({q for q in qs}) == 20
    for context, start, word in qs:
        assert context[start:start + 5] == word and word.islower() and context.count('\n') == 2
        assert not context[start - 1:start].isalpha() and not context[start + 5:start + 6].isalpha()
    assert qs == mdlm.blanked_words(text[:50000], 5, 20), 'seeded'

def test_infill_accuracy_runs_for_both_kinds(text, tok):
    """A model that always answers right scores 100%; both real kinds run on a few questions."""
    class Oracle(torch.nn.Module):       # a "diffusion model" that sees the answer: logits from x0
        config = mdlm.ModelConfig(vocab_size=66, block_size=32)
        answer = None
        def forward(self, xt, t):
            return torch.where(torch.arange(66) == Oracle.answer[:, :, None], 10.0, -10.0).float()
    split = int(0.9 * len(text))
    context, start, word = mdlm.blanked_words(text[split:], 3, 1)[0]
    ids = torch.tensor(tok.encode(context))
    a = max(0, min((2 * start + 3 - 32) // 2, len(ids) - 32, start))
    Oracle.answer = ids[a:a + 32][None]
    oracle = Oracle()
    oracle.register_parameter('p', torch.nn.Parameter(torch.zeros(1)))
    rows = mdlm.infill_accuracy(oracle, tok, text[:split], text[split:], lengths=(3,), n=1, steps=8,
                                rule='confidence', generator=torch.Generator().manual_seed(0))
    assert rows[0][:3] == (3, 1.0, 1.0)
    for model in (tiny_model(), tiny_gpt()):
        rows = mdlm.infill_accuracy(model, tok, text[:200000], text[split:], lengths=(1, 3), n=2, steps=4,
                                    rule='ancestral', generator=torch.Generator().manual_seed(0)) \
            if not model.config.causal else mdlm.infill_accuracy(model, tok, text[:200000], text[split:], lengths=(1, 3), n=2)
        assert [r[0] for r in rows] == [1, 3] and all(0 <= r[1] <= r[2] <= 1 for r in rows)

def test_window_bound_shares_masks_across_rows():
    """Same masks for every row: two equal rows get equal bounds, and one row's bound is the
    mean of the exact-k estimates drawn with the same generator."""
    model = tiny_model(use_time=False)
    x0 = torch.randint(65, (1, 32), generator=torch.Generator().manual_seed(0))
    both = mdlm.window_bound(model, x0.repeat(2, 1), 16, torch.Generator().manual_seed(1))
    assert both[0] == both[1]
    ref = mdlm.nelbo_per_seq(model, x0.expand(16, -1), torch.Generator().manual_seed(1)).mean()
    assert both[0].item() == pytest.approx(ref.item(), abs=1e-5)

def test_best_of_keeps_the_fill_the_bound_prefers(monkeypatch):
    model = tiny_model()
    ids = [1] * 10 + [65] * 5 + [2] * 10
    drawn = {}
    real_generate = mdlm.generate
    def spy(model, x, *a, **k):
        out = real_generate(model, x, *a, **k)
        drawn['x'] = out[0].clone()
        return out
    monkeypatch.setattr(mdlm, 'generate', spy)
    monkeypatch.setattr(mdlm, 'window_bound', lambda m, x, draws, g: torch.tensor([3., 1., 2., 0., 5., 4.]))
    out, _ = mdlm.infill(model, ids, 2, 8, 'ancestral', best_of=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 25) and not (out == 65).any()
    assert torch.equal(out[0], drawn['x'][1]) and torch.equal(out[1], drawn['x'][3]), 'the lowest bound in each group'

def test_auto_preset_picks_the_fast_path_steps_and_compile_by_capability(monkeypatch):
    """With native bf16 the tiny preset compiles and takes more steps; without, float32 eager and
    fewer steps, so that both fit the same wall budget. A GPU gets base; mps the tiny preset."""
    def resolved(bf16, device='cpu', *argv):
        monkeypatch.setattr(mdlm, 'cpu_has_bf16', lambda: bf16)
        args = mdlm.build_parser().parse_args(['--train', *argv])
        args.explicit = {k for k, v in vars(args).items() if v is not None}
        return mdlm.resolve(args, device), args
    preset, args = resolved(True)
    assert preset == 'tiny' and args.compile and args.max_iters == mdlm.TINY_BF16_ITERS
    assert args.schedule == 'wsd' and args.t_proposal == 'cosine' and args.use_time is False and args.lr == 2e-3
    _, args = resolved(False)
    assert not args.compile and args.max_iters == mdlm.TINY_FP32_ITERS < mdlm.TINY_BF16_ITERS
    _, args = resolved(True, 'cpu', '--dtype', 'float32')
    assert not args.compile and args.max_iters == mdlm.TINY_FP32_ITERS
    _, args = resolved(True, 'cpu', '--no-compile', '--max-iters', '7')
    assert not args.compile and args.max_iters == 7, 'flags win'
    assert resolved(False, 'mps')[0] == 'tiny' and resolved(False, 'cuda')[0] == 'base'
    _, args = resolved(False, 'cuda', '--gpt')
    assert args.use_time is False and args.causal

def test_train_removes_temporary_files_of_a_killed_save(tmp_path):
    (tmp_path / '.ckpt-abc123.tmp').write_bytes(b'half a checkpoint')
    (tmp_path / 'keep.txt').write_text('not ours')
    assert mdlm.main(['--train', '--max-iters', '0', '--out-dir', str(tmp_path), *TINY]) == 0
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'keep.txt', 'log.csv']

def test_default_sampler_is_the_frontier_pick_until_a_sampler_flag_is_given():
    def opts(*argv):
        args = mdlm.build_parser().parse_args(['--sample', *argv])
        args.explicit = {k for k, v in vars(args).items() if v is not None}
        return mdlm.sampler_options(args, None)
    assert {k: opts()[k] for k in ('rule', 'steps', 'semi_ar')} == mdlm.DEFAULT_SAMPLER
    assert {k: opts('--rule', 'ancestral')[k] for k in ('rule', 'steps', 'semi_ar')} == \
        dict(rule='ancestral', steps=64, semi_ar=None)
    assert opts('--steps', '16')['rule'] == 'confidence' and opts('--steps', '16')['semi_ar'] is None

def test_resuming_an_older_checkpoint_keeps_the_recipe_it_was_trained_with(tmp_path, capsys):
    """Checkpoints from before --schedule and --t-proposal trained with cosine and uniform t."""
    assert mdlm.main(['--train', '--max-iters', '2', '--eval-interval', '2', '--out-dir', str(tmp_path), *TINY]) == 0
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    for k in ('schedule', 't_proposal', 'complementary'):
        del ckpt['args'][k]
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    seen = {}
    real = mdlm.training_batch
    def spy(*a, **k):
        seen['proposal'] = a[6]
        return real(*a, **k)
    mdlm.training_batch = spy
    try:
        assert mdlm.main(['--train', '--resume', '--max-iters', '4', '--eval-interval', '2', '--out-dir', str(tmp_path),
                          '--device', 'cpu']) == 0
    finally:
        mdlm.training_batch = real
    assert seen['proposal'] == 'uniform' and torch.load(tmp_path / 'ckpt.pt', weights_only=True)['args']['schedule'] == 'cosine'

def test_more_refusals_for_the_wrong_kind_or_mode(trained, trained_gpt, capsys):
    for argv, needle in [(['--eval', '--out-dir', trained_gpt, '--steps', '8'], '--steps means nothing for a GPT'),
                         (['--frontier', '--out-dir', trained_gpt, '--judge', trained_gpt], 'is a GPT'),
                         (['--sample', '--out-dir', trained, '--best-of', '4'], '--best-of is for --infill')]:
        assert mdlm.main([*argv, '--device', 'cpu']) == 1
        assert needle in capsys.readouterr().err

def test_threshold_zero_is_taken_as_given():
    args = mdlm.build_parser().parse_args(['--sample', '--rule', 'threshold', '--threshold', '0'])
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    assert mdlm.sampler_options(args, None)['threshold'] == 0.0

def test_loss_naive_trains_with_the_pooled_masked_ce(text, tok, tmp_path, capsys):
    data = torch.tensor(tok.encode(text[:10000]))
    batch = mdlm.training_batch(data, 8, 32, 65, torch.Generator().manual_seed(0), False)
    model = tiny_model()
    x0, xt, mask, t, w = batch
    logits = model(xt, t)
    pooled = (mdlm.masked_ce(logits, x0, mask).sum() / mask.sum()).item()
    assert mdlm.batch_loss(model, *batch, 'naive').item() == pytest.approx(pooled, abs=1e-5)
    assert mdlm.batch_loss(model, *batch).item() != pytest.approx(pooled, abs=1e-3), 'the NELBO weighs by 1/t'
    assert mdlm.main(['--train', '--loss', 'naive', '--max-iters', '2', '--eval-interval', '2',
                      '--out-dir', str(tmp_path), *TINY]) == 0
    assert 'val nelbo' in capsys.readouterr().err, 'evaluated as a bound all the same'
    ckpt = mdlm.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert ckpt['args']['loss'] == 'naive' and ckpt['args']['t_proposal'] == 'uniform'


# --- the file as a lesson and as a notebook -----------------------------------------------------

def lesson_and_harness():
    lines = open(os.path.join(HERE, 'mdlm.py'), encoding='utf-8').read().split('\n')
    marks = [i for i, line in enumerate(lines) if 'THE LESSON IS COMPLETE' in line]
    assert len(marks) == 1, 'one marked line ends the lesson'
    return '\n'.join(lines[:marks[0]]), '\n'.join(lines[marks[0]:])

def test_the_lesson_never_calls_into_the_harness():
    lesson, harness = lesson_and_harness()
    below = set()
    for node in ast.parse(harness).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            below.add(node.name)
        elif isinstance(node, ast.Assign):
            below |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    used = {n.id for n in ast.walk(ast.parse(lesson)) if isinstance(n, ast.Name)}
    assert below and not used & below, f'the lesson uses harness names: {sorted(used & below)}'
    headings = re.findall(r'(?m)^# %% (\d)\. ', lesson)
    assert headings == [str(i) for i in range(1, 10)], f'sections 1..9 in order, each a cell: {headings}'
    for name in ('train_step', 'generate', 'infill', 'estimate_loss', 'nelbo_loss', 'forward_mask'):
        assert f'def {name}(' in lesson, f'{name} is part of the lesson'
    for name in ('train', 'save_checkpoint', 'ddp_setup', 'build_parser', 'main', 'run_bench'):
        assert f'def {name}(' in harness, f'{name} is harness'

def test_train_step_is_about_ten_lines():
    src = inspect.getsource(mdlm.train_step)
    body = [line for line in src.split('\n')[1:] if line.strip() and not line.strip().startswith(('#', '"""'))
            and not line.startswith('    autocast') and '"""' not in line]
    assert len(body) <= 14, f'train_step has {len(body)} code lines'

def test_the_file_runs_cell_by_cell_as_a_notebook(monkeypatch, capsys):
    """Every '# %%' cell in order, in one namespace, as a Jupyter kernel runs them (no __file__,
    ipykernel loaded, __name__ '__main__'), with 3 demo training steps: the demos load the data,
    train, sample, complete, fill and score, and the last cell does not parse the kernel's argv."""
    src = open(os.path.join(HERE, 'mdlm.py'), encoding='utf-8').read()
    cells = re.split(r'(?m)^(?=# %%)', src)
    assert len(cells) >= 15, len(cells)
    monkeypatch.setitem(sys.modules, 'ipykernel', types.ModuleType('ipykernel'))
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(sys, 'argv', ['ipykernel_launcher.py', '-f', '/tmp/kernel.json'])
    ns = {'__name__': '__main__'}
    for i, cell in enumerate(cells):
        exec(compile(cell, f'<cell {i}>', 'exec'), ns)
        if 'DEMO_ITERS' in ns:
            ns['DEMO_ITERS'] = 3
    out = capsys.readouterr().out
    assert ns['NOTEBOOK'] is True and ns['DEFAULT_DATA'] == os.path.join(HERE, 'input.txt')
    assert '1,115,394 characters' in out and 't=1.0' in out and 'step 2 | loss' in out, out
    assert f'log 65 = {math.log(65):.3f}' in out and 'val NELBO' in out and 'To be, or not to ' in out, out
    assert mdlm.MASK_GLYPH not in out.split('step 2 | loss')[1], 'every demo after training fills all its masks'

def test_importing_leaves_the_demos_off():
    assert mdlm.NOTEBOOK is False, 'imported (or run as a script), no demo runs'

def test_generate_with_the_additions_off_is_the_textbook_loop():
    """The plain MDLM sampler, written out: at each of N steps run the model on every row, draw a
    proposal per position, and unmask each mask with probability (t - s) / t. generate with no
    cache and the ancestral rule must give the same text, token for token, from the same seed,
    and with the cache on too (it only skips passes whose input did not change)."""
    model = tiny_model(use_time=True)
    steps, mask_id = 16, 65
    x = torch.full((3, 32), mask_id)
    x[:, :4] = torch.tensor([1, 2, 3, 4])            # a prompt: given tokens
    g = torch.Generator().manual_seed(7)
    plain = x.clone()
    with torch.no_grad():
        for i in range(steps):
            logits = model(plain, (plain == mask_id).float().mean(1))
            tokens, _ = mdlm.propose(logits, 1.0, None, g)
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            u = torch.rand(plain.shape, generator=g)
            unmask = (plain == mask_id) & (u < ((i + 1) / steps - i / steps) / (1 - i / steps))   # (t - s) / t
            plain = torch.where(unmask, tokens, plain)
            if not (plain == mask_id).any():
                break
    for cache in (False, True):
        out, _ = mdlm.generate(model, x, steps, 'ancestral', generator=torch.Generator().manual_seed(7), cache=cache)
        assert torch.equal(out, plain), f'cache={cache}: generate is the textbook loop'

def test_sampler_defaults_live_in_one_place():
    sig = inspect.signature(mdlm.generate).parameters
    for k in ('temperature', 'top_p', 'choice_temperature', 'threshold', 'remask'):
        assert sig[k].default == mdlm.SAMPLER_FALLBACKS[k], k
    assert inspect.signature(mdlm.infill).parameters['best_of'].default == mdlm.SAMPLER_FALLBACKS['best_of']
    args = mdlm.build_parser().parse_args(['--sample'])
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    opts = mdlm.sampler_options(args, None)
    assert {k: opts[k] for k in mdlm.DEFAULT_SAMPLER} == mdlm.DEFAULT_SAMPLER
    assert all(opts[k] == v for k, v in mdlm.SAMPLER_FALLBACKS.items() if k not in ('steps', 'best_of'))
    args = mdlm.build_parser().parse_args(['--sample', '--rule', 'random'])
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    assert mdlm.sampler_options(args, None)['steps'] == mdlm.SAMPLER_FALLBACKS['steps']
    assert args.seed == mdlm.SEED

def test_train_step_with_micro_batches_is_one_step_on_their_union(text, tok):
    data = torch.tensor(tok.encode(text[:10000]))
    batch = mdlm.training_batch(data, 8, 32, 65, torch.Generator().manual_seed(0), False, 'cosine')
    halves = [tuple(a[:4] for a in batch), tuple(a[4:] for a in batch)]
    params = []
    for batches in ([batch], halves):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = mdlm.train_step(model.train(), opt, batches, 0.5)
        assert opt.param_groups[0]['lr'] == 0.5, 'the step sets its learning rate'
        assert all(p.grad is None for p in model.parameters()), 'gradients cleared after the update'
        params.append((loss.item(), torch.cat([p.detach().flatten() for p in model.parameters()])))
    (whole, p1), (split, p2) = params
    assert whole == pytest.approx(split, abs=1e-5) and torch.allclose(p1, p2, atol=1e-6), 'accumulation is exact'


# --- pictures -------------------------------------------------------------------------------------

def png_ok(path):
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n', f'{path} is a PNG'

def test_every_picture_is_written_by_its_command(trained, trained_gpt, tmp_path, capsys):
    runs = {'forward': ['--show-noise', 'To be, or not to be'],
            'curves': ['--plot', trained, trained_gpt],
            'levels': ['--eval', '--out-dir', trained, '--eval-iters', '4'],
            'frames': ['--sample', '--show', '--out-dir', trained, '--rule', 'ancestral', '--steps', '12']}
    for name, argv in runs.items():
        path = tmp_path / 'pictures' / f'{name}.png'
        assert mdlm.main([*argv, '--png', str(path), '--device', 'cpu', '--data', DATA]) == 0, name
        png_ok(path)
    err = capsys.readouterr().err
    assert err.count('wrote ') == 4 and 'step   12 |' in err
    assert mdlm.main(['--plot', trained]) == 0 and os.path.exists(os.path.join(trained, 'loss.png')), 'the default file'

def test_frames_picture_draws_nine_frames_first_and_last(trained, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(mdlm, 'text_picture', lambda lines, path, title: drawn.update(lines=lines, title=title))
    assert mdlm.main(['--sample', '--show', '--out-dir', trained, '--rule', 'random', '--steps', '20',
                      '--png', str(tmp_path / 'f.png'), '--device', 'cpu']) == 0
    steps = [int(line.split('|')[0].split()[1]) for line in drawn['lines']]
    assert steps[0] == 1 and steps[-1] == 20 and len(steps) == 9 and steps == sorted(steps), steps
    assert mdlm.MASK_GLYPH not in drawn['lines'][-1] and 'rule random, 20 steps' in drawn['title']

def test_png_where_there_is_nothing_to_draw_is_refused(trained, trained_gpt, tmp_path, capsys):
    for argv, needle in [(['--sample', '--out-dir', trained], '--png draws for'),
                         (['--train', '--out-dir', str(tmp_path), *TINY], '--png draws for'),
                         (['--eval', '--out-dir', trained_gpt], 'a GPT has no noise level')]:
        assert mdlm.main([*argv, '--png', str(tmp_path / 'x.png'), '--device', 'cpu']) == 1, argv
        assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'x.png') and not os.path.exists(tmp_path / 'ckpt.pt')

def test_every_noise_level_scores_the_same_windows(text, tok):
    data = torch.tensor(tok.encode(text[:20000]))
    model = tiny_model().train()
    a, b = mdlm.ce_per_noise_level(model, data, [1.0, 1.0], 2, 4)   # t = 1 masks all: only windows differ
    assert a == b, 'the same windows at every t'
    assert model.training, 'the mode it came in'

def test_one_infill_is_the_best_guess_several_are_draws(trained, capsys):
    def opts(*argv):
        args = mdlm.build_parser().parse_args(['--infill', 'a [_] b', *argv])
        args.explicit = {k for k, v in vars(args).items() if v is not None}
        return mdlm.sampler_options(args, None, infill=True)
    assert opts()['temperature'] == mdlm.INFILL_TEMPERATURE == 0.0
    assert opts('--num-samples', '2')['temperature'] == opts('--best-of', '2')['temperature'] == 1.0
    assert opts('--temperature', '0.5')['temperature'] == 0.5
    fills = []
    for seed in ('1', '2'):
        assert mdlm.main(['--infill', 'To be, or not to be, that is the [______].', '--out-dir', trained,
                          '--seed', seed, '--device', 'cpu']) == 0
        fills.append(capsys.readouterr().out)
    assert fills[0] == fills[1] and mdlm.MASK_GLYPH not in fills[0], 'the best guess does not depend on the seed'

def test_png_without_matplotlib_is_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)      # import matplotlib -> ImportError
    for argv in (['--plot', trained], ['--show-noise', 'To be'], ['--eval', '--out-dir', trained, '--eval-iters', '1']):
        assert mdlm.main([*argv, '--png', str(tmp_path / 'x.png'), '--device', 'cpu']) == 1, argv
        assert '--png needs matplotlib' in capsys.readouterr().err

def test_infill_eval_outside_eval_is_refused(trained, capsys):
    assert mdlm.main(['--sample', '--infill-eval', '--out-dir', trained, '--device', 'cpu']) == 1
    assert '--infill-eval is for --eval' in capsys.readouterr().err
