"""
Tests for lab/lab.py: every mode runs on tiny models and prints or draws what the README shows.
Run with the lesson's tests, from the project root:

    python -m pytest -q -rs test_mdlm.py lab/test_lab.py
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
spec = importlib.util.spec_from_file_location('lab', os.path.join(HERE, 'lab.py'))
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)             # it puts the project root on the path and imports mdlm
mdlm = lab.mdlm
TINY = ['--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--batch-size', '8',
        '--eval-iters', '2', '--device', 'cpu']

@pytest.fixture(scope='module', autouse=True)
def float32_cpu():
    """float32 whatever the CPU has: the same digits on every machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mdlm, 'cpu_has_bf16', lambda: False)
        yield

@pytest.fixture(scope='module')
def text():
    return mdlm.load_text(mdlm.DEFAULT_DATA)

@pytest.fixture(scope='module')
def tok(text):
    return mdlm.Tokenizer(sorted(set(text)))

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A tiny diffusion model and its GPT twin, 40 steps each."""
    d, g = (str(tmp_path_factory.mktemp(name)) for name in ('diffusion', 'gpt'))
    assert mdlm.main(['--train', '--max-iters', '40', '--eval-interval', '20', '--out-dir', d, *TINY]) == 0
    assert mdlm.main(['--train', '--gpt', '--max-iters', '40', '--eval-interval', '20', '--out-dir', g, *TINY]) == 0
    return d, g

def tiny(causal=False):
    torch.manual_seed(0)
    return mdlm.MDLM(mdlm.ModelConfig(vocab_size=66, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                                      use_time=not causal, causal=causal)).eval()

def png_ok(path):
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n', f'{path} is a PNG'

def test_lab_runs_from_elsewhere(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, 'lab.py'), '--help'], capture_output=True, text=True,
                       cwd=str(tmp_path))    # it finds mdlm wherever it is run from
    assert r.returncode == 0 and '--frontier' in r.stdout and r.stderr == '', r

def test_frontier_scores_every_setting_and_counts_model_calls(runs, capsys, tmp_path):
    d, g = runs
    png = tmp_path / 'frontier.png'
    assert lab.main(['--frontier', '--out-dir', d, '--judge', g, '--num-samples', '2', '--length', '40',
                     '--device', 'cpu', '--png', str(png)]) == 0
    out = capsys.readouterr().out
    rows = {line[:46].strip(): line[46:].split() for line in out.splitlines()[2:]}
    assert len(rows) == len(lab.FRONTIER) + 2 and 'confidence, semi-ar 8 (default)' in rows, out
    assert float(rows['confidence, semi-ar 8 (default)'][2]) == 1.0, 'the default: one call per character'
    assert float(rows['ancestral, 16 steps'][2]) < 1.0 < float(rows['ancestral, 256 steps'][2])
    assert rows['real val text'][2] == 'nan' and all(float(v[0]) > 0 for v in rows.values())
    png_ok(png)
    assert lab.main(['--frontier', '--out-dir', g, '--judge', g, '--device', 'cpu']) == 1
    assert 'is a GPT' in capsys.readouterr().err

def test_blanked_words_are_real_words_at_their_place(text):
    qs = lab.blanked_words(text[:50000], 5, 20)
    assert len(qs) == 20 and len(set(qs)) == 20
    for context, start, word in qs:
        assert context[start:start + 5] == word and word.islower() and context.count('\n') == 2
        assert not context[start - 1:start].isalpha() and not context[start + 5:start + 6].isalpha()
    assert qs == lab.blanked_words(text[:50000], 5, 20), 'seeded'

def test_infill_accuracy_of_an_oracle_is_100_percent_and_both_kinds_run(text, tok):
    class Oracle(torch.nn.Module):       # a "diffusion model" that sees the answer: logits from x0
        config = mdlm.ModelConfig(vocab_size=66, block_size=32)
        answer = None
        def forward(self, xt, t):
            return torch.where(torch.arange(66) == Oracle.answer[:, :, None], 10.0, -10.0).float()
    split = int(0.9 * len(text))
    context, start, word = lab.blanked_words(text[split:], 3, 1)[0]
    ids = torch.tensor(tok.encode(context))
    a = mdlm.blank_window(start, start + 3, len(ids), 32)
    Oracle.answer = ids[a:a + 32][None]
    oracle = Oracle()
    oracle.register_parameter('p', torch.nn.Parameter(torch.zeros(1)))
    s, g = mdlm.SamplerConfig(), torch.Generator().manual_seed(0)
    assert lab.infill_accuracy(oracle, tok, text[:split], text[split:], s, g, lengths=(3,), n=1) == [(3, 1.0, 1.0)]
    for model in (tiny(), tiny(causal=True)):
        rows = lab.infill_accuracy(model, tok, text[:200000], text[split:], s, g, lengths=(1, 3), n=2)
        assert [r[0] for r in rows] == [1, 3] and all(0 <= r[1] <= r[2] <= 1 for r in rows)

def test_infill_eval_prints_the_table_with_the_best_guess(runs, capsys):
    d, _ = runs
    seen = {}
    real = lab.infill_accuracy
    lab.infill_accuracy = lambda model, tok, tr, va, sampler, g, n: seen.setdefault('s', sampler) and [(1, 0.5, 0.5)]
    try:
        assert lab.main(['--infill-eval', '--out-dir', d, '--device', 'cpu']) == 0
    finally:
        lab.infill_accuracy = real
    assert seen['s'] == mdlm.SamplerConfig(temperature=mdlm.INFILL_TEMPERATURE), 'one fill: the best guess'
    assert '1-letter words: 50% exact' in capsys.readouterr().out

def test_bench_prints_figures(capsys):
    assert lab.main(['--bench', '--iters', '2', '--batch-size', '4', '--num-samples', '2', '--length', '16',
                     '--dtype', 'float32', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'medians of 2 steps' in out and 'optimizer step (muon, Newton-Schulz in float32)' in out
    assert 'tok/s' in out and 'fused sdpa always' in out and 'GPT step' in out and 'the default sampler' in out
    assert all(f'sample ({r}, 64 steps' in out for r in ('ancestral', 'random')) and 'sample (the GPT twin' in out
    assert torch.backends.cuda.flash_sdp_enabled(), 'the kernel choice ends with each step'

def test_every_picture_is_written_by_its_command(runs, tmp_path, capsys):
    d, g = runs
    for name, argv in {'forward': ['--show-noise', 'To be, or not to be'], 'curves': ['--plot', d, g],
                       'levels': ['--noise-levels', '--out-dir', d],
                       'frames': ['--frames', '--out-dir', d, '--rule', 'random', '--semi-ar', '0', '--steps',
                                  '20']}.items():
        path = tmp_path / 'pictures' / f'{name}.png'
        assert lab.main([*argv, '--png', str(path), '--device', 'cpu']) == 0, name
        png_ok(path)
    assert capsys.readouterr().err.count('wrote ') == 4
    assert lab.main(['--plot', d]) == 1 and 'give --png FILE' in capsys.readouterr().err

def test_frames_picture_draws_nine_frames_first_and_last(runs, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(lab, 'text_picture', lambda lines, path, title: drawn.update(lines=lines, title=title))
    assert lab.main(['--frames', '--out-dir', runs[0], '--rule', 'random', '--semi-ar', '0', '--steps', '20',
                     '--png', str(tmp_path / 'f.png'), '--device', 'cpu']) == 0
    steps = [int(line.split('|')[0].split()[1]) for line in drawn['lines']]
    assert steps[0] == 1 and steps[-1] == 20 and len(steps) == 9 and steps == sorted(steps), steps
    assert mdlm.MASK_GLYPH not in drawn['lines'][-1] and 'rule random, 20 steps' in drawn['title']

def test_frames_as_a_gif_animate_every_step(runs, tmp_path):
    path = tmp_path / 'sampling.gif'
    assert lab.main(['--frames', '--out-dir', runs[0], '--rule', 'random', '--semi-ar', '0', '--steps', '5',
                     '--png', str(path), '--device', 'cpu']) == 0
    from PIL import Image
    with Image.open(path) as gif:
        assert gif.format == 'GIF' and gif.n_frames >= 5, gif.n_frames

def test_pictures_without_matplotlib_are_one_line(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)      # import matplotlib -> ImportError
    assert lab.main(['--plot', runs[0], '--png', str(tmp_path / 'x.png')]) == 1
    assert 'need matplotlib' in capsys.readouterr().err and not os.path.exists(tmp_path / 'x.png')

def test_eval_windows_scores_the_same_windows_as_eval_at_the_context(runs, capsys):
    d, g = runs
    assert lab.main(['--eval-windows', '32', '--out-dir', d, '--device', 'cpu']) == 0
    line = capsys.readouterr().out
    model, tok = mdlm.load_model(d)[:2]
    _, val = mdlm.split_data(mdlm.load_text(mdlm.DEFAULT_DATA), tok)
    assert f'{mdlm.estimate_loss(model, val, mdlm.EVAL_BATCHES, 8)[0]:.4f}' in line, line
    assert lab.main(['--eval-windows', '16', '--out-dir', g, '--device', 'cpu']) == 0
    assert 'val nll on windows of 16' in capsys.readouterr().out
    assert lab.main(['--eval-windows', '64', '--out-dir', d, '--device', 'cpu']) == 1


# --- the judge ---------------------------------------------------------------------------------------

def tiny_gpt(seed=0, block_size=32):
    torch.manual_seed(seed)
    return mdlm.MDLM(mdlm.ModelConfig(vocab_size=66, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                                      dropout=0.0, use_time=False, causal=True)).eval()

def test_gpt_scores_long_text_with_a_sliding_window():
    """Past block_size each character is predicted from the start token and the block_size - 1 before it."""
    gpt = tiny_gpt(seed=1, block_size=8)
    ids = torch.randint(65, (2, 20), generator=torch.Generator().manual_seed(2))
    nll = lab.gpt_nll_of_text(gpt, ids)
    assert nll.shape == (2, 20)
    assert torch.allclose(nll[:, :8].mean(1), mdlm.nll_per_seq(gpt, ids[:, :8]),
                          atol=1e-5), 'within the context: the NLL'
    with torch.no_grad():
        for j in (8, 13, 19):
            x = torch.cat([torch.full((2, 1), 65), ids[:, j - 7:j]], 1)
            expect = -gpt(x, None)[:, -1].log_softmax(-1).gather(1, ids[:, j:j + 1])[:, 0]
            assert torch.allclose(nll[:, j], expect, atol=1e-5), j

def test_unigram_entropy():
    assert lab.unigram_entropy_bits(torch.full((50,), 7)) == 0
    assert lab.unigram_entropy_bits(torch.arange(8).repeat(4)) == pytest.approx(3.0)

def test_judge_prefers_real_text_to_shuffled(text, tok):
    """A GPT trained a little already finds real text likelier than the same characters shuffled."""
    data = torch.tensor(tok.encode(text[:200000]))
    gpt = tiny_gpt(block_size=32).train()
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        mdlm.train_step(gpt, [opt], mdlm.gpt_batch(data, 32, 32, 65, g), 3e-3, mdlm.gpt_loss)
    gpt.eval()
    real = mdlm.get_batch(data, 8, 64, g)
    shuffled = real[:, torch.randperm(64, generator=g)]
    assert lab.gpt_nll_of_text(gpt, real).mean() < lab.gpt_nll_of_text(gpt, shuffled).mean() - 0.1

def test_a_judge_must_be_a_gpt_of_the_same_vocabulary(runs, tmp_path, capsys):
    d, g = runs
    data = tmp_path / 'abc.txt'
    data.write_text('abcab cabca bcabc\n' * 400)
    assert mdlm.main(['--train', '--gpt', '--max-iters', '1', '--eval-iters', '1', '--n-layer', '1', '--n-head', '2',
                      '--n-embd', '16', '--block-size', '16', '--batch-size', '4', '--device', 'cpu',
                      '--data', str(data), '--out-dir', str(tmp_path / 'abc')]) == 0
    capsys.readouterr()
    cases = ((str(tmp_path / 'abc'), 'another vocabulary'), (d, 'a judge must be a GPT'), (None, 'give --judge DIR'))
    for judge, needle in cases:
        assert lab.main(['--samples', '--out-dir', d, '--device', 'cpu', *(['--judge', judge] if judge else [])]) == 1
        err = capsys.readouterr().err
        assert 'Traceback' not in err and err.strip().splitlines()[-1].startswith('error:') and needle in err, err

def test_samples_are_mdlm_samples_judged(runs, capsys):
    """--samples writes what `mdlm.py --sample` writes with the same flags and seed, then the judged figures."""
    d, g = runs
    for model in (d, g):
        flags = ['--out-dir', model, '--num-samples', '2', '--length', '40', '--seed', '3', '--device', 'cpu']
        assert mdlm.main(['--sample', *flags]) == 0
        expected = capsys.readouterr().out
        assert lab.main(['--samples', '--judge', g, *flags]) == 0
        out, err = capsys.readouterr()
        assert out == expected and 'samples' in err and 'bits/char' in err and 'real val text' in err, err


@pytest.mark.parametrize('pair, needle', [('t_proposal=cosin', 't_proposal=cosin: one of uniform, cosine'),
                                          ('optimizer=sgd', 'optimizer=sgd: one of muon, adamw'),
                                          ('loss=nelbow', 'loss=nelbow: one of nelbo, naive'),
                                          ('warmup_iters=ten', 'warmup_iters=ten: must be of type int'),
                                          ('nope=1', 'nope: not a setting')])
def test_an_unknown_recipe_key_or_value_is_refused_before_training(pair, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mdlm, 'RECIPE', dict(mdlm.RECIPE))
    monkeypatch.setattr(mdlm, 'main', lambda argv: pytest.fail('trained with a bad recipe'))
    assert lab.main(['--recipe', pair, '--', '--train', '--out-dir', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count('\n') == 1, err

def test_the_pooled_loss_trains_through_the_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mdlm, 'RECIPE', dict(mdlm.RECIPE))
    seen = []
    monkeypatch.setattr(lab, 'pooled_loss', lambda *a: seen.append(1) or mdlm.weighted_loss(*a))
    monkeypatch.setitem(mdlm.LOSSES, 'naive', lab.pooled_loss)
    argv = ['--recipe', 'loss=naive', '--', '--train', '--max-iters', '2', '--eval-interval', '2',
            '--out-dir', str(tmp_path), *TINY]
    assert lab.main(argv) == 0 and len(seen) == 2
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['args']['loss'] == 'naive'
