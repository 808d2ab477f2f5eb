"""
lab.py: the measurements behind the README, kept out of the lesson. It imports mdlm and adds
nothing to it. Run from the project root, after `python mdlm.py --train` and `--train --gpt`:

    python lab/lab.py --samples --judge out-gpt --num-samples 16 --length 256 --seed 0 [--out-dir out-gpt]
    python lab/lab.py --frontier --judge out-gpt --num-samples 16 --length 128 --png pictures/frontier.png
    python lab/lab.py --infill-eval                       # the default model: 1/3/5-letter blanks
    python lab/lab.py --infill-eval --out-dir out-gpt     # the GPT, ranking every training word
    python lab/lab.py --bench --num-samples 16 --length 256
    python lab/lab.py --show-noise "To be, or not to be" --png pictures/forward.png
    python lab/lab.py --plot out out-gpt --png pictures/training.png
    python lab/lab.py --noise-levels --png pictures/noise-levels.png
    python lab/lab.py --frames --seed 0 --png pictures/sampling.gif     (a .gif: every step, animated)
    python lab/lab.py --recipe optimizer=adamw -- --train --max-iters 2000 --out-dir runs/adamw

The ablations (a lever at a time, same seed and budget) are runs of `python mdlm.py --train`, with
its flags or, for a setting of the config cell that has no flag, `--recipe KEY=VALUE ... --`
before them; lab/README.md gives each with its figure and the commit that measured it.
"""

import argparse
import ast
import contextlib
import csv
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project root
import mdlm  # noqa: E402

# The sampler settings --frontier compares: (name, SamplerConfig fields)
PLAIN = dict(semi_ar=0, steps=64)
FRONTIER = [
    ('ancestral, 16 steps', dict(rule='ancestral', semi_ar=0, steps=16)),
    ('ancestral, 64 steps', dict(rule='ancestral', **PLAIN)),
    ('ancestral, 256 steps', dict(rule='ancestral', semi_ar=0, steps=256)),
    ('ancestral, temperature 0.8', dict(rule='ancestral', temperature=0.8, **PLAIN)),
    ('ancestral, top-p 0.9', dict(rule='ancestral', top_p=0.9, **PLAIN)),
    ('ancestral, top-p 0.8', dict(rule='ancestral', top_p=0.8, **PLAIN)),
    ('ancestral, semi-ar 8', dict(rule='ancestral', semi_ar=8, steps=8)),
    ('random, 64 steps', dict(rule='random', **PLAIN)),
    ('confidence, 64 steps', dict(rule='confidence', **PLAIN)),
    ('confidence, semi-ar 8', dict(rule='confidence', semi_ar=8, steps=8)),
    ('confidence, semi-ar 8, 4 steps', dict(rule='confidence', semi_ar=8, steps=4)),
    ('confidence, semi-ar 12, 8 steps', dict(rule='confidence', semi_ar=12, steps=8)),
    ('confidence, semi-ar 16, 8 steps', dict(rule='confidence', semi_ar=16, steps=8)),
    ('confidence, semi-ar 16, 16 steps', dict(rule='confidence', semi_ar=16, steps=16)),
    ('confidence, semi-ar 8, temperature 1.1', dict(rule='confidence', semi_ar=8, steps=8, temperature=1.1)),
]

def counting(model):
    """A list that counts the rows the model runs (a forward hook): the cost of a sampler."""
    rows = [0]
    model.register_forward_hook(lambda module, inputs, output: rows.__setitem__(0, rows[0] + inputs[0].size(0)))
    return rows

def load(args):
    model, tok, ckpt = mdlm.load_model(args.out_dir, mdlm.pick_device(args.device))
    return model, tok, ckpt, next(model.parameters()).device


# --- the judge: generative perplexity ---------------------------------------------------------------
# A GPT checkpoint scores generated text, as MDLM and SEDD report it: bits per character the judge
# finds in each generated character given what stands before it. Text that repeats itself also
# scores well, so the unigram entropy stands beside it, and both figures for real val text.

@torch.no_grad()
def gpt_nll_of_text(model, ids):
    """-log p of every character of ids (B, N) under a GPT, nats, (B, N): each character predicted
    from the start token and up to block_size - 1 characters before it (gpt_generate's windows)."""
    T, start = model.config.block_size, model.config.vocab_size - 1
    B, N = ids.shape
    first = min(N, T)                        # the first T characters: one pass, [start] + ids
    logits = model(mdlm.gpt_input(ids[:, :first], start), None)
    nll = [F.cross_entropy(logits.transpose(1, 2), ids[:, :first], reduction='none')]
    if N > T:                                # character j >= T: [start] + ids[j-T+1 : j], last position
        ctx = ids[:, 1:N - 1].unfold(1, T - 1, 1).reshape(-1, T - 1)    # (B * (N - T), T - 1)
        x = torch.cat([torch.full((len(ctx), 1), start, device=ids.device), ctx], 1)
        last = torch.cat([model(chunk, None)[:, -1] for chunk in x.split(512)])   # (B * (N - T), V)
        nll.append(F.cross_entropy(last, ids[:, T:].reshape(-1), reduction='none').view(B, N - T))
    return torch.cat(nll, 1)

def unigram_entropy_bits(ids):
    """Entropy in bits of the character frequencies of one text: about 4.4 for a line of
    Shakespeare, 0 for one character repeated. A sampler that repeats itself scores low here."""
    p = torch.bincount(ids).float()
    p = p[p > 0] / len(ids)
    return -(p * p.log2()).sum().item()

@torch.no_grad()
def judge_figures(judge, rows):
    """(bits/char of rows (B, L) under the judge, pooled; their unigram entropy, averaged)."""
    entropy = sum(unigram_entropy_bits(r) for r in rows) / len(rows)
    return gpt_nll_of_text(judge, rows).mean().item() / math.log(2), entropy

def real_val_text(args, tok, ckpt, like):
    """As many seeded val windows as `like` has rows, as long as its rows, of the model's own text: the reference."""
    val_data = mdlm.split_data(mdlm.checkpoint_text(ckpt, args.data), tok)[1]
    return mdlm.get_batch(val_data, like.size(0), like.size(1), torch.Generator().manual_seed(args.seed)).to(like.device)

def load_judge(out_dir, tok, device):
    """--judge DIR: the GPT checkpoint that scores samples; it must read the same characters."""
    if out_dir is None:
        raise mdlm.CliError('give --judge DIR: the GPT checkpoint that scores the samples')
    judge, judge_tok, _ = mdlm.load_model(out_dir, device)
    if not judge.config.causal:
        raise mdlm.CliError(f'{out_dir}/ckpt.pt is a diffusion model; a judge must be a GPT '
                            f'(train one with: python mdlm.py --train --gpt)')
    if judge_tok.itos != tok.itos:
        raise mdlm.CliError(f'the judge in {out_dir} was trained on another vocabulary than the model')
    return judge

def run_samples(args):
    """--samples: what `python mdlm.py --sample` writes with the same flags and seed, then its judged
    figures beside those of as many real val texts of the same length (on stderr)."""
    model, tok, ckpt, device = load(args)
    judge = load_judge(args.judge, tok, device)
    B, L, s = args.num_samples, args.length or model.config.block_size, mdlm.sampler_from_args(args)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = mdlm.gpt_generate(model, [], L, B, s.temperature, s.top_p, g) if model.config.causal \
        else mdlm.generate_text(model, [], L, B, lambda x: mdlm.generate(model, x, s, g))
    sys.stdout.write(('\n' + '=' * 40 + '\n').join(tok.decode(row.tolist()) for row in out) + '\n')
    (b, e), (rb, re_) = judge_figures(judge, out), judge_figures(judge, real_val_text(args, tok, ckpt, out))
    print(f'judge {args.judge}: samples {b:.3f} bits/char, unigram entropy {e:.2f} bits | real val text '
          f'{rb:.3f} bits/char, entropy {re_:.2f} bits ({B} x {L} chars each)', file=sys.stderr)
    return 0


# --- the sampler frontier ---------------------------------------------------------------------------

def run_frontier(args):
    """Every FRONTIER setting from the same seed, scored by the judge: bits/char, unigram entropy,
    model calls per character; a table, and a picture with --png."""
    model, tok, ckpt, device = load(args)
    if model.config.causal:
        raise mdlm.CliError(f'{args.out_dir}/ckpt.pt is a GPT: --frontier compares the diffusion sampler\'s settings')
    judge = load_judge(args.judge, tok, device)
    B, L = args.num_samples, args.length or 2 * model.config.block_size
    calls, rows = counting(model), []
    for name, fields in FRONTIER:
        calls[0] = 0
        s = mdlm.SamplerConfig(**fields)
        g = torch.Generator(device=device).manual_seed(args.seed)
        out = mdlm.generate_text(model, [], L, B, lambda x: mdlm.generate(model, x, s, g))
        rows.append((name + (' (default)' if s == mdlm.SamplerConfig() else ''), *judge_figures(judge, out),
                     calls[0] / (B * L)))
    out = mdlm.gpt_generate(judge, [], L, B, generator=torch.Generator(device=device).manual_seed(args.seed))
    rows.append(('the GPT twin (judge) itself', *judge_figures(judge, out), 1.0))
    rows.append(('real val text', *judge_figures(judge, real_val_text(args, tok, ckpt, out)), float('nan')))
    print(f'{B} samples x {L} chars, seed {args.seed}; judge {args.judge}')
    print(f'{"setting":46} {"bits/char":>9} {"entropy":>8} {"calls/char":>10}')
    for name, bits, entropy, per_char in rows:
        print(f'{name:46} {bits:9.3f} {entropy:8.2f} {per_char:10.2f}')
    if args.png:
        frontier_picture(rows, args.png, f'samplers of {args.out_dir}/ckpt.pt, {B} x {L} chars')
    return 0

def frontier_picture(rows, path, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, bits, entropy, _ in rows:
        star = 'default' in name
        ax.scatter(entropy, bits, marker='*' if star else 'o', s=120 if star else 30,
                   color='C1' if 'GPT' in name else 'C2' if 'real' in name else 'C3' if star else 'C0')
    fig.canvas.draw()                     # the limits are final: place each label where no other lies
    boxes = []
    for name, bits, entropy, _ in rows:
        x, y = ax.transData.transform((entropy, bits)) * 72 / fig.dpi          # in points
        w = 3.6 * len(name)                                                     # about, at fontsize 7
        for dx, dy in ((3, 3), (3, -10), (-3 - w, 3), (-3 - w, -10), (3, 12), (3, -19)):
            box = (x + dx, y + dy, x + dx + w, y + dy + 8)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        ax.annotate(name, (entropy, bits), fontsize=7, xytext=(dx, dy), textcoords='offset points')
    gpt_bits, real_entropy = rows[-2][1], rows[-1][2]      # where text reads like the GPT's and like real text
    ax.axhline(1.5 * gpt_bits, color='grey', linestyle='--', linewidth=0.8)
    ax.axvline(real_entropy - 0.25, color='grey', linestyle='--', linewidth=0.8)
    ax.text(0.5, 0.02, 'the goal, right of and below the dashed lines: entropy within 0.25 bits of real text\'s,\n'
            'bits/char within 1.5x of the GPT\'s own samples\'', transform=ax.transAxes, fontsize=8, color='grey',
            ha='center', va='bottom')
    ax.set(xlabel='unigram entropy of a sample (bits): low = repetitive',
           ylabel='bits/char under the GPT judge: low = plausible', title=title)
    ax.grid(alpha=0.3)
    save_picture(fig, path)


# --- the infill metric --------------------------------------------------------------------------------

def blanked_words(text, length, n, seed=mdlm.EVAL_SEED):
    """n seeded infill questions from `text`: a lowercase word of `length` letters in a line,
    given with the two lines before it. Returns (context, start of the word in it, word)."""
    lines = text.split('\n')
    word = re.compile(rf"(?<![A-Za-z'])[a-z]{{{length}}}(?![A-Za-z'])")
    found = [(i, m.start(), m.group()) for i in range(2, len(lines)) for m in word.finditer(lines[i])]
    picks = [found[j] for j in torch.randperm(len(found), generator=torch.Generator().manual_seed(seed))[:n]]
    return [('\n'.join(lines[i - 2:i + 1]), len(lines[i - 2]) + len(lines[i - 1]) + 2 + pos, w)
            for i, pos, w in picks]

@torch.no_grad()
def infill_accuracy(model, tok, train_text, val_text, sampler, generator, lengths=(1, 3, 5), n=100):
    """Fill blanked val words and count exact words and right characters, per length. A diffusion
    model fills each with mdlm.infill. A GPT cannot see past the blank, so it gets a list instead:
    every word of that length in the training text, each put in the blank and scored on the
    window around it (infill's window); it answers the likeliest."""
    T, mask_id = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    rows = []
    for length in lengths:
        candidates = sorted({w for _, _, w in blanked_words(train_text, length, 10 ** 9)})
        exact = right = 0
        for text, start, word in blanked_words(val_text, length, n):
            ids = tok.encode(text[:start]) + [mask_id] * length + tok.encode(text[start + length:])
            if model.config.causal:
                win = mdlm.blank_window(start, start + length, len(ids), T)
                lines = torch.tensor([tok.encode(text[win:start] + c + text[start + length:])[:T] for c in candidates],
                                     device=device)
                nll = torch.cat([mdlm.nll_per_seq(model, chunk) for chunk in lines.split(256)])
                guess = candidates[nll.argmin().item()]
            else:
                out = mdlm.infill(model, ids, 1, lambda x: mdlm.generate(model, x, sampler, generator))
                guess = tok.decode(out[0, start:start + length].tolist())
            exact += guess == word
            right += sum(a == b for a, b in zip(guess, word))
        rows.append((length, exact / n, right / (n * length)))
    return rows

def run_infill_eval(args):
    model, tok, ckpt, device = load(args)
    text = mdlm.checkpoint_text(ckpt, args.data)
    split = int(0.9 * len(text))
    sampler = mdlm.sampler_from_args(argparse.Namespace(**{**vars(args), 'num_samples': 1}), infill=True)   # one fill
    how = ('ranks every training word of the length (the GPT cannot see past the blank)' if model.config.causal
           else f'fills with --infill\'s sampler: {sampler}')
    print(f'infill: {args.questions} blanked val words per length, each given with its line and the two before; {how}')
    g = torch.Generator(device=device).manual_seed(args.seed)
    for length, exact, chars in infill_accuracy(model, tok, text[:split], text[split:], sampler, g, n=args.questions):
        print(f'  {length}-letter words: {exact:.0%} exact, {chars:.0%} of letters right')
    return 0


def run_eval_windows(args):
    """--eval's val figure on windows of --eval-windows characters, whatever the model's context:
    models of different contexts compared on the same windows (a window within the context)."""
    model, tok, ckpt, device = load(args)
    if args.eval_windows > model.config.block_size:
        raise mdlm.CliError(f'--eval-windows {args.eval_windows} is longer than the context, {model.config.block_size}')
    _, val_data = mdlm.split_data(mdlm.checkpoint_text(ckpt, args.data), tok)
    model.config.block_size = args.eval_windows          # estimate_loss draws windows of block_size
    per_seq = mdlm.nll_per_seq if model.config.causal else None
    mean, se = mdlm.estimate_loss(model, val_data.to(device), mdlm.EVAL_BATCHES, ckpt['args']['batch_size'], per_seq=per_seq)
    print(f'val {"nll" if model.config.causal else "nelbo"} on windows of {args.eval_windows}: {mean:.4f} +- {se:.4f} '
          f'nats/char ({mdlm.EVAL_BATCHES} batches of {ckpt["args"]["batch_size"]})')
    return 0


# --- speed --------------------------------------------------------------------------------------------

def median_times(variants, n, sync):
    """Each variant's median over n calls, the variants taking turns call by call, as a run's steps
    follow each other: what a run pays a step, not its best moment. One untimed call each first."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(n):
        for name, fn in variants.items():
            sync()
            tic = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}

def run_bench(args):
    """Training step speed as a run sees it: real steps on the text (a training_batch with the
    recipe's proposal, then train_step at the preset's lr, under the run's precision), the median
    of --iters of each, for the diffusion model as mdlm trains it (the attention formula on a CPU
    in bf16, PyTorch's fused kernel elsewhere), with the fused kernel always, and for the GPT twin;
    the optimizer step alone; then sampling speed per rule and for the GPT's own loop."""
    device = mdlm.pick_device(args.device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    p = mdlm.PRESETS[args.preset]
    shape = dict(n_layer=p['n_layer'], n_head=p['n_head'], n_embd=p['n_embd'], block_size=p['block_size'])
    B, T = args.batch_size or p['batch_size'], p['block_size']
    autocast = mdlm.autocast_for(device, args.dtype)
    bf16 = autocast is not contextlib.nullcontext
    text = mdlm.load_text(args.data or mdlm.DEFAULT_DATA)
    tok = mdlm.Tokenizer(sorted(set(text)))
    data = mdlm.split_data(text, tok)[0].to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)   # sampling's
    batches = torch.Generator().manual_seed(args.seed)          # training's batches and noise: on the CPU, as mdlm's
    models = {}
    for kind, extra in (('diffusion', dict(use_time=p['use_time'])), ('gpt', dict(use_time=False, causal=True))):
        torch.manual_seed(args.seed)
        m = mdlm.MDLM(mdlm.ModelConfig(vocab_size=tok.vocab_size, dropout=p['dropout'], **shape, **extra)).to(device)
        models[kind] = (m, mdlm.make_optimizers(m, p['lr'], mdlm.RECIPE['weight_decay'], args.optimizer,
                                                torch.bfloat16 if bf16 else torch.float32,
                                                fused=device.startswith('cuda')))
    print(f'bench: device {device} | preset {args.preset} | {models["diffusion"][0].num_params() / 1e6:.2f}M parameters | '
          f'batch {B} x block {T} | {"bfloat16 autocast" if bf16 else "float32"} | threads {torch.get_num_threads()} | '
          f'medians of {args.iters} steps')
    # mdlm's bf16 autocast on a CPU also picks PyTorch's math attention kernel; plain autocast lets it fuse
    fused = (lambda: torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16)) if bf16 else autocast
    def step(kind, autocast):
        model, opts = models[kind]
        loss_fn = mdlm.gpt_loss if kind == 'gpt' else mdlm.LOSSES[mdlm.RECIPE['loss']]
        if kind == 'gpt':
            batch = mdlm.gpt_batch(data, B, T, tok.mask_id, batches)
        else:
            batch = mdlm.weighted_batch(data, B, T, tok.mask_id, batches, mdlm.PROPOSALS[mdlm.RECIPE['t_proposal']])
        mdlm.train_step(model, opts, batch, p['lr'], mdlm.in_precision(loss_fn, autocast))
    variants = {'diffusion, as mdlm trains': lambda: step('diffusion', autocast),
                'diffusion, fused sdpa always': lambda: step('diffusion', fused),
                'the GPT twin, as mdlm trains': lambda: step('gpt', autocast)}
    median = median_times(variants, args.iters, sync)
    for name, dt in median.items():
        print(f'train ({name}): {dt * 1000:.1f} ms/step, {B * T / dt:,.0f} tok/s')
    mine, fused, gpt = median.values()
    print(f'as mdlm trains / fused always: {mine / fused:.2f}x the time; diffusion step / GPT step: {mine / gpt:.2f}x')
    model, opts = models['diffusion']             # the optimizer's step alone, on the gradients of one batch
    mdlm.batch_loss(model, *mdlm.training_batch(data, B, T, tok.mask_id, batches)).backward()
    opt_step = median_times({'opt': lambda: [opt.step() for opt in opts]}, args.iters, sync)['opt']
    ns = f', Newton-Schulz in {"bfloat16" if bf16 else "float32"}' if args.optimizer == 'muon' else ''
    print(f'optimizer step ({args.optimizer}{ns}): {opt_step * 1000:.1f} ms')
    model.zero_grad(set_to_none=True)
    L, N = args.length or T, args.num_samples
    model, gpt = models['diffusion'][0].eval(), models['gpt'][0].eval()
    calls = counting(model)
    for rule in ('confidence', 'ancestral', 'random'):
        for s in ([mdlm.SamplerConfig()] if rule == 'confidence' else []) + [mdlm.SamplerConfig(rule=rule, **PLAIN)]:
            calls[0] = 0
            sync()
            tic = time.time()
            mdlm.generate_text(model, [], L, N, lambda x: mdlm.generate(model, x, s, g))
            sync()
            dt = time.time() - tic
            what = 'the default sampler' if s == mdlm.SamplerConfig() else f'{rule}, {s.steps} steps, no blocks'
            print(f'sample ({what}): {N} x {L} chars: {N * L / dt:,.0f} chars/s, {calls[0] / (N * L):.2f} model calls per char')
    sync()
    tic = time.time()
    mdlm.gpt_generate(gpt, [], L, N, generator=g)
    sync()
    print(f'sample (the GPT twin, one pass a character): {N} x {L} chars: {N * L / (time.time() - tic):,.0f} chars/s, '
          f'1.00 model calls per char')
    return 0


# --- pictures -------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, drawing into files (no display needed), or one line of error."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise mdlm.CliError('the pictures need matplotlib: pip install -r requirements.txt')
    return plt

def save_picture(fig, path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    pyplot().close(fig)
    print(f'wrote {path}', file=sys.stderr)

def text_picture(lines, path, title):
    """Lines of text in a monospace font, one under the other ([MASK] drawn as mdlm.MASK_GLYPH)."""
    plt = pyplot()
    fig = plt.figure(figsize=(0.085 * max(map(len, lines)) + 0.4, 0.25 * len(lines) + 0.5))
    for i, line in enumerate(lines):
        fig.text(0.02, 1 - (i + 0.8) / (len(lines) + 0.8), line, family='DejaVu Sans Mono', fontsize=10, va='top')
    fig.suptitle(title, x=0.02, ha='left', fontsize=10)
    save_picture(fig, path)

def text_animation(lines, path, title, fps=6):
    """Each line a frame, in order, the last held for two seconds: an animated GIF (Pillow's writer)."""
    plt = pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter
    fig = plt.figure(figsize=(0.085 * max(map(len, lines)) + 0.4, 0.8))
    fig.suptitle(title, x=0.02, ha='left', fontsize=10)
    shown = fig.text(0.02, 0.35, '', family='DejaVu Sans Mono', fontsize=10, va='center')
    frame = lambda i: [shown.set_text(lines[min(i, len(lines) - 1)])]
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    FuncAnimation(fig, frame, frames=len(lines) + 2 * fps).save(path, writer=PillowWriter(fps=fps), dpi=100)
    plt.close(fig)
    print(f'wrote {path}', file=sys.stderr)

def show_noise(text, tok, seed=0):
    """One line at t = 0, 0.25, 0.5, 0.75, 1, with the same random numbers, so the masks only grow."""
    x0, lines = torch.tensor([tok.encode(text)]), []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        xt, _ = mdlm.forward_mask(x0, torch.tensor([t]), tok.mask_id, torch.Generator().manual_seed(seed))
        lines.append(f't={t:.2f}  {tok.decode(xt[0].tolist())}')
    return '\n'.join(lines)

def run_show_noise(args):
    tok = mdlm.Tokenizer(sorted(set(mdlm.load_text(args.data or mdlm.DEFAULT_DATA))))
    text_picture(show_noise(args.show_noise, tok, args.seed).split('\n'), args.png,
                 'the forward process: round(tL) of the L characters masked, a random set that only grows with t')
    return 0

def read_log(out_dir):
    """<out_dir>/log.csv as (step, train loss, val loss) rows."""
    path = os.path.join(out_dir, 'log.csv')
    try:
        with open(path, newline='') as f:
            rows = [(int(r['step']), float(r['train_loss']), float(r['val_loss'])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError, TypeError):
        raise mdlm.CliError(f'no readable training log at {path}; train with --out-dir {out_dir} first')
    if not rows or not all(math.isfinite(v) for r in rows for v in r[1:]):
        raise mdlm.CliError(f'{path} holds no evaluations, or a value that is not a finite number')
    return rows

def run_plot(args):
    """The training curves of each run in one picture: val solid, train dotted."""
    names = args.labels or args.plot
    if len(names) != len(args.plot):
        raise mdlm.CliError(f'--labels names {len(names)} runs, --plot draws {len(args.plot)}')
    logs = {name: read_log(d) for name, d in zip(names, args.plot)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rows) in enumerate(logs.items()):
        steps, train, val = zip(*rows)
        ax.plot(steps, val, marker='.', color=f'C{i}', label=f'{name}: val')
        ax.plot(steps, train, linestyle=':', color=f'C{i}', label=f'{name}: train')
    ax.set(xlabel='step', ylabel='nats/char (diffusion: NELBO bound; GPT: exact NLL)', title='training curves')
    ax.grid(alpha=0.3)
    ax.legend()
    save_picture(fig, args.png)
    return 0

@torch.no_grad()
def ce_per_noise_level(model, data, ts, n_batches, batch_size, seed=mdlm.EVAL_SEED):
    """Masked CE (nats per masked char) at fixed t, exactly tL masks as in training, every t on the same
    windows: how hard each noise level is. Its mean over t = k/L, k = 1..L, is the NELBO (1/k cancels k)."""
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)      # on the CPU, as mdlm's estimate_loss
    rows = []
    for t in ts:
        windows = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        for _ in range(n_batches):
            x0 = mdlm.get_batch(data, batch_size, model.config.block_size, windows)
            tt = torch.full((batch_size,), round(t * x0.size(1)) / x0.size(1), device=data.device)
            xt, mask = mdlm.forward_mask(x0, tt, model.config.vocab_size - 1, g)
            total += mdlm.masked_ce(model(xt, tt), x0, mask).sum().item()
            count += mask.sum().item()
        rows.append(total / max(count, 1))
    return rows

def run_noise_levels(args):
    """The masked cross-entropy per noise level on val, drawn: 25 batches, the same windows at every t."""
    model, tok, ckpt, device = load(args)
    if model.config.causal:
        raise mdlm.CliError('a GPT has no noise level: --noise-levels is for a diffusion model')
    _, val_data = mdlm.split_data(mdlm.checkpoint_text(ckpt, args.data), tok)
    ts = [round(0.1 * i, 1) for i in range(1, 11)]
    ces = ce_per_noise_level(model, val_data.to(device), ts, mdlm.EVAL_BATCHES // 4, ckpt['args']['batch_size'])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ts, ces, marker='o')
    ax.set(xlabel='t: the fraction of characters masked', ylabel='nats per masked character', ylim=(0, None),
           title=f'val cross-entropy per noise level, {args.out_dir}/ckpt.pt')
    ax.grid(alpha=0.3)
    save_picture(fig, args.png)
    return 0

def run_frames(args):
    """Nine frames of one sample coming out of noise, evenly spaced, the first and the last among them;
    with --png FILE.gif, every frame, animated."""
    model, tok, _, device = load(args)
    s = mdlm.sampler_from_args(args)
    frames = []
    g = torch.Generator(device=device).manual_seed(args.seed)
    on_step = lambda x: frames.append(f'step {len(frames) + 1:4d} | {tok.decode(x[0].tolist())}'.replace('\n', '\u21b5'))
    mdlm.generate_text(model, [], args.length or model.config.block_size, 1, lambda x: mdlm.generate(model, x, s, g, on_step))
    how = f'rule {s.rule}, {s.steps} steps' + (f' per block of {s.semi_ar}' if s.semi_ar else '')
    if args.png.endswith('.gif'):        # an animation: every step
        text_animation(frames, args.png, f'text out of noise, step by step: {how}')
        return 0
    picks = sorted({round(i * (len(frames) - 1) / 8) for i in range(9)})
    text_picture([frames[i] for i in picks], args.png, f'text out of noise: {how} ({len(frames)} frames)')
    return 0


# --- the command line ---------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description='The lab: the measurements behind the README (imports mdlm). '
                                'Also: --recipe KEY=VALUE ... -- MDLM_FLAGS trains with settings that have no flag.',
                                allow_abbrev=False)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument('--samples', action='store_true', help='mdlm.py --sample\'s samples, scored with --judge DIR (a GPT)')
    mode.add_argument('--frontier', action='store_true', help='score sampler settings with --judge DIR (a GPT)')
    mode.add_argument('--infill-eval', action='store_true', help='fill 100 blanked val words of 1, 3 and 5 letters')
    mode.add_argument('--bench', action='store_true', help='training step and sampling speed')
    mode.add_argument('--eval-windows', type=int, metavar='N', help='the val figure of --eval on windows of N chars')
    mode.add_argument('--show-noise', metavar='TEXT', help='picture: the forward process on TEXT')
    mode.add_argument('--plot', nargs='+', metavar='DIR', help='picture: the training curves of each DIR/log.csv')
    p.add_argument('--labels', nargs='+', metavar='NAME', help='--plot: a legend name for each DIR')
    mode.add_argument('--noise-levels', action='store_true', help='picture: val cross-entropy per noise level')
    mode.add_argument('--frames', action='store_true', help='picture: nine frames of a sample coming out of noise')
    p.add_argument('--questions', type=int, default=100, help='--infill-eval: words per length')
    p.add_argument('--png', metavar='FILE', help='the picture\'s file (the picture modes need it; --frontier may)')
    p.add_argument('--out-dir', default='out', help='the model (default out/)')
    p.add_argument('--judge', metavar='DIR', help='--samples, --frontier: the GPT checkpoint that scores the samples')
    p.add_argument('--num-samples', type=int, default=16)
    p.add_argument('--length', type=int, help='characters per sample (default: block_size; --frontier: twice it)')
    p.add_argument('--rule', choices=list(mdlm.RULES))
    p.add_argument('--steps', type=mdlm.POSITIVE)
    p.add_argument('--semi-ar', type=mdlm.NONNEG)
    p.add_argument('--temperature', type=float)
    p.add_argument('--top-p', type=float)
    p.add_argument('--preset', choices=list(mdlm.PRESETS), default='tiny', help='--bench: the shape timed')
    p.add_argument('--batch-size', type=int, help='--bench (default: the preset\'s)')
    p.add_argument('--iters', type=int, default=30, help='--bench: timed steps of each variant')
    p.add_argument('--dtype', choices=['auto', 'float32', 'bfloat16'], default='auto')
    p.add_argument('--optimizer', choices=['adamw', 'muon'], default=mdlm.RECIPE['optimizer'], help='--bench')
    p.add_argument('--device')
    p.add_argument('--data', help='the text (default: the checkpoint\'s; --bench, --show-noise: input.txt)')
    p.add_argument('--seed', type=int, default=mdlm.SEED)
    return p

MODES = {'samples': run_samples, 'frontier': run_frontier, 'infill_eval': run_infill_eval, 'bench': run_bench, 'eval_windows': run_eval_windows,
         'show_noise': run_show_noise,
         'plot': run_plot, 'noise_levels': run_noise_levels, 'frames': run_frames}
PICTURES = ('show_noise', 'plot', 'noise_levels', 'frames')

def pooled_loss(model, x0, xt, mask, t, weight):
    """mdlm's intuitive loss (section 5) on a weighted batch, its weights unused: --recipe loss=naive."""
    return mdlm.naive_loss(model(xt, t), x0, mask)

mdlm.LOSSES['naive'] = pooled_loss
RECIPE_CHOICES = {'t_proposal': mdlm.PROPOSALS, 'optimizer': ('muon', 'adamw'), 'loss': mdlm.LOSSES}

def recipe_error(key, text, value):
    """Why KEY=VALUE is no setting of the config cell, or None when it is one."""
    presets = list(mdlm.PRESETS.values())
    if key not in mdlm.RECIPE and not all(key in p for p in presets):
        return f'--recipe {key}: not a setting of RECIPE or PRESETS'
    if key in RECIPE_CHOICES:
        if value not in RECIPE_CHOICES[key]:
            return f'--recipe {key}={text}: one of {", ".join(RECIPE_CHOICES[key])}'
        return None
    default = mdlm.RECIPE[key] if key in mdlm.RECIPE else presets[0][key]
    if type(value) is not type(default) and not (type(default) is float and type(value) is int):
        return f'--recipe {key}={text}: must be of type {type(default).__name__}, as its default {default!r} is'
    return None

def train_with(argv):
    """--recipe KEY=VALUE ... -- FLAGS: mdlm.main(FLAGS), or a lab mode's (--bench ...), with settings of
    the config cell that have no flag changed (in RECIPE, or in every preset); a checkpoint records them."""
    split = argv.index('--') if '--' in argv else len(argv)
    for pair in argv[1:split]:
        key, _, text = pair.partition('=')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        error = recipe_error(key, text, value)
        if error:
            print(f'error: {error}', file=sys.stderr)
            return 1
        if key in mdlm.RECIPE:
            mdlm.RECIPE[key] = value
        else:
            for p in mdlm.PRESETS.values():
                p[key] = value
    rest = argv[split + 1:]
    return (main if rest[:1] and rest[0].lstrip('-').replace('-', '_') in MODES else mdlm.main)(rest)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--recipe']:
        return train_with(argv)
    args = build_parser().parse_args(argv)
    args.explicit = {k for k, v in vars(args).items() if v is not None}   # mdlm refuses a GPT diffusion flags
    mode = next(name for name in MODES if getattr(args, name) not in (None, False))
    try:
        if mode in PICTURES and not args.png:
            raise mdlm.CliError(f'--{mode.replace("_", "-")} draws a picture: give --png FILE')
        if args.png:
            pyplot()                      # before the work, not after it
        return MODES[mode](args)
    except mdlm.CliError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1

if __name__ == '__main__':
    sys.exit(main())
