"""
mdlm.py: a Masked Diffusion Language Model, from scratch, in one file.

A GPT writes text left to right, one character per forward pass. A masked diffusion LM starts
from a line made only of [MASK] and, over a few dozen passes, replaces masks with characters
anywhere in the line, each pass seeing the whole line in both directions. Training is BERT's
masked-token prediction with one change: the fraction of masked tokens is drawn fresh for every
sequence, from 0 to 1, and the losses are weighted so that their sum is an upper bound on the
negative log-likelihood (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025).

The file has two parts. First the lesson, to read top to bottom: 1 config, 2 data, 3 the
forward (masking) process, 4 the model (and the GPT twin, the same network made causal: the
yardstick), 5 the loss, 6 one training step, 7 sampling, 8 completion and infilling,
9 evaluation. It ends at a marked line; a reader who stops there has read a whole, working MDLM,
and nothing above the line uses anything below it. Below it is the harness: device and precision,
checkpoints, resume, DDP, the logged training run, the command line's modes and main().

Every section starts with a `# %%` line, so the file also opens as a notebook (VS Code, or
Jupyter with Jupytext): run its cells in order and the lines under `if NOTEBOOK:` load the data,
train a tiny model for DEMO_ITERS steps, and sample, complete, fill and score with it. Imported or
run as a script, those lines do nothing.

    pip install -r requirements.txt
    python mdlm.py --train                    # CPU: the 'tiny' preset, under 450 s on 2 cores
    python mdlm.py --train --gpt              # its GPT twin, same shape and steps, into out-gpt/
    python mdlm.py --sample --show            # watch text come out of pure [MASK] noise
    python mdlm.py --sample --judge out-gpt   # ... and let the GPT say how plausible it is
    python mdlm.py --complete "ROMEO:"        # prompt completion
    python mdlm.py --infill "To [___] or not to [___]"
    python mdlm.py --eval                     # the likelihood bound, in bits per character
    python mdlm.py --eval --out-dir out-gpt   # the GPT's exact likelihood on the same windows
    python mdlm.py --train --preset base      # the full-size model (a GPU: 11.9M params)
    torchrun --standalone --nproc_per_node=8 mdlm.py --train    # several GPUs (batch is per GPU)
"""

import argparse
import contextlib
import csv
import glob
import hashlib
import math
import os
import re
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# %% 1. Config -------------------------------------------------------------------------------------
# The model's shape lives in a dataclass; each preset adds training defaults. Every default a
# user would tune is in this cell: the shape, the presets, the training recipe, the sampler, the seed.

@dataclass
class ModelConfig:
    vocab_size: int = 66     # 65 characters of Tiny Shakespeare + [MASK] (always the last id)
    block_size: int = 256    # the longest sequence the model reads at once
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    use_time: bool = True    # condition on the noise level t through adaLN (it is optional: see the model)
    rope: bool = True        # rotary position embeddings (False: learned absolute positions)
    causal: bool = False     # True: the GPT twin (attends only to the left; see "the GPT twin" below)

TINY_BF16_ITERS, TINY_FP32_ITERS = 5400, 2700   # steps that fit 450 s on a 2-core CPU with / without native bf16
# 'base' is the full-size model, shaped like nanoGPT's char-level Shakespeare GPT (6 x 384, context
# 256, dropout 0.2): 11.87M parameters with time conditioning, 10.65M without, both in the
# 10-20M range of a small char-level GPT. 'tiny' (0.80M, no time conditioning) is sized so that `python mdlm.py
# --train` finishes in under 450 s on a 2-core laptop CPU (352 s measured with native bf16, see README).
PRESETS = {
    'base': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, use_time=True,
                 batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                 eval_interval=250, eval_iters=50, log_interval=10),
    # tiny's max_iters: (with native bf16, in float32); the harness picks by the machine
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, use_time=False,
                 batch_size=32, max_iters=(TINY_BF16_ITERS, TINY_FP32_ITERS), lr=2e-3, min_lr=1e-4,
                 warmup_iters=100, eval_interval=500, eval_iters=20, log_interval=100),
}
# what every preset shares; a flag given on the command line wins over both. The terms are
# explained where they are used: t_proposal, complementary and loss in section 5, schedule in 6.
DEFAULTS = dict(causal=False, rope=True, weight_decay=0.1, grad_accum=1, schedule='wsd', t_proposal='cosine',
                complementary=False, loss='nelbo')
EPS = 1e-3          # training draws t from [EPS, 1]: t = 0 would mask nothing and weigh 1/t = inf
EVAL_SEED = 1234    # every evaluation (training log, --eval) scores the same windows with the same masks
EVAL_BATCHES = 100  # --eval averages 100 seeded batches; the training log, the first eval_iters of them
MASK_GLYPH = '■'    # how a [MASK] is drawn on screen
# The sampler when no flag chooses one: confidence, in semi-autoregressive blocks of 8 characters
# with 8 steps each (one character a step). It read best on the README's frontier, at the GPT's
# cost of one model call per character.
DEFAULT_SAMPLER = dict(rule='confidence', steps=8, semi_ar=8)
# --infill asked for one fill gives the model's best guess: the same sampler at temperature 0 (it
# fills more blanked words exactly than temperature 1: README). Several fills are drawn at 1.
INFILL_TEMPERATURE = 0.0
# ... and each sampler setting when a flag leaves it out: the keyword defaults of generate and
# infill (generate has no default for steps). The rules are explained in section 7.
SAMPLER_FALLBACKS = dict(steps=64, temperature=1.0, top_p=1.0, choice_temperature=0.0, threshold=0.9,
                        remask=0.0, best_of=1)
SEED = 1337         # training's batches and noise, and sampling, unless --seed says otherwise
DATA_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
DATA_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
HERE = os.path.dirname(os.path.abspath(__file__)) if '__file__' in globals() else os.getcwd()  # a notebook has no __file__
DEFAULT_DATA = os.path.join(HERE, 'input.txt')
# Opened as a notebook, the `if NOTEBOOK:` demos run as their cells do; imported or run as a
# script, never. DEMO_ITERS training steps of the tiny preset take one to two minutes on a laptop CPU.
NOTEBOOK = __name__ == '__main__' and 'ipykernel' in sys.modules
DEMO_ITERS = 1000

# %% 2. Data ---------------------------------------------------------------------------------------
# Tiny Shakespeare, a character tokenizer, and one extra token, [MASK].
# A GPT's target is its input shifted by one. Here the target is the clean text itself: the
# input is the same text with some characters hidden, and the model must say what was there.

class Tokenizer:
    """Characters <-> ids. The vocabulary is the sorted set of the training text's characters,
    and [MASK] gets the last id, V - 1. It is stored in every checkpoint, so a trained model
    never needs the text again."""
    def __init__(self, chars):
        self.itos = list(chars)                     # id -> char; [MASK] is not in here
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.mask_id = len(self.itos)
        self.vocab_size = len(self.itos) + 1        # + [MASK]

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, s):
        unknown = sorted(set(c for c in s if c not in self.stoi))
        if unknown:   # a silent fallback to some id would corrupt the input; refuse instead
            raise CliError(f'characters not in the vocabulary: {" ".join(repr(c) for c in unknown)}')
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return ''.join(MASK_GLYPH if i == self.mask_id else self.itos[i] for i in ids)

def split_data(text, tok, block_size):
    """First 90% for training, last 10% held out for the likelihood, as nanoGPT does."""
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]
    if len(val_data) < block_size + 1:
        raise CliError(f'the data has {len(data)} characters: too few for block_size {block_size} '
                       f'(each split needs at least {block_size + 1})')
    return train_data, val_data

def get_batch(data, batch_size, block_size, generator):
    """(B, T) windows of clean text, x0, at random offsets."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator, device=data.device)
    return data[ix[:, None] + torch.arange(block_size, device=data.device)]   # (B, T)

# Bad input (a character outside the vocabulary, a missing file, a text with no blank) raises
# CliError; the command line prints its message as one line, never a traceback.
class CliError(Exception):
    """A mistake of the user's or of the environment, said in one line."""

def download_data(path, url=DATA_URL, sha256=DATA_SHA256, opener=urllib.request.urlopen):
    """Fetch Tiny Shakespeare, check its sha256, and write it atomically (never a partial file)."""
    try:
        with opener(url, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f'could not download {url} ({e}); put Tiny Shakespeare at {path} '
                       f'or pass --data FILE')
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise CliError(f'the download from {url} has the wrong sha256; nothing written to {path}')
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.input-')
    with os.fdopen(fd, 'wb') as f:
        f.write(raw)
    os.replace(tmp, path)

def load_text(path, allow_download=False):
    if not os.path.exists(path):
        if not allow_download:
            raise CliError(f'no data file at {path}')
        print(f'downloading Tiny Shakespeare to {path}', file=sys.stderr)
        download_data(path)
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError:
        raise CliError(f'{path} is not UTF-8 text')
    except OSError as e:
        raise CliError(f'cannot read {path}: {e.strerror}')
    if not text:
        raise CliError(f'{path} is empty')
    return text

if NOTEBOOK:   # demo: the text, its vocabulary, the two splits
    text = load_text(DEFAULT_DATA, allow_download=True)
    tok = Tokenizer.from_text(text)
    train_data, val_data = split_data(text, tok, PRESETS['tiny']['block_size'])
    print(f'{len(text):,} characters, {tok.vocab_size} tokens (65 characters + [MASK]), '
          f'{len(train_data):,} for training, {len(val_data):,} held out')
    print(repr(tok.decode(train_data[:64].tolist())))

# %% 3. The forward process ------------------------------------------------------------------------
# How text is destroyed.
# At time t in [0, 1] every character is replaced by [MASK] independently with probability t
# (the linear schedule: alpha_t = 1 - t is the chance a character is still clean). t = 0 is the
# text, t = 1 is pure noise: a row of masks. [MASK] absorbs: a masked character stays masked as
# t grows. That is the whole corruption process, and why the reverse process can be so simple.

def forward_mask(x0, t, mask_id, generator=None):
    """x0: (B, T) clean ids; t: (B,) mask probabilities. Returns xt (B, T) and the mask (B, T)."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    mask = u < t[:, None]
    return x0.masked_fill(mask, mask_id), mask

def show_noise(text, tok, seed=0):
    """The forward process pictured: one line at t = 0, 0.25, 0.5, 0.75, 1. With a quarter of its
    characters gone a line is still easy to read; at half, a reader can still guess most words."""
    x0 = torch.tensor([tok.encode(text)])
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed))   # one draw for every t:
    lines = []                                    # a character masked at t stays masked at every later t
    for t in [0.0, 0.25, 0.5, 0.75, 1.0]:
        xt = x0.masked_fill(u < t, tok.mask_id)   # forward_mask's rule, u < t
        lines.append(f't={t:.2f}  {tok.decode(xt[0].tolist())}')
    return '\n'.join(lines)

if NOTEBOOK:   # demo: one line of the play, destroyed a little more at each t
    print(show_noise('First Citizen: Before we proceed any further, hear me speak.', tok))

# %% 4. The model ----------------------------------------------------------------------------------
# A bidirectional transformer that reads xt (and t) and predicts x0 everywhere.
# It is a GPT block for block, with three changes:
#   1) no causal mask: every position attends to every other, both directions;
#   2) the noise level t enters each block through adaLN (a shift and scale of each LayerNorm);
#   3) the output never predicts [MASK] (the "SUBS" parameterisation of MDLM).
# Positions use rotary embeddings (RoPE, as MDLM's DiT does): attention scores then depend on the
# distance between two characters, so "the character just left of me" is one learned pattern,
# not one per position. At a 3000-step CPU budget it was worth 0.23 nats/char over learned
# absolute positions (--no-rope; see README).

# The GPT twin, the yardstick, is this same network with change 1 undone (ModelConfig.causal:
# each position sees itself and what is left of it) and no time input: it predicts the next
# character. Everything else, shape and training budget included, is shared.

def rope_tables(block_size, head_dim, base=10000.0):
    """cos and sin of position * frequency, (T, head_dim / 2): one rotation angle per pair."""
    freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(block_size).float(), freqs)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate each pair of channels (j, j + hs/2) of x (B, nh, T, hs) by its position's angle (the
    half-split layout of GPT-NeoX and LLaMA; the RoFormer paper pairs neighbours: the same idea)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

def manual_attention(q, k, v, causal=False):
    """What F.scaled_dot_product_attention computes (without dropout), spelled out:
    softmax(q k^T / sqrt(hs)) v. A GPT fills the upper triangle of `att` with -inf, so position i
    sees only positions <= i; a diffusion LM does not, and that is the only difference.
    On a CPU this plain formula is as fast as the fused kernel in float32 and faster under
    bfloat16 autocast, so training on a CPU uses it (MDLM.set_fused_attention)."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))   # (B, nh, T, T)
    if causal:
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    return att.softmax(dim=-1) @ v                              # (B, nh, T, hs)

class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.causal = config.causal
        self.fused = True    # False: the manual formula above (no dropout: only when dropout is 0)

    def forward(self, x, rope):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:                              # q, k, v: (B, nh, T, hs)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.fused:   # flash / memory-efficient kernels where the device has them
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=self.causal)
        else:
            y = manual_attention(q, k, v, self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

TIME_DIM = 128   # width of the time embedding that feeds every block's adaLN

class Block(nn.Module):
    """Pre-LN transformer block. With time conditioning, each LayerNorm's output is shifted and
    scaled by amounts computed from t: h = LN(x) * (1 + scale(t)) + shift(t)  (adaLN).
    The projection that makes shift and scale starts at zero (the "Zero" of DiT's adaLN-Zero; DiT
    and MDLM also gate each residual branch, which we leave out), so at step 0 the model is exactly
    the plain transformer and ignores t; it learns to use t only where that lowers the loss."""
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(C)
        # GPT-2's tanh GELU: on a laptop CPU the exact (erf) GELU's backward alone took 15 ms per call
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(approximate='tanh'),
                                 nn.Linear(4 * C, C, bias=False))
        self.drop = nn.Dropout(config.dropout)
        self.ada = nn.Linear(TIME_DIM, 4 * C) if config.use_time else None

    def forward(self, x, cond, rope):
        h1 = self.ln1(x)                                                   # (B, T, C)
        if self.ada is not None:               # cond: (B, TIME_DIM) -> 4 x (B, 1, C)
            shift1, scale1, shift2, scale2 = self.ada(cond)[:, None, :].chunk(4, dim=-1)
            h1 = h1 * (1 + scale1) + shift1
        x = x + self.drop(self.attn(h1, rope))
        h2 = self.ln2(x)
        if self.ada is not None:
            h2 = h2 * (1 + scale2) + shift2
        return x + self.drop(self.mlp(h2))

class MDLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = None if config.rope else nn.Embedding(config.block_size, C)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU(),
                                      nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU()) if config.use_time else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight    # weight tying: reading and writing a char share a vector
        if config.rope:
            cos, sin = rope_tables(config.block_size, C // config.n_head)
            self.register_buffer('rope_cos', cos, persistent=False)   # not saved: derived
            self.register_buffer('rope_sin', sin, persistent=False)
        # init as GPT-2: N(0, 0.02), residual projections scaled down by depth; adaLN at zero
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(('proj.weight', 'mlp.2.weight')) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith('.bias'):
                nn.init.zeros_(p)
        for block in self.blocks:
            if block.ada is not None:
                nn.init.zeros_(block.ada.weight)
        assert not (config.causal and config.use_time), 'the GPT twin has no time input: use_time=False'

    def time_embedding(self, t):
        """Sinusoids of t (B,) at geometric frequencies, then an MLP: (B, TIME_DIM)."""
        half = TIME_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]   # x1000: t is in [0, 1]
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def forward(self, xt, t):
        """xt: (B, T) ids with [MASK]s; t: (B,) noise levels. Returns logits (B, T, V)."""
        B, T = xt.shape
        x = self.tok_emb(xt)                                                       # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=xt.device))
        x = self.drop(x)
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.rope else None
        cond = self.time_embedding(t) if self.time_mlp is not None else None      # (B, TIME_DIM)
        for block in self.blocks:
            x = block(x, cond, rope)
        logits = self.head(self.ln_f(x))                                           # (B, T, V)
        # SUBS: the clean text never contains [MASK], so the model may not predict it. With
        # [MASK] out of the softmax, an untrained model's loss is log(V - 1) = log 65, not log 66.
        return logits.float().index_fill(-1, torch.tensor([self.config.vocab_size - 1], device=xt.device),
                                         float('-inf'))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())   # tied weights are counted once

    def set_fused_attention(self, fused):
        """True: PyTorch's fused kernel; False: manual_attention (faster on a CPU, without dropout)."""
        for block in self.blocks:
            block.attn.fused = fused

if NOTEBOOK:   # demo: the tiny preset's model, untrained
    shape = {k: PRESETS['tiny'][k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'dropout', 'use_time')}
    config = ModelConfig(vocab_size=tok.vocab_size, **shape)
    torch.manual_seed(SEED)
    model = MDLM(config)
    print(f'{model.num_params() / 1e6:.2f}M parameters, {config}')

# %% 5. The loss -----------------------------------------------------------------------------------
# First the intuitive version: mask with a random t, and average
# the cross-entropy over the masked positions. It trains a fine denoiser, but it is not a bound.
# The real objective is the continuous-time negative ELBO (MDLM eq. 10), per character:
#
#     NELBO(x0) = E_t [ 1/(t L) * sum over masked i of -log p(x0_i | xt) ]
#
# The weight 1/t = -alpha'_t / (1 - alpha_t) comes from the linear schedule. At small t few
# characters are masked but each one is worth more; dividing by L (the sequence length), not by
# the number of masks, is what turns the sum into nats per character, a bound on -log p(x0) / L.
# So: MDLM is BERT with a random mask rate and a 1/t weight. That is the whole trick.

def masked_ce(logits, x0, mask):
    """Cross-entropy at the masked positions only: (B, T) with zeros elsewhere."""
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction='none')   # (B, T)
    return ce * mask

def pooled_ce(logits, x0, mask):
    """Masked CE averaged over every masked position of the batch: the intuitive denoising loss."""
    return masked_ce(logits, x0, mask).sum() / mask.sum().clamp(min=1)

def naive_loss(model, x0, generator=None):
    """The first recipe: t ~ U(0, 1), masked CE pooled over the batch. Not a bound (it over-weights
    large t, where most positions are masked). `--loss naive` trains on this loss (through
    batch_loss, with t stratified over the batch like the NELBO's)."""
    t = torch.rand(x0.size(0), generator=generator, device=x0.device)
    xt, mask = forward_mask(x0, t, model.config.vocab_size - 1, generator)
    return pooled_ce(model(xt, t), x0, mask)

def stratified(batch_size, generator, device):
    """(B,) numbers in [0, 1), one in each 1/B-th of it: one u ~ U(0,1) shifted by i / B.
    Each is still uniform, but their average varies far less than that of B independent draws."""
    u = torch.rand(1, generator=generator, device=device)
    return (u + torch.arange(batch_size, device=device) / batch_size) % 1

def nelbo_loss(logits, x0, mask, t, weight=None):
    """The training loss: the NELBO above, averaged over the batch, in nats per character.
    weight (B,): each row's importance weight when t was not drawn uniformly (see draw_t)."""
    per_seq = masked_ce(logits, x0, mask).sum(1) / (t * x0.size(1))   # (B,)
    return (per_seq if weight is None else per_seq * weight).mean()

# Which t to train on. The NELBO is an integral over t, and any density q(t) may pick the t's
# as long as each row is weighed by 1 / q(t): the mean is the same integral, only the spread
# changes (importance sampling): a row drawn from q is weighed by (uniform density) / q(t).
# 'uniform' is the plain draw. 'cosine' is the cosine noise schedule, alpha = cos(pi u / 2),
# seen for what it is: in continuous time the NELBO does not depend on the
# schedule, so a schedule only decides which mask rates training sees, with u uniform and
# t = 1 - cos(pi u / 2), i.e. density q(t) = (2 / pi) / sqrt(t (2 - t)): more rows at small t.
# Both are stratified over the batch (one u, shifted), MDLM's "antithetic" draw.

T_PROPOSALS = ('uniform', 'cosine')

def draw_t(batch_size, generator, device, proposal='uniform', hi=1.0):
    """t (B,) in [EPS, hi] from `proposal`, and each row's weight 1 / ((hi - EPS) q(t)), which is
    1 for uniform t: the weighted loss has the uniform draw's mean whatever the proposal."""
    u = stratified(batch_size, generator, device)
    if proposal == 'uniform':
        return EPS + (hi - EPS) * u, torch.ones(batch_size, device=device)
    u_lo, u_hi = (2 / math.pi) * math.acos(1 - EPS), (2 / math.pi) * math.acos(1 - hi)   # t = EPS, hi
    t = 1 - torch.cos(math.pi / 2 * (u_lo + (u_hi - u_lo) * u))
    q = (2 / math.pi) / torch.sqrt(t * (2 - t)) / (u_hi - u_lo)     # the density of t on [EPS, hi]
    return t, 1 / ((hi - EPS) * q)

def complementary_masks(x0, t, mask_id, generator):
    """Each row twice: once masked at t, and its twin masked exactly where the first is not, at
    time 1 - t (each position is still masked with the right probability, 1 - t). Every
    character is predicted once per pair, so the pair's loss varies less than two free rows.
    t must avoid both 0 and 1 (draw it in [EPS, 1 - EPS]): the twin's 1/t weight is 1 / (1 - t).
    Returns x0, xt, mask, t with twice the rows, the twins in the second half."""
    xt, mask = forward_mask(x0, t, mask_id, generator)
    twin = x0.masked_fill(~mask, mask_id)
    return torch.cat([x0, x0]), torch.cat([xt, twin]), torch.cat([mask, ~mask]), torch.cat([t, 1 - t])

# The GPT twin's loss. Fed [start] + x0[:-1], the causal model predicts all of x0, the same L
# characters the NELBO scores (the [MASK] id serves as the start token: it never occurs in text).
# Its loss is not a bound but the exact negative log-likelihood, so NELBO / NLL is the price of
# generating in any order.

def gpt_input(x0, start_id):
    """(B, T) -> (B, T): the window shifted right by one, the start token in front."""
    return torch.cat([torch.full_like(x0[:, :1], start_id), x0[:, :-1]], 1)

def gpt_loss(logits, x0):
    """Mean next-character cross-entropy: exactly -log p(x0) / L, in nats per character."""
    return F.cross_entropy(logits.transpose(1, 2), x0)

if NOTEBOOK:   # demo: untrained, the model guesses uniformly among 65 characters: loss = log 65
    gen = torch.Generator().manual_seed(SEED)
    x0 = get_batch(train_data, 32, config.block_size, gen)
    print(f'naive loss {naive_loss(model, x0, gen).item():.3f}, log 65 = {math.log(65):.3f}')

# %% 6. One training step --------------------------------------------------------------------------
# AdamW, warmup then a stable learning rate and a decay (or cosine), gradient clipping. A step:
# draw the batch and its noise (training_batch), forward, loss, backward, clip, update
# (train_step). The logged, checkpointed run around it is the harness's train().

def get_lr(it, args):
    """The learning rate at step `it` (args: lr, min_lr, warmup_iters, max_iters, schedule)."""
    if it < args.warmup_iters:                                   # 1) linear warmup
        return args.lr * (it + 1) / args.warmup_iters
    if it >= args.max_iters:
        return args.min_lr
    if args.schedule == 'wsd':     # 2) stable at lr, then a linear decay over the last 20% of steps
        decay_start = max(args.warmup_iters, 0.8 * args.max_iters)
        frac = max(0.0, (it - decay_start) / max(1, args.max_iters - decay_start))
        return args.lr - frac * (args.lr - args.min_lr)
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)  # 2) cosine

def training_batch(data, n, block_size, mask_id, generator, causal, proposal='uniform', complementary=False):
    """The n rows of one optimisation step: (x0, xt, mask, t, weight). A GPT's input is x0
    shifted (mask, t, weight are None); a diffusion model's is x0 masked at a t from `proposal`."""
    device = data.device
    if causal:
        x0 = get_batch(data, n, block_size, generator)
        return x0, gpt_input(x0, mask_id), None, None, None
    if complementary:              # n / 2 windows, each with its twin
        x0 = get_batch(data, n // 2, block_size, generator)
        t, w = draw_t(n // 2, generator, device, proposal, hi=1 - EPS)
        x0, xt, mask, t = complementary_masks(x0, t, mask_id, generator)
        return x0, xt, mask, t, torch.cat([w, w])   # the twin at 1 - t keeps its pair's weight: it is not a draw
    x0 = get_batch(data, n, block_size, generator)
    t, w = draw_t(n, generator, device, proposal)
    xt, mask = forward_mask(x0, t, mask_id, generator)
    return x0, xt, mask, t, w

def batch_loss(model, x0, xt, mask, t, w, objective='nelbo'):
    """The loss of one (micro-)batch from training_batch: the GPT's NLL, the NELBO, or
    (objective='naive') the pooled masked CE of the first recipe, without 1/t and importance weights."""
    logits = model(xt, t)
    if mask is None:
        return gpt_loss(logits, x0)
    return pooled_ce(logits, x0, mask) if objective == 'naive' else nelbo_loss(logits, x0, mask, t, w)

def make_optimizer(model, lr, weight_decay, fused=False):
    """AdamW with weight decay on the matrices only (not on LayerNorm gains and biases)."""
    return torch.optim.AdamW(
        [{'params': [p for p in model.parameters() if p.dim() >= 2], 'weight_decay': weight_decay},
         {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}],
        lr=lr, betas=(0.9, 0.99), fused=fused)

def train_step(model, optimizer, batches, lr, objective='nelbo', autocast=contextlib.nullcontext):
    """One optimisation step on `batches`: a list of training_batch tuples, usually one; several
    (gradient accumulation) add up to one step's gradient. Returns the step's loss, detached.
    autocast: the context the forward pass runs in (bfloat16 where the hardware has it)."""
    for group in optimizer.param_groups:                           # 1) this step's learning rate
        group['lr'] = lr
    total = 0.0
    for i, batch in enumerate(batches):
        # a DDP-wrapped model averages gradients across processes: on the last micro-batch only
        sync = i == len(batches) - 1 or not hasattr(model, 'no_sync')
        with contextlib.nullcontext() if sync else model.no_sync(), autocast():
            part = batch_loss(model, *batch, objective) / len(batches)   # 2) forward and loss
        part.backward()                                            # 3) backward: gradients add up
        total = total + part.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)        # 4) clip, update, clear
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total

if NOTEBOOK:   # demo: train the tiny model for DEMO_ITERS steps with the default recipe
    hp = argparse.Namespace(**{**DEFAULTS, **PRESETS['tiny'], 'max_iters': DEMO_ITERS})
    optimizer = make_optimizer(model, hp.lr, hp.weight_decay)
    model.train()
    for it in range(DEMO_ITERS):
        batch = training_batch(train_data, hp.batch_size, config.block_size, tok.mask_id, gen, causal=False,
                               proposal=hp.t_proposal)
        loss = train_step(model, optimizer, [batch], get_lr(it, hp))
        if it % 100 == 0 or it == DEMO_ITERS - 1:
            print(f'step {it} | loss {loss.item():.4f}')
    model.eval()

# %% 7. Sampling -----------------------------------------------------------------------------------
# The reverse process, from t = 1 (all masks) to t = 0 (text) in N steps.
# One loop serves every use. Its input is a batch of rows in which [MASK] marks what to write:
# everything for a sample, the tail after a prompt, the blanks of an infill. Given tokens (not
# [MASK] in the input) are never touched. Each step the model proposes a character for every
# masked position, and a rule decides which proposals to commit:
#   'ancestral'  (MDLM): between t and s = t - 1/N each mask turns into its proposal with
#                probability (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, else stays masked.
#   'confidence' (MaskGIT, LLaDA): commit the k proposals the model is surest of; k per step is
#                floor(M / N) (+1 in the first M mod N steps) so the M masks are gone after N steps.
#   'threshold'  (Fast-dLLM): commit every proposal surer than P, and at least the surest one;
#                N is then a cap: easy text takes fewer passes.
#   'random':    commit k proposals chosen at random (the plain baseline).
# A committed token stays, except under ReMDM remasking (`remask`, with 'ancestral'): then a
# generated token may turn back into [MASK], so an early mistake can still be undone.
# The model is told t = the fraction of its input that is masked. Then its output depends on the
# input alone: for a row in which a step changes nothing, the next pass would give the same
# logits, so we reuse them (MDLM's cache, per row; exact in eval mode, where dropout is off); with
# more steps than masks most are skipped.
# `calls` counts the model's work: one per row per pass (a cached row costs nothing).

# Read generate as the textbook loop first (ancestral rule, one pass per step: cache=False, no
# semi_ar); the cache, the blocks and the other rules are additions to it, and a test checks that
# the loop with them switched off is the textbook loop, token for token.

RULES = ('ancestral', 'confidence', 'threshold', 'random')

def propose(logits, temperature, top_k, generator, top_p=1.0):
    """Sample a token per position from softmax(logits / temperature) by Gumbel-max in float64
    (float32 Gumbel noise measurably cools the samples), after keeping only the top_k tokens and
    the nucleus (the fewest tokens whose probabilities sum to top_p). Returns the tokens and their
    probability under the distribution they were drawn from (the confidence). temperature 0 is
    argmax, and its confidence is taken at temperature 1."""
    logits = logits.float() if logits.device.type == 'mps' else logits.double()   # mps has no float64
    if temperature > 0:
        logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1:    # drop a token when the tokens surer than it already sum to top_p (the top one stays)
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p                                 # (..., V) sorted
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float('-inf'))
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        tokens = (logits - torch.log(-torch.log(u.clamp(min=1e-300)))).argmax(-1)   # + Gumbel noise
    else:
        tokens = logits.argmax(-1)
    conf = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return tokens, conf

def top_k_per_row(score, open_, k):
    """(B, T) True at the k[b] highest-scoring open positions of each row."""
    rank = score.masked_fill(~open_, float('-inf')).argsort(1, descending=True).argsort(1)   # 0 = best
    return open_ & (rank < k[:, None])

def commit_ancestral(open_, done, i, steps, remask, generator):
    """MDLM's step from t to s, or ReMDM's when remask > 0: with alpha = 1 - t and
    sigma = min(remask, (1 - alpha_s) / alpha_t) (the "cap" schedule, 0 at the last step), a
    generated token turns back into [MASK] with probability sigma, and a mask is committed with
    probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t); sigma = 0 gives (t - s) / t.
    Returns (commit, back) masks (B, T): the masks to fill now, and the generated tokens to turn
    back into [MASK] (`done` marks those that may be)."""
    alpha_t, alpha_s = i / steps, (i + 1) / steps     # step i: t = 1 - i/N to s = t - 1/N, alpha = 1 - t
    sigma = min(remask, (1 - alpha_s) / alpha_t) if alpha_t > 0 else 0.0
    u = torch.rand(open_.shape, generator=generator, device=open_.device)
    commit = open_ & (u < (alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t))
    back = done & (u < sigma) if sigma > 0 else torch.zeros_like(done)
    return commit, back

def commit_ranked(rule, open_, conf, k, i, steps, choice_temperature, threshold, generator):
    """The rules that rank the open positions: 'confidence' commits the k surest (with MaskGIT's
    choice temperature: Gumbel noise on log-confidence, annealed to 0 at the last step),
    'random' k at random, 'threshold' every one surer than `threshold` and at least the surest."""
    if rule == 'random':
        return top_k_per_row(torch.rand(open_.shape, generator=generator, device=open_.device), open_, k)
    score = conf.clamp(min=1e-300).log()
    if rule == 'threshold':
        if i == steps - 1:
            return open_                               # the last step commits all that is left
        return open_ & (conf > threshold) | top_k_per_row(score, open_, torch.ones_like(k))
    if choice_temperature > 0:
        u = torch.rand(open_.shape, generator=generator, device=open_.device, dtype=score.dtype)
        score = score - choice_temperature * (1 - (i + 1) / steps) * torch.log(-torch.log(u.clamp(min=1e-300)))
    return top_k_per_row(score, open_, k)

@torch.no_grad()
def generate(model, x, steps, rule='ancestral', temperature=1.0, top_k=None, generator=None,
             on_step=None, cache=True, top_p=1.0, choice_temperature=0.0, threshold=0.9, remask=0.0,
             semi_ar=None):
    """Fill every [MASK] of x (B, T), `steps` steps per block. Returns (x, model calls: rows run).
    semi_ar=N: LLaDA's semi-autoregressive blocks: only the first N masks of each row may be
    committed until they are all done, then the next N (each block gets `steps` steps).
    cache=False reruns the model on every row at every step (the reference the cache must match)."""
    if remask and rule != 'ancestral':
        raise ValueError(f'remask is for the ancestral rule, not {rule}')
    mask_id = model.config.vocab_size - 1
    x = x.clone()
    logits, calls = None, 0
    stale = torch.ones(x.size(0), dtype=torch.bool, device=x.device)  # rows whose logits are out of date
    while (x == mask_id).any():                     # one block (all the masks, or the next semi_ar)
        masked = x == mask_id
        block = masked if semi_ar is None else masked & (masked.cumsum(1) <= semi_ar)   # (B, T)
        n_block = block.sum(1)                                         # (B,) M per row
        for i in range(steps):
            open_ = block & (x == mask_id)                             # masks this step may commit
            if not open_.any() and not remask:
                break
            if stale.any():                                            # the cache: rerun changed rows only
                fresh = model(x[stale], (x[stale] == mask_id).float().mean(1))   # (B', T, V)
                if logits is None:
                    logits = fresh
                else:
                    logits[stale] = fresh
                calls += int(stale.sum())
            tokens, conf = propose(logits, temperature, top_k, generator, top_p)   # (B, T) each
            if rule == 'ancestral':
                commit, back = commit_ancestral(open_, block & ~open_, i, steps, remask, generator)
            else:
                k = n_block // steps + (i < n_block % steps).long()    # (B,) commits this step
                commit = commit_ranked(rule, open_, conf, k, i, steps, choice_temperature, threshold, generator)
                back = torch.zeros_like(commit)
            x = torch.where(commit, tokens, x).masked_fill(back, mask_id)
            stale = commit.any(1) | back.any(1) | (not cache)          # these rows' input changed
            if on_step is not None:
                on_step(i, x)
    return x, calls

if NOTEBOOK:   # demo: two lines of text out of pure noise, with the default sampler
    x = torch.full((2, config.block_size), tok.mask_id)
    out, calls = generate(model, x, generator=gen, **DEFAULT_SAMPLER)
    print('\n\n'.join(tok.decode(row.tolist()) for row in out))

# %% 8. Completion and infilling -------------------------------------------------------------------
# Both are the same loop with some characters given. Completion: the prompt, then masks; past
# the context, window by window. Infilling: masks where the blanks are, text on both sides, which
# a GPT cannot use (it never sees the right side). The GPT twin's own left-to-right loop is here
# too: one pass per character, the cost a diffusion sampler is compared with.

def generate_text(model, prefix, length, num_samples, steps, rule, temperature=1.0, top_k=None,
                  generator=None, on_step=None, **options):
    """`length` new tokens after `prefix` (a list of ids), for num_samples rows at once.
    Longer than the context: block by block, each block conditioned on the text before it (a
    sliding-window cousin of LLaDA's semi-autoregressive blocks). Each window keeps as much of
    the text so far as fits: the first window all of the prompt (its last T - 1 characters if it
    is longer), later ones half a block, so that each later window makes half a block of new
    tokens (fewer in the last). `options` go to generate (top_p, choice_temperature, threshold,
    remask, semi_ar). Returns (ids (B, P + length), model calls)."""
    T, mask_id = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)   # (B, P)
    calls = 0
    while out.size(1) < len(prefix) + length:
        first = out.size(1) == len(prefix)         # the first window sees the whole prompt
        n_new = min(len(prefix) + length - out.size(1), max(T - out.size(1), 1 if first else max(1, T // 2)))
        context = out[:, out.size(1) - min(out.size(1), T - n_new):]                    # (B, <= T - n_new)
        x = torch.cat([context, torch.full((num_samples, n_new), mask_id, device=device)], 1)
        x, p = generate(model, x, steps, rule, temperature, top_k, generator, on_step, **options)
        out, calls = torch.cat([out, x[:, -n_new:]], 1), calls + p
    return out, calls

@torch.no_grad()
def gpt_generate(model, prefix, length, num_samples, temperature=1.0, top_k=None, generator=None, top_p=1.0):
    """The GPT twin's own loop: `length` characters after `prefix` (a list of ids), one forward
    pass per character, left to right. The window is the start token and the last block_size - 1
    characters, as in training, so it slides on past the context. Returns (ids, model calls)."""
    T, start = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)   # (B, P)
    for _ in range(length):
        x = torch.cat([torch.full((num_samples, 1), start, device=device), out[:, -(T - 1):]], 1)
        tokens, _ = propose(model(x, None)[:, -1], temperature, top_k, generator, top_p)   # (B,) the next char
        out = torch.cat([out, tokens[:, None]], 1)
    return out, length * num_samples

def blank_window(p, q, n, T):
    """Where the T-wide window around the blank [p, q) of a text of n starts: centred on the blank,
    inside the text, and never past p (so the blank's first mask is in it)."""
    return max(0, min((p + q - T) // 2, n - T, p))

def infill(model, ids, num_samples, steps, rule, best_of=1, **options):
    """Fill the [MASK]s of ids (a list) in num_samples rows. A text longer than the context is
    filled blank by blank: each time, the block_size window centred on the first blank left (all
    of it, left and right context, and any other masks it holds) goes through generate.
    best_of=N: draw N fills of each window and keep the one the model's own likelihood bound
    prefers, which a GPT could not do: the bound reads the text on both sides of the blank."""
    T, mask_id = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device).repeat(num_samples * best_of, 1)      # (B * N, L)
    calls = 0
    while (x == mask_id).any():
        masked = (x[0] == mask_id).long()                            # the rows share their blanks
        p = masked.argmax().item()                                   # the first mask left ...
        rest = masked[p:]
        q = p + (rest.argmin().item() if (rest == 0).any() else len(rest))   # ... and the end of its blank
        start = blank_window(p, q, len(ids), T)
        x[:, start:start + T], n = generate(model, x[:, start:start + T], steps, rule, **options)
        calls += n
        if best_of > 1:                                              # keep each sample's likeliest fill
            bound = window_bound(model, x[:, start:start + T], 32, options.get('generator'))   # section 9
            best = bound.view(num_samples, best_of).argmin(1) + best_of * torch.arange(num_samples, device=device)
            x = x[best].repeat_interleave(best_of, 0)
            calls += 32 * len(bound)
    return x[::best_of], calls

BLANK = re.compile(r'\[_+\]')   # a blank: '[', one or more '_', ']'; it stands for as many chars as it is wide

def parse_infill(text, tok):
    """'To [___] or not' -> ids with [MASK] in the blanks. A blank is replaced by exactly as many
    characters as the marker is wide ('[___]' is 5), so the answer lines up under the question."""
    ids, pos = [], 0
    for m in BLANK.finditer(text):
        ids += tok.encode(text[pos:m.start()]) + [tok.mask_id] * (m.end() - m.start())
        pos = m.end()
    ids += tok.encode(text[pos:])
    if tok.mask_id not in ids:
        raise CliError('the text has no blank to fill: mark one with [___] (it is as long as it is wide)')
    return ids

if NOTEBOOK:   # demo: continue a prompt; fill a blank from both sides
    out, _ = generate_text(model, tok.encode('ROMEO:\n'), 96, 1, generator=gen, **DEFAULT_SAMPLER)
    print(tok.decode(out[0].tolist()))
    out, _ = infill(model, parse_infill('To be, or not to be, that is the [______].', tok), 2,
                    generator=gen, **DEFAULT_SAMPLER)
    print('\n'.join(tok.decode(row.tolist()) for row in out))

# %% 9. Evaluation ---------------------------------------------------------------------------------
# An honest likelihood bound, held out, deterministic, low variance.
# Training's estimator (random t, Bernoulli masks) is unbiased but noisy. For evaluation, count
# masks instead of drawing t: mask exactly k of the L positions, k spread evenly over 1..L across
# the batch, and weigh by 1/k (LLaDA's estimator). For a model that ignores t this is exactly the
# NELBO: integrating (1/t) P(k masked | t) over t gives 1/k. The model is told t = k / L; for a
# time-conditioned model the estimate is then the any-order autoregressive bound of the model's
# own conditionals: the generator that unmasks one character at a time in a random order, each
# drawn from the model (an "any-order autoregressive" model), has -log p(x0) below this estimate.

def exact_k_mask(B, L, generator, device):
    """(B, L) masks with exactly k_b positions set, k_b stratified over 1..L. Returns mask, k."""
    k = 1 + (stratified(B, generator, device) * L).long().clamp(max=L - 1)   # (B,) in 1..L
    # argsort of random scores is a random permutation; argsort again gives each position its
    # rank in it, and rank < k picks exactly k positions, uniformly among all such sets
    rank = torch.rand(B, L, generator=generator, device=device).argsort(1).argsort(1)   # (B, L)
    return rank < k[:, None], k

@torch.no_grad()
def nelbo_per_seq(model, x0, generator):
    """The exact-k estimate per sequence (B,), nats per character: unbiased for the NELBO when the
    model ignores t, else the any-order autoregressive bound (above)."""
    mask, k = exact_k_mask(*x0.shape, generator, x0.device)
    xt = x0.masked_fill(mask, model.config.vocab_size - 1)
    logits = model(xt, k / x0.size(1))
    return masked_ce(logits, x0, mask).sum(1) / k

@torch.no_grad()
def gpt_nll_of_text(model, ids):
    """-log p of every character of ids (B, N) under a GPT, nats, (B, N): each character predicted
    from the start token and up to block_size - 1 characters before it (the windows of gpt_generate)."""
    T, start = model.config.block_size, model.config.vocab_size - 1
    B, N = ids.shape
    first = min(N, T)                        # the first T characters: one pass, [start] + ids
    logits = model(gpt_input(ids[:, :first], start), None)
    nll = [F.cross_entropy(logits.transpose(1, 2), ids[:, :first], reduction='none')]
    if N > T:                                # character j >= T: [start] + ids[j-T+1 : j], last position
        ctx = ids[:, 1:N - 1].unfold(1, T - 1, 1).reshape(-1, T - 1)    # (B * (N - T), T - 1)
        x = torch.cat([torch.full((len(ctx), 1), start, device=ids.device), ctx], 1)
        last = torch.cat([model(chunk, None)[:, -1] for chunk in x.split(512)])   # (B * (N - T), V)
        nll.append(F.cross_entropy(last, ids[:, T:].reshape(-1), reduction='none').view(B, N - T))
    return torch.cat(nll, 1)

@torch.no_grad()
def nll_per_seq(model, x0):
    """The GPT twin's exact negative log-likelihood per sequence (B,), in nats per character."""
    return gpt_nll_of_text(model, x0).mean(1)

@torch.no_grad()
def estimate_loss(model, data, n_batches, batch_size, seed=EVAL_SEED):
    """Val loss in nats/char and its standard error, over n_batches seeded batches of `data`: the
    NELBO bound for a diffusion model, the exact NLL for the GPT twin. Always in float32. The
    windows come from a generator of their own, so both kinds score the same windows, and every
    call sees the same windows and masks: evals are comparable. The rows of one batch share their
    stratified draw, so they are not independent; the batches are, and the error comes from them."""
    was_training = model.training
    model.eval()
    windows = torch.Generator(device=data.device).manual_seed(seed)
    noise = torch.Generator(device=data.device).manual_seed(seed + 1)
    means = []
    for _ in range(n_batches):
        x0 = get_batch(data, batch_size, model.config.block_size, windows)
        per_seq = nll_per_seq(model, x0) if model.config.causal else nelbo_per_seq(model, x0, noise)
        means.append(per_seq.float().mean())
    model.train(was_training)
    m = torch.stack(means)
    return m.mean().item(), (m.std() / math.sqrt(len(m))).item() if len(m) > 1 else float('nan')

@torch.no_grad()
def window_bound(model, x0, draws, generator):
    """The NELBO bound of each row of x0 (B, L), from `draws` exact-k masks shared by all rows:
    with the same masks, rows that differ in a few characters are compared with little noise."""
    (B, L), R = x0.shape, draws
    mask, k = exact_k_mask(R, L, generator, x0.device)                            # (R, L), (R,)
    xt = x0[:, None].masked_fill(mask, model.config.vocab_size - 1).view(B * R, L)
    ce = masked_ce(model(xt, (k / L).repeat(B)), x0.repeat_interleave(R, 0), mask.repeat(B, 1))
    return (ce.sum(1) / k.repeat(B)).view(B, R).mean(1)                         # (B,)

@torch.no_grad()
def ce_per_noise_level(model, data, ts, n_batches, batch_size, seed=EVAL_SEED):
    """Masked CE (nats per masked char) at fixed t: how hard each noise level is. Every t scores
    the same windows (a generator of their own, as in estimate_loss)."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=data.device).manual_seed(seed + 1)
    rows = []
    for t in ts:
        windows = torch.Generator(device=data.device).manual_seed(seed)
        total, count = 0.0, 0
        for _ in range(n_batches):
            x0 = get_batch(data, batch_size, model.config.block_size, windows)
            tt = torch.full((batch_size,), t, device=data.device)
            xt, mask = forward_mask(x0, tt, model.config.vocab_size - 1, g)
            total += masked_ce(model(xt, tt), x0, mask).sum().item()
            count += mask.sum().item()
        rows.append(total / max(count, 1))
    model.train(was_training)
    return rows

if NOTEBOOK:   # demo: the trained model's bound on held-out text (the GPT twin's table is in the README)
    nelbo, se = estimate_loss(model, val_data, 10, 32)
    print(f'val NELBO {nelbo:.3f} +- {se:.3f} nats/char: perplexity <= {math.exp(nelbo):.2f}')

# %% ========================== THE LESSON IS COMPLETE ==========================================
# Everything above is a whole, working MDLM: data, noise, model, loss, a training step,
# sampling, infilling, and an honest likelihood. Everything below is the harness a reader may
# skip: device and precision, checkpoints, resume, DDP, the logged training run, the command
# line's modes (generation, eval, score, frontier, plot, bench) and main(). Nothing above calls
# into it.
# ================================================================================================

# %% Harness: device and precision -----------------------------------------------------------------

def pick_device(requested=None):
    if requested:
        try:
            kind, index = torch.device(requested).type, torch.device(requested).index
        except RuntimeError:
            kind, index = None, None
        if kind not in ('cpu', 'cuda', 'mps'):
            raise CliError(f'unknown --device {requested}: use cpu, cuda, cuda:N or mps')
        if kind == 'cuda' and (not torch.cuda.is_available() or (index or 0) >= torch.cuda.device_count()) or \
                kind == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
            raise CliError(f'--device {requested} is not available on this machine')
        return requested
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'

def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively (x86 avx512_bf16 or AMX). Elsewhere bf16
    autocast is emulated and measured 17x slower than float32, so it must never be the default."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:          # not Linux (macOS, Windows): no claim, float32
        return False
    return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))

def fast_path(device, dtype, dropout=0.0):
    """The fastest correct way to train on `device`: (autocast context, fused attention?).
    bf16 autocast on a GPU that supports it and on a CPU with native bf16; float32 elsewhere.
    On a CPU the plain attention formula beats the fused kernel (it has no dropout: fused then)."""
    kind = device.split(':')[0]
    if dtype == 'auto':
        bf16 = torch.cuda.is_bf16_supported() if kind == 'cuda' else kind == 'cpu' and cpu_has_bf16()
        dtype = 'bfloat16' if bf16 else 'float32'
    autocast = (lambda: torch.autocast(device_type=kind, dtype=torch.bfloat16)) if dtype == 'bfloat16' \
        else contextlib.nullcontext
    return autocast, not (kind == 'cpu' and dropout == 0)


# %% Harness: checkpoints, resume, DDP -------------------------------------------------------------
# Checkpoints hold tensors and plain values only (torch.load(weights_only=True) reads them) and
# are written atomically; --resume continues a run bit for bit; torchrun runs one process per GPU.

def save_checkpoint(path, ckpt):
    """Write to a temporary file beside `path`, fsync, then rename over it: a crash at any moment
    leaves either the old checkpoint or the new one, never half of one."""
    d = os.path.dirname(path) or '.'
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.ckpt-', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):   # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)

def load_checkpoint(path):
    """Load with weights_only=True: tensors and plain values only, so a hostile file cannot run code."""
    if not os.path.exists(path):
        raise CliError(f'no checkpoint at {path}; train one with: python mdlm.py --train')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CliError(f'{path} is not a loadable checkpoint ({reason})')
    keys = {'model', 'optimizer', 'config', 'vocab', 'iter', 'best_val', 'args', 'rng'}
    if not isinstance(ckpt, dict) or ckpt.get('format') != 'mdlm-1' or not keys <= ckpt.keys():
        raise CliError(f'{path} is not an mdlm checkpoint')
    return ckpt

def model_from_checkpoint(ckpt, device='cpu'):
    try:
        config = ModelConfig(**ckpt['config'])
        model = MDLM(config)
        model.load_state_dict(ckpt['model'])
        tok = Tokenizer(ckpt['vocab'])
        if tok.vocab_size != config.vocab_size:
            raise ValueError('vocabulary and model disagree')
    except Exception as e:
        raise CliError(f'the checkpoint does not hold a valid mdlm model ({type(e).__name__})')
    return model.to(device).eval(), tok

def kind_name(config):
    return 'gpt' if config.causal else 'diffusion'

def refuse_other_kind(ckpt_path, causal):
    """Training a GPT must never replace the diffusion model in the same directory, nor the reverse."""
    if os.path.exists(ckpt_path):
        other = load_checkpoint(ckpt_path)
        if other['config'].get('causal', False) != causal:
            raise CliError(f'{ckpt_path} holds a {"diffusion" if causal else "gpt"} model; '
                           f'training a {"gpt" if causal else "diffusion"} model would replace it: '
                           f'choose another --out-dir')

def ddp_setup(device_arg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per device, nanoGPT style."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return 0, 1, pick_device(device_arg)
    import torch.distributed as dist
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    device = device_arg or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda'):
        device = f'cuda:{local}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return rank, world, device

class StopRequested(Exception):
    pass

ARCH_FLAGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'use_time', 'rope', 'causal')   # fixed by a checkpoint
TRAIN_FLAGS = ('batch_size', 'max_iters', 'lr', 'min_lr', 'warmup_iters', 'weight_decay', 'grad_accum',
               'eval_interval', 'eval_iters', 'log_interval', 'schedule', 't_proposal',
               'complementary', 'loss')                                        # may change on --resume
FLAG_NAMES = {'causal': 'gpt', 'use_time': 'time'}    # dest -> the flag a user types
BEFORE_FLAG = dict(schedule='cosine', t_proposal='uniform', complementary=False, loss='nelbo')   # checkpoints older than these flags

def resume_config(ckpt, args):
    """--resume: the checkpoint's architecture wins (asking for another is refused), and training
    flags not given again keep their saved values. Returns the config and the flags changed."""
    saved = ckpt['config']
    for name in ARCH_FLAGS:
        if name in args.explicit and getattr(args, name) != saved.get(name, False):
            raise CliError(f'cannot resume with {flag(name)} {getattr(args, name)}: '
                           f'the checkpoint was trained with {saved.get(name, False)}')
    changed = []
    for name in TRAIN_FLAGS:
        saved_value = ckpt['args'].get(name, BEFORE_FLAG.get(name, getattr(args, name)))
        if name not in args.explicit:
            setattr(args, name, saved_value)
        elif getattr(args, name) != saved_value:
            changed.append(f'{name}: {saved_value} -> {getattr(args, name)}')
    if args.data == DEFAULT_DATA and ckpt['args'].get('data'):   # the text it was trained on
        args.data = ckpt['args']['data']
    config = ModelConfig(**saved)
    if 'dropout' in args.explicit and args.dropout != config.dropout:
        changed.append(f'dropout: {config.dropout} -> {args.dropout}')
        config.dropout = args.dropout
    for name in ARCH_FLAGS:
        setattr(args, name, getattr(config, name))
    return config, changed

def restore_state(ckpt, model, optimizer, gen, args, device, rank, world):
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    optimizer.param_groups[0]['weight_decay'] = args.weight_decay     # the flag wins over the saved one
    try:
        gen.set_state(ckpt['rng']['gen'])
        torch.set_rng_state(ckpt['rng']['torch'])
        if device.startswith('cuda') and ckpt['rng'].get('cuda') is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
    except (RuntimeError, TypeError, ValueError):
        raise CliError('the checkpoint\'s random state is from another kind of device; '
                       'resume on the device it was trained on')
    if world > 1:        # only rank 0's dropout RNG was saved: give the other ranks their own again
        torch.manual_seed(args.seed + rank + 1_000_003 * ckpt['iter'])
    return ckpt['iter'], ckpt['best_val']

def append_log(path, fresh, row):
    """<out-dir>/log.csv: one row per evaluation (--plot draws it)."""
    with open(path, 'w' if fresh else 'a', newline='') as f:
        w = csv.writer(f)
        if fresh:
            w.writerow(['step', 'train_nelbo', 'val_nelbo', 'val_se', 'seconds'])
        w.writerow(row)

def any_rank(flag, device, world):
    """True on every rank when `flag` is true on any (so all ranks stop at the same step)."""
    if world == 1:
        return bool(flag)
    import torch.distributed as dist
    f = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return f.item() > 0

def compiled_or_eager(model, batch_size, config, device, autocast, log):
    """torch.compile, tried at once on one forward and backward of the training shape and
    precision (so its compile time falls inside the run's wall time, and is spent once); if it
    cannot compile, one line and eager."""
    try:
        compiled = torch.compile(model)
        xt = torch.full((batch_size, config.block_size), config.vocab_size - 1, device=device)
        t = None if config.causal else torch.full((batch_size,), 0.5, device=device)
        with autocast():
            out = compiled(xt, t)[..., :-1].sum()
        out.backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        log(f'--compile: could not compile ({reason}); training without it')
        model.zero_grad(set_to_none=True)
        return model


# %% Harness: the training run ---------------------------------------------------------------------
# train_step in a loop, with everything a long run needs around it: seeding, the fast path,
# compile, DDP, periodic evals logged to <out-dir>/log.csv, atomic checkpoints, Ctrl-C that
# saves, and --resume.

def train(args):
    started = time.time()            # the run's wall clock: start-up, compile and evals included
    rank, world, device = ddp_setup(args.device)
    master = rank == 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if master else (lambda *a: None)
    preset = resolve(args, device.split(':')[0])
    ckpt_path, log_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'log.csv')
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if master:    # a save killed mid-write leaves its temporary file; this run owns the directory now
        for stale in glob.glob(os.path.join(glob.escape(args.out_dir), '.ckpt-*.tmp')):
            with contextlib.suppress(OSError):
                os.remove(stale)

    # 1) the model's shape and the training flags: a resumed run's come from its checkpoint
    if ckpt:
        config, changed = resume_config(ckpt, args)
        preset = 'from checkpoint'
    text = load_text(args.data, allow_download=args.data == DEFAULT_DATA)
    tok = Tokenizer(ckpt['vocab']) if ckpt else Tokenizer.from_text(text)
    if not ckpt:
        refuse_other_kind(ckpt_path, args.causal)
        config = ModelConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                             use_time=args.use_time, rope=args.rope, causal=args.causal)
    # 2) data: the whole token tensor lives on the device (1.1M chars: a few MB), no loader needed
    train_data, val_data = (d.to(device) for d in split_data(text, tok, config.block_size))

    # 3) model, AdamW (weight decay on matrices only), and one generator for batches and noise:
    # every rank draws the same global batch and noise and keeps its slice, so N ranks x A micro-
    # batches see exactly the batches (and the stratified t) of one process with an N*A times larger batch
    torch.manual_seed(args.seed + rank)      # dropout differs per rank; data and noise do not
    model = MDLM(config).to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, fused=device.startswith('cuda'))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    it, best_val = 0, float('inf')
    if ckpt:
        it, best_val = restore_state(ckpt, model, optimizer, gen, args, device, rank, world)
        log(f'resuming from {ckpt_path} at step {it}' + (f' ({", ".join(changed)})' if changed else ''))
    if device.startswith('cuda'):   # TF32 matmuls: ~fp32 accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = model                # what gets saved: never the compiled or DDP-wrapped one
    autocast, fused = fast_path(device, args.dtype, config.dropout)
    raw_model.set_fused_attention(fused)
    if args.compile:
        model = compiled_or_eager(model, args.batch_size, config, device, autocast, log)
    compiled = model is not raw_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device] if device.startswith('cuda') else None)
    log(f'device {device}{f" x {world}" if world > 1 else ""} | preset {preset} | {kind_name(config)} | '
        f'{raw_model.num_params() / 1e6:.2f}M parameters | {asdict(config)}')
    log(f'fast path: {"bfloat16 autocast" if autocast is not contextlib.nullcontext else "float32"}, '
        f'{"fused" if fused else "manual"} attention{", torch.compile" if compiled else ""}; '
        f'evaluations in float32')

    def check_finite(loss, iteration):
        """A non-finite loss ends the run before anything is saved: the last good checkpoint stays."""
        if loss is not None and not math.isfinite(loss.item()):
            raise CliError(f'the loss is not finite at step {iteration}; kept the last good checkpoint {ckpt_path}')

    def save(iteration):
        if master:
            os.makedirs(args.out_dir, exist_ok=True)
            save_checkpoint(ckpt_path, {
                'format': 'mdlm-1', 'kind': kind_name(config), 'model': raw_model.state_dict(),
                'optimizer': optimizer.state_dict(),
                'config': asdict(config), 'vocab': tok.itos, 'iter': iteration, 'best_val': best_val,
                'args': {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
                'rng': {'gen': gen.get_state(), 'torch': torch.get_rng_state(),
                        'cuda': torch.cuda.get_rng_state() if device.startswith('cuda') else None}})

    # 4) Ctrl-C / SIGTERM only raise a flag: the step in flight finishes, then we save and stop
    stop = []
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    B, T, A = args.batch_size, config.block_size, args.grad_accum
    start_it, loss = it, None
    t_steps, it_steps = time.time(), it     # step timing restarts after each eval: ms/step is training alone
    try:
        while True:
            # 5) evaluate and checkpoint (not again at the step a resumed run starts from)
            if (it % args.eval_interval == 0 or it == args.max_iters) and not (ckpt and it == start_it):
                check_finite(loss, it)
                train_nelbo, _ = estimate_loss(raw_model, train_data, args.eval_iters, B)
                val_nelbo, val_se = estimate_loss(raw_model, val_data, args.eval_iters, B)
                best_val = min(best_val, val_nelbo)
                name = 'nll' if config.causal else 'nelbo'
                log(f'step {it} | train {name} {train_nelbo:.4f} | val {name} {val_nelbo:.4f} '
                    f'+- {val_se:.4f} nats/char ({val_nelbo / math.log(2):.4f} bits/char) '
                    f'| {time.time() - started:.0f}s')
                if master:
                    os.makedirs(args.out_dir, exist_ok=True)
                    append_log(log_path, not ckpt and it == 0 or not os.path.exists(log_path),
                               [it, f'{train_nelbo:.5f}', f'{val_nelbo:.5f}', f'{val_se:.5f}', f'{time.time() - started:.1f}'])
                save(it)
                t_steps, it_steps = time.time(), it
            if it >= args.max_iters:
                break
            if (world == 1 or it % args.log_interval == 0) and any_rank(stop, device, world):
                raise StopRequested
            # 6) one step of train_step on A micro-batches (A = --grad-accum) of this rank's B rows
            batch = training_batch(train_data, A * world * B, T, tok.mask_id, gen, config.causal,
                                   args.t_proposal, args.complementary)   # A * world * B rows, t stratified over all
            micro = [tuple(a if a is None else a[(m * world + rank) * B:(m * world + rank + 1) * B] for a in batch)
                     for m in range(A)]
            lr = get_lr(it, args)
            loss = train_step(model, optimizer, micro, lr, args.loss, autocast)   # the step's mean
            it += 1
            if it % args.log_interval == 0 or it == args.max_iters:   # the only host sync in the loop
                check_finite(loss, it)
                lossf = loss.item()                                     # this rank's step mean
                dt = (time.time() - t_steps) / (it - it_steps)
                log(f'step {it} | loss {lossf:.4f} | lr {lr:.1e} | {dt * 1000:.1f}ms | '
                    f'{B * T * A * world / dt:,.0f} tok/s | eta {dt * (args.max_iters - it):.0f}s')
        log(f'done: best val {"nll" if config.causal else "nelbo"} {best_val:.4f} nats/char; '
            f'latest checkpoint in {ckpt_path}')
        return best_val
    except StopRequested:
        check_finite(loss, it)
        save(it)
        log(f'stopped at step {it}; saved {ckpt_path}. Resume with: python mdlm.py --train --resume'
            + (f' --out-dir {args.out_dir}' if args.out_dir != 'out' else ''))   # --data: remembered
        raise SystemExit(130)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


# %% Harness: generation, evaluation and scoring from the command line -----------------------------

# The infill metric of --eval --infill-eval, and the unigram entropy that --judge and --frontier
# print beside the judge's bits/char.

def blanked_words(text, length, n, seed=EVAL_SEED):
    """n seeded infill questions from `text`: a lowercase word of `length` letters in a line,
    given with the two lines before it. Returns (context, start of the word in it, word)."""
    lines = text.split('\n')
    word = re.compile(rf"(?<![A-Za-z'])[a-z]{{{length}}}(?![A-Za-z'])")
    found = [(i, m.start(), m.group()) for i in range(2, len(lines)) for m in word.finditer(lines[i])]
    picks = [found[j] for j in torch.randperm(len(found), generator=torch.Generator().manual_seed(seed))[:n]]
    return [('\n'.join(lines[i - 2:i + 1]), len(lines[i - 2]) + len(lines[i - 1]) + 2 + pos, w)
            for i, pos, w in picks]

@torch.no_grad()
def infill_accuracy(model, tok, train_text, val_text, lengths=(1, 3, 5), n=100, **options):
    """Fill blanked val words (blanked_words) and count exact words and right characters, per
    length. A diffusion model fills each with `infill` (options: the sampler's). A GPT cannot see
    past the blank, so it gets a list instead: every word of that length in the training text,
    each put in the blank and scored on the context window around it; it answers the likeliest."""
    T, mask_id = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    rows = []
    for length in lengths:
        candidates = sorted({w for _, _, w in blanked_words(train_text, length, 10 ** 9)})
        exact = right = 0
        for text, start, word in blanked_words(val_text, length, n):
            ids = tok.encode(text[:start]) + [mask_id] * length + tok.encode(text[start + length:])
            if model.config.causal:
                win = blank_window(start, start + length, len(ids), T)            # infill's window
                lines = torch.tensor([tok.encode(text[win:start] + c + text[start + length:])[:T] for c in candidates],
                                     device=device)
                nll = torch.cat([nll_per_seq(model, chunk) for chunk in lines.split(256)])
                guess = candidates[nll.argmin().item()]
            else:
                out, _ = infill(model, ids, 1, **options)
                guess = tok.decode(out[0, start:start + length].tolist())
            exact += guess == word
            right += sum(a == b for a, b in zip(guess, word))
        rows.append((length, exact / n, right / (n * length), len(candidates)))
    return rows

def unigram_entropy_bits(ids):
    """Entropy in bits of the character frequencies of one text: about 4.4 for a line of
    Shakespeare, 0 for one character repeated. A sampler that repeats itself scores low here."""
    p = torch.bincount(ids).float()
    p = p[p > 0] / len(ids)
    return -(p * p.log2()).sum().item()

def load_for_inference(args):
    device = pick_device(args.device)
    ckpt = load_checkpoint(os.path.join(args.out_dir, 'ckpt.pt'))
    model, tok = model_from_checkpoint(ckpt, device)
    refuse_diffusion_flags(args, model.config.causal)
    print(f'loaded {args.out_dir}/ckpt.pt: step {ckpt["iter"]}, {model.num_params() / 1e6:.2f}M parameters, '
          f'device {device}', file=sys.stderr)
    return model, tok, ckpt

def show_frames(tok, record=None):
    """--show: each step's text, redrawn in place on a terminal, else printed as a history.
    record: a list that also keeps every frame's first row (--png draws some of them)."""
    tty, frames = sys.stderr.isatty(), [0]     # frames counted here: semi-AR blocks restart i
    def on_step(i, x):
        frames[0] += 1
        rows = [f'step {frames[0]:4d} | {tok.decode(row.tolist())}'.replace('\n', '\u21b5') for row in x]
        if record is not None:
            record.append(rows[0])
        frame = '\n'.join(rows)
        if tty and frames[0] > 1:
            sys.stderr.write(f'\x1b[{x.size(0)}F')    # cursor back up over the last frame
        sys.stderr.write(frame + '\n')
        sys.stderr.flush()
    return on_step

def run_generation(args):
    model, tok, _ = load_for_inference(args)
    T, device = model.config.block_size, next(model.parameters()).device
    if model.config.causal:
        if args.infill is not None:
            raise CliError('a GPT cannot fill blanks: it never sees the text to the right of one; '
                           'use a diffusion model')
    if args.judge is not None and args.infill is not None:
        raise CliError('--judge scores --sample and --complete, not --infill')
    if args.best_of is not None and args.infill is None:
        raise CliError('--best-of is for --infill (and --eval --infill-eval)')
    judge = load_judge(args.judge, tok, device) if args.judge is not None else None
    g = torch.Generator(device=device).manual_seed(args.seed)
    frames = []
    opts = sampler_options(args, g, show_frames(tok, frames) if args.show else None, infill=args.infill is not None)
    if args.infill is not None:
        ids = parse_infill(args.infill, tok)
        out, _ = infill(model, ids, args.num_samples, best_of=args.best_of or SAMPLER_FALLBACKS['best_of'], **opts)
    else:
        prompt = args.complete if args.complete is not None else ''
        if args.complete is not None and not prompt:
            raise CliError('the prompt is empty: give some text to continue, or use --sample')
        ids = tok.encode(prompt)
        if model.config.causal:          # a GPT slides over any prompt
            out, _ = gpt_generate(model, ids, args.length or T, args.num_samples, opts['temperature'], args.top_k, g,
                                  opts['top_p'])
        else:
            if len(ids) >= T:
                raise CliError(f'the prompt is {len(ids)} characters; it must leave room in the '
                               f'model\'s context of {T}: use at most {T - 1}')
            out, _ = generate_text(model, ids, args.length or T, args.num_samples, **opts)
    texts = [tok.decode(row.tolist()) for row in out]
    sys.stdout.write(('\n' + '=' * 40 + '\n').join(texts) + '\n')
    if args.png:                                   # nine frames, evenly spaced, the first and last among them
        picks = sorted({round(i * (len(frames) - 1) / 8) for i in range(9)})
        how = f'rule {opts["rule"]}, {opts["steps"]} steps'
        how += f' per block of {opts["semi_ar"]}' if opts['semi_ar'] else ''
        text_picture([frames[i] for i in picks], args.png, f'text out of noise: {how} ({len(frames)} frames)')
    if judge is not None:
        print(judge_report(judge, tok, out, len(ids), args), file=sys.stderr)
    return 0

def sampler_options(args, generator, on_step=None, infill=False):
    """The diffusion sampler's flags as generate's keyword arguments; a flag for another rule is refused.
    infill: a single fill (one sample, no --best-of) without --temperature takes INFILL_TEMPERATURE."""
    if not {'rule', 'steps', 'semi_ar'} & args.explicit:
        plan = DEFAULT_SAMPLER                  # nothing chosen: the frontier's pick (README)
    else:                                       # anything chosen: plain blocks, 64 steps, unless said
        plan = dict(rule=args.rule or DEFAULT_SAMPLER['rule'], steps=args.steps or SAMPLER_FALLBACKS['steps'],
                    semi_ar=args.semi_ar)
    for name, its_rule in SAMPLER_FLAGS.items():
        if name in args.explicit and plan['rule'] != its_rule:
            raise CliError(f'{flag(name)} is for --rule {its_rule}, not {plan["rule"]}')
    chosen = {k: SAMPLER_FALLBACKS[k] if getattr(args, k) is None else getattr(args, k)
              for k in ('temperature', 'top_p', 'choice_temperature', 'threshold', 'remask')}
    if infill and args.temperature is None and args.num_samples == 1 and (args.best_of or 1) == 1:
        chosen['temperature'] = INFILL_TEMPERATURE
    return dict(plan, **chosen, top_k=args.top_k, generator=generator, on_step=on_step)

def load_judge(out_dir, tok, device):
    """--judge DIR: the GPT checkpoint that scores samples; it must read the same characters."""
    judge, judge_tok = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'ckpt.pt')), device)
    if not judge.config.causal:
        raise CliError(f'{out_dir}/ckpt.pt is a diffusion model; a judge must be a GPT '
                       f'(train one with: python mdlm.py --train --gpt)')
    if judge_tok.itos != tok.itos:
        raise CliError(f'the judge in {out_dir} was trained on another vocabulary than the model')
    return judge

def judge_report(judge, tok, out, n_prompt, args):
    """Generative perplexity, as MDLM and SEDD report it, in bits/char: how likely the judge (a GPT)
    finds the generated characters, each predicted from what stands before it. Low is plausible;
    but text that repeats itself also scores low, so the samples' unigram entropy stands beside
    it, and both figures for as many real val texts of the same length."""
    (b, e), (rb, re_) = judge_figures(judge, out, n_prompt), judge_figures(judge, real_val_text(args, tok, out), n_prompt)
    return (f'judge {args.judge}: samples {b:.3f} bits/char, unigram entropy {e:.2f} bits | '
            f'real val text {rb:.3f} bits/char, entropy {re_:.2f} bits '
            f'({out.size(0)} x {out.size(1) - n_prompt} chars each)')

def real_val_text(args, tok, like):
    """As many seeded val windows as `like` has rows, as long as its rows: the reference."""
    _, val_data = split_data(load_text(args.data, allow_download=args.data == DEFAULT_DATA), tok, like.size(1))
    return get_batch(val_data, like.size(0), like.size(1), torch.Generator().manual_seed(args.seed)).to(like.device)

@torch.no_grad()
def judge_figures(judge, rows, n_prompt=0):
    """(bits/char of rows[:, n_prompt:] under the judge, pooled; their unigram entropy, averaged)."""
    nll = gpt_nll_of_text(judge, rows)[:, n_prompt:]                  # (B, L): the generated part only
    entropy = sum(unigram_entropy_bits(r) for r in rows[:, n_prompt:]) / len(rows)
    return nll.mean().item() / math.log(2), entropy

# The sampler settings --frontier compares: (name, generate's options beyond the defaults)
FRONTIER = [
    ('ancestral, 16 steps', dict(steps=16)), ('ancestral, 64 steps', dict()), ('ancestral, 256 steps', dict(steps=256)),
    ('ancestral, temperature 0.8', dict(temperature=0.8)), ('ancestral, top-p 0.9', dict(top_p=0.9)),
    ('ancestral, top-p 0.8', dict(top_p=0.8)),
    ('ancestral, remask 0.01', dict(remask=0.01)), ('ancestral, remask 0.02, 128 steps', dict(remask=0.02, steps=128)),
    ('ancestral, semi-ar 8', dict(semi_ar=8, steps=8)), ('random, 64 steps', dict(rule='random')),
    ('confidence, 64 steps', dict(rule='confidence')),
    ('confidence, choice temperature 1', dict(rule='confidence', choice_temperature=1.0)),
    ('confidence, choice temperature 4', dict(rule='confidence', choice_temperature=4.0)),
    ('confidence, semi-ar 8', dict(rule='confidence', semi_ar=8, steps=8)),
    ('confidence, semi-ar 8, 4 steps', dict(rule='confidence', semi_ar=8, steps=4)),
    ('confidence, semi-ar 16, 8 steps', dict(rule='confidence', semi_ar=16, steps=8)),
    ('confidence, semi-ar 12, 8 steps', dict(rule='confidence', semi_ar=12, steps=8)),
    ('confidence, semi-ar 16, 16 steps', dict(rule='confidence', semi_ar=16, steps=16)),
    ('confidence, semi-ar 8, temperature 1.1', dict(rule='confidence', semi_ar=8, steps=8, temperature=1.1)),
    ('confidence, semi-ar 8, choice temperature 1', dict(rule='confidence', semi_ar=8, steps=8, choice_temperature=1.0)),
    ('threshold 0.5, semi-ar 8', dict(rule='threshold', threshold=0.5, semi_ar=8, steps=8)),
    ('threshold 0.3, semi-ar 16', dict(rule='threshold', threshold=0.3, semi_ar=16, steps=16)),
    ('threshold 0.9', dict(rule='threshold', threshold=0.9)), ('threshold 0.5', dict(rule='threshold', threshold=0.5)),
]

def run_frontier(args):
    """--frontier --judge DIR: every FRONTIER setting from the same seed, scored by the judge:
    bits/char, unigram entropy, model calls per character; a table and <out-dir>/frontier.png."""
    model, tok, _ = load_for_inference(args)
    if model.config.causal:
        raise CliError(f'{args.out_dir}/ckpt.pt is a GPT: --frontier compares the diffusion sampler\'s settings')
    if args.judge is None:
        raise CliError('--frontier needs --judge DIR: the GPT checkpoint that scores the samples')
    device = next(model.parameters()).device
    judge = load_judge(args.judge, tok, device)
    B, L = args.num_samples, args.length or 2 * model.config.block_size
    rows = []
    for name, opts in FRONTIER:
        g = torch.Generator(device=device).manual_seed(args.seed)
        out, calls = generate_text(model, [], L, B, **{'steps': 64, 'rule': 'ancestral', **opts}, generator=g)
        name += ' (default)' if opts == DEFAULT_SAMPLER else ''
        rows.append((name, *judge_figures(judge, out), calls / (B * L)))
    out, calls = gpt_generate(judge, [], L, B, generator=torch.Generator(device=device).manual_seed(args.seed))
    rows.append(('the GPT twin (judge) itself', *judge_figures(judge, out), calls / (B * L)))
    rows.append(('real val text', *judge_figures(judge, real_val_text(args, tok, out)), float('nan')))
    print(f'{B} samples x {L} chars, seed {args.seed}; judge {args.judge}')
    print(f'{"setting":46} {"bits/char":>9} {"entropy":>8} {"calls/char":>10}')
    for name, bits, entropy, per_char in rows:
        print(f'{name:46} {bits:9.3f} {entropy:8.2f} {per_char:10.2f}')
    plt = pyplot(required=bool(args.png))
    if plt is None:
        print('no picture: matplotlib is not installed (pip install -r requirements.txt)')
        return 0
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, bits, entropy, _ in rows:
        ax.scatter(entropy, bits, marker='*' if 'default' in name else 'o', s=120 if 'default' in name else 30,
                   color='C1' if 'GPT' in name else 'C2' if 'real' in name else 'C3' if 'default' in name else 'C0')
        ax.annotate(name, (entropy, bits), fontsize=7, xytext=(3, 3), textcoords='offset points')
    gpt_bits, real_entropy = rows[-2][1], rows[-1][2]      # where text reads like the GPT's and like real text
    ax.axhline(1.5 * gpt_bits, color='grey', linestyle='--', linewidth=0.8)
    ax.axvline(real_entropy - 0.25, color='grey', linestyle='--', linewidth=0.8)
    ax.annotate('right of and below the dashed lines:\nentropy within 0.25 bits of real text\'s,\n'
                'bits/char within 1.5x of the GPT\'s own samples\'', (real_entropy - 0.25, 1.5 * gpt_bits),
                fontsize=8, color='grey', xytext=(6, -8), textcoords='offset points', va='top')
    ax.set(xlabel='unigram entropy of a sample (bits): low = repetitive', ylabel='bits/char under the GPT judge: low = plausible',
           title=f'samplers of {args.out_dir}/ckpt.pt, {B} x {L} chars')
    ax.grid(alpha=0.3)
    save_picture(fig, args.png or os.path.join(args.out_dir, 'frontier.png'))
    return 0

def run_eval(args):
    model, tok, ckpt = load_for_inference(args)
    if model.config.causal and args.png:
        raise CliError('--png with --eval draws the loss per noise level, and a GPT has no noise level')
    plt = pyplot(required=True) if args.png else None     # before the work, not after it
    device = next(model.parameters()).device
    text = load_text(args.data, allow_download=args.data == DEFAULT_DATA)
    train_data, val_data = (d.to(device) for d in split_data(text, tok, model.config.block_size))
    n, B = args.eval_iters or EVAL_BATCHES, args.batch_size or ckpt['args'].get('batch_size', 64)   # as in training
    for name, data in (('val', val_data), ('train', train_data)):
        mean, se = estimate_loss(model, data, n, B)    # the training log's windows, and more
        what = ('nll', f'perplexity {math.exp(mean):.3f} (exact: a GPT\'s likelihood)') if model.config.causal \
            else ('nelbo', f'perplexity <= {math.exp(mean):.3f} (an upper bound: the NELBO bounds -log p)')
        spread = f'+- {se:.4f} (standard error, {n} batches' if n > 1 else '(no standard error from 1 batch'
        print(f'{name} {what[0]}: {mean:.4f} nats/char ({mean / math.log(2):.4f} bits/char) '
              f'{spread} of {B} windows of {model.config.block_size}); {what[1]}')
    if args.infill_eval:
        split = int(0.9 * len(text))
        g = torch.Generator(device=device).manual_seed(args.seed)
        opts = {} if model.config.causal else dict(sampler_options(args, g, infill=True),
                                                   best_of=args.best_of or SAMPLER_FALLBACKS['best_of'])
        how = ('ranks every training word of the length (the GPT cannot see past the blank)' if model.config.causal
               else f'fills with --infill\'s sampler: {opts["rule"]}, {opts["steps"]} steps, semi-ar '
                    f'{opts["semi_ar"] or "off"}, temperature {opts["temperature"]:g}, best of {opts["best_of"]}')
        print(f'infill: 100 blanked val words per length, each given with its line and the two before; {how}')
        for length, exact, chars, n_cand in infill_accuracy(model, tok, text[:split], text[split:], **opts):
            print(f'  {length}-letter words: {exact:.0%} exact, {chars:.0%} of letters right')
    if model.config.causal:
        return 0
    ts = [round(0.1 * i, 1) for i in range(1, 11)]
    ces = ce_per_noise_level(model, val_data, ts, max(1, n // 4), B)
    print('masked cross-entropy per noise level (val, nats per masked char):')
    for t, ce in zip(ts, ces):
        print(f'  t={t:.1f}  {ce:.4f}  {"#" * round(ce * 10)}')
    naive = ces[0:9:2]                                   # t = 0.1, 0.3, 0.5, 0.7, 0.9 from the table above
    print(f'naive average of the masked cross-entropy at t = 0.1, 0.3, ..., 0.9: {sum(naive) / 5:.4f} nats '
          f'(neither a bound nor a perplexity: not comparable with a GPT\'s loss)')
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ts, ces, marker='o')
        ax.set(xlabel='t: the fraction of characters masked', ylabel='nats per masked character', ylim=(0, None),
               title=f'val cross-entropy per noise level, {args.out_dir}/ckpt.pt')
        ax.grid(alpha=0.3)
        save_picture(fig, args.png)
    return 0

@torch.no_grad()
def run_score(args):
    """--score FILE: bits/char of a text, in windows of block_size scored one by one (as --eval
    scores val): the exact NLL under a GPT, the NELBO bound under a diffusion model."""
    model, tok, _ = load_for_inference(args)
    device = next(model.parameters()).device
    ids = torch.tensor(tok.encode(load_text(args.score)), device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    total = 0.0
    for window in ids.split(model.config.block_size):
        x0 = window[None]                                                      # (1, L)
        if model.config.causal:
            total += nll_per_seq(model, x0).item() * len(window)
        else:   # 128 exact-k draws, k stratified over 1..L: the bound of this window, per char
            total += window_bound(model, x0, 128, g).item() * len(window)
    bits = total / len(ids) / math.log(2)
    what = 'exact, a GPT' if model.config.causal else 'an upper bound, a diffusion model'
    print(f'{args.score}: {bits:.4f} bits/char ({len(ids)} chars; {what})')
    return 0


# %% Harness: plot and bench -----------------------------------------------------------------------

def pyplot(required=False):
    """matplotlib's pyplot, drawing into files (no display needed); None where it is not installed,
    or one line of error when a picture was asked for (--png)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise CliError('--png needs matplotlib: pip install -r requirements.txt')
        return None
    return plt

def save_picture(fig, path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    pyplot().close(fig)
    print(f'wrote {path}', file=sys.stderr)

def text_picture(lines, path, title):
    """--png for text: the lines in a monospace font, one under the other ([MASK] drawn as MASK_GLYPH)."""
    plt = pyplot(required=True)
    fig = plt.figure(figsize=(0.085 * max(map(len, lines)) + 0.4, 0.25 * len(lines) + 0.5))
    for i, line in enumerate(lines):
        fig.text(0.02, 1 - (i + 0.8) / (len(lines) + 0.8), line, family='DejaVu Sans Mono', fontsize=10, va='top')
    fig.suptitle(title, x=0.02, ha='left', fontsize=10)
    save_picture(fig, path)

def read_log(out_dir):
    """(steps, {'train_nelbo': [...], 'val_nelbo': [...]}) from <out_dir>/log.csv (a GPT's columns hold its NLL)."""
    path = os.path.join(out_dir, 'log.csv')
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
        steps = [int(r['step']) for r in rows]
        curves = {k: [float(r[k]) for r in rows] for k in ('train_nelbo', 'val_nelbo')}
    except (OSError, KeyError, ValueError, TypeError):
        raise CliError(f'no readable training log at {path}; train with --out-dir {out_dir} first')
    if not all(math.isfinite(v) for c in curves.values() for v in c):
        raise CliError(f'{path} holds a value that is not a finite number')
    if not rows:
        raise CliError(f'{path} has no evaluations yet')
    return steps, curves

def run_plot(args):
    """--plot [DIR ...]: the training curves of each run (default: --out-dir) in one picture,
    <first DIR>/loss.png or --png FILE; a terminal chart per run without matplotlib."""
    dirs = args.plot or [args.out_dir or 'out']
    logs = {d: read_log(d) for d in dirs}
    plt = pyplot(required=bool(args.png))
    if plt is None:
        for d, (steps, curves) in logs.items():
            print(f'{d}:\n{ascii_chart(steps, curves)}')
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (d, (steps, curves)) in enumerate(logs.items()):
        ax.plot(steps, curves['val_nelbo'], marker='.', color=f'C{i}', label=f'{d}: val')
        ax.plot(steps, curves['train_nelbo'], linestyle=':', color=f'C{i}', label=f'{d}: train')
    ax.set(xlabel='step', ylabel='nats/char (diffusion: NELBO bound; GPT: exact NLL)', title='training curves')
    ax.grid(alpha=0.3)
    ax.legend()
    save_picture(fig, args.png or os.path.join(dirs[0], 'loss.png'))
    return 0

def ascii_chart(steps, curves, height=12, width=60):
    """A terminal chart: 't' marks train, 'v' marks val, one column per eval point (resampled)."""
    lo = min(min(v) for v in curves.values())
    hi = max(max(v) for v in curves.values())
    cols = min(width, len(steps))
    idx = [round(i * (len(steps) - 1) / max(1, cols - 1)) for i in range(cols)]
    grid = [[' '] * cols for _ in range(height)]
    for mark, v in (('t', curves['train_nelbo']), ('v', curves['val_nelbo'])):
        for c, i in enumerate(idx):
            r = round((hi - v[i]) / max(hi - lo, 1e-9) * (height - 1))
            grid[r][c] = '*' if grid[r][c] not in (' ', mark) else mark
    lines = [f'{hi - r * (hi - lo) / (height - 1):7.3f} |' + ''.join(row) for r, row in enumerate(grid)]
    lines.append(' ' * 8 + '+' + '-' * cols)
    lines.append(f'{"":8} step {steps[0]} .. {steps[-1]}   (t: train, v: val, *: both; nats/char)')
    return '\n'.join(lines)

def run_bench(args):
    """Training step speed, fused vs hand-written attention, and sampling speed per rule.
    Random tokens, no data needed: speed does not depend on what the text says."""
    device = pick_device(args.device)
    preset = resolve(args, device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    config = ModelConfig(vocab_size=66, block_size=args.block_size, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=0.0,   # the formula has no dropout
                         use_time=args.use_time, rope=args.rope)
    torch.manual_seed(args.seed)
    model = MDLM(config).to(device)
    optimizer = make_optimizer(model, 1e-4, 0.1, fused=device.startswith('cuda'))
    autocast, default_fused = fast_path(device, args.dtype)
    B, T = args.batch_size, config.block_size
    g = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.randint(65, (B, T), device=device, generator=g)
    print(f'bench: device {device} | preset {preset} | {model.num_params() / 1e6:.2f}M parameters | '
          f'batch {B} x block {T} | threads {torch.get_num_threads()}')
    def step(fused):
        model.set_fused_attention(fused)
        t, w = draw_t(B, g, device)
        xt, mask = forward_mask(x0, t, 65, g)
        train_step(model, optimizer, [(x0, xt, mask, t, w)], 1e-4, autocast=autocast)
    # the GPT twin: causal attention, no time, next-character loss, nothing to mask
    gpt = MDLM(ModelConfig(**{**asdict(config), 'use_time': False, 'causal': True})).to(device)
    gpt.set_fused_attention(default_fused)
    gpt_opt = make_optimizer(gpt, 1e-4, 0.1, fused=device.startswith('cuda'))
    def gpt_step():
        train_step(gpt, gpt_opt, [(x0, gpt_input(x0, 65), None, None, None)], 1e-4, autocast=autocast)
    variants = {'diffusion, fused sdpa': lambda: step(True), 'diffusion, manual attention': lambda: step(False),
                'a GPT of the same shape': gpt_step}
    # three rounds, the variants taking turns, best round of each: a noisy machine slows some
    # rounds, and taking turns keeps a slow spell from landing on one variant only
    n = max(3, args.max_iters if 'max_iters' in args.explicit else 10)
    best = {name: float('inf') for name in variants}
    for _ in range(3):
        for name, fn in variants.items():
            fn()
            sync()
            tic = time.time()
            for _ in range(n):
                fn()
            sync()
            best[name] = min(best[name], (time.time() - tic) / n)
    for name, dt in best.items():
        line = f'train ({name}): {dt * 1000:.1f} ms/step, {B * T / dt:,.0f} tok/s'
        if device.startswith('cuda'):    # MFU against an H100 SXM's dense bf16 peak (989 TFLOP/s), whatever the GPU
            flops = 6 * model.num_params() + 12 * config.n_layer * config.n_embd * T
            line += f', MFU {flops * B * T / dt / 989e12 * 100:.1f}% (of 989 TFLOP/s)'
        print(line)
    fused, manual, gpt_dt = best.values()
    print(f'fused attention speed-up: {manual / fused:.2f}x; diffusion step / GPT step '
          f'(training\'s {"fused" if default_fused else "manual"} attention): '
          f'{(fused if default_fused else manual) / gpt_dt:.2f}x')
    model.eval()
    gpt.eval()
    model.set_fused_attention(True)
    L, S = args.length or T, args.steps or SAMPLER_FALLBACKS['steps']
    samplers = {rule: (lambda rule=rule: generate_text(model, [], L, args.num_samples, S, rule, generator=g))
                for rule in RULES}
    samplers['gpt'] = lambda: gpt_generate(gpt, [], L, args.num_samples, generator=g)
    for name, fn in samplers.items():
        sync()
        tic = time.time()
        _, calls = fn()
        sync()
        dt = time.time() - tic
        what = f'{name} rule at {S} steps' if name in RULES else 'the GPT twin, one pass a character'
        print(f'sample ({what}): {args.num_samples} x {L} chars: '
              f'{args.num_samples * L / dt:,.0f} chars/s, {calls / (args.num_samples * L):.2f} model calls per char')
    return 0


# %% Harness: the command line ---------------------------------------------------------------------

def int_in(lo, hi=None):
    """An argparse type: an integer in [lo, hi] (no upper end when hi is None)."""
    def parse(s):
        v = int(s)
        if v < lo or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f'must be at least {lo}' + (f' and at most {hi}' if hi is not None else '')
                                             + f', got {v}')
        return v
    parse.__name__ = 'int'   # argparse names the type in its "invalid int value" message
    return parse

positive_int, nonneg_int, seed_int = int_in(1), int_in(0), int_in(0, 2 ** 63 - 1)

def positive_float(s):
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f'must be a finite number above 0, got {s}')
    return v

def nonneg_float(s):
    v = float(s)
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f'must be a finite number at least 0, got {s}')
    return v

def unit_float(s):
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f'must be in (0, 1], got {s}')
    return v

def probability(s):
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f'must be in [0, 1), got {s}')
    return v

SAMPLER_FLAGS = {'choice_temperature': 'confidence', 'threshold': 'threshold', 'remask': 'ancestral'}  # -> its rule
DIFFUSION_ONLY = ('use_time', 't_proposal', 'complementary', 'loss', 'steps', 'rule', 'show', 'semi_ar', 'best_of',
                  *SAMPLER_FLAGS)                                              # meaningless for a GPT

def refuse_diffusion_flags(args, causal):
    """A flag of the diffusion model's (DIFFUSION_ONLY) given for a GPT is refused with one line."""
    given = [flag(k) for k in DIFFUSION_ONLY if k in args.explicit]
    if causal and given:
        raise CliError(f'{given[0]} means nothing for a GPT (it has no noise level and writes left to right)')

def flag(name):
    return '--' + FLAG_NAMES.get(name, name).replace('_', '-')

def build_parser():
    class Help(argparse.ArgumentDefaultsHelpFormatter):   # show a default only where there is one
        def _get_help_string(self, action):
            return action.help if action.default in (None, False) else super()._get_help_string(action)
    p = argparse.ArgumentParser(description='A masked diffusion language model, in one file.', formatter_class=Help,
                                allow_abbrev=False)      # --top would otherwise be taken for --top-k
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument('--train', action='store_true', help='train (or --resume) a model (--gpt: the GPT twin)')
    mode.add_argument('--sample', action='store_true', help='generate text from pure noise')
    mode.add_argument('--complete', metavar='PROMPT', help='continue a prompt')
    mode.add_argument('--infill', metavar='TEXT', help='fill the blanks [___] of a text')
    mode.add_argument('--eval', action='store_true', help='the NELBO bound (a GPT: its exact NLL) on the val split')
    mode.add_argument('--score', metavar='FILE', help='bits/char of the text in FILE under the model')
    mode.add_argument('--show-noise', metavar='TEXT', help='print the forward process on TEXT')
    mode.add_argument('--plot', nargs='*', metavar='DIR', help='the training curves of each DIR/log.csv '
                      '(default: --out-dir) in <first DIR>/loss.png or --png FILE')
    mode.add_argument('--bench', action='store_true', help='measure training and sampling speed')
    mode.add_argument('--frontier', action='store_true', help='score sampler settings with --judge DIR (a GPT)')
    shape = p.add_argument_group('model (default: from --preset)')
    shape.add_argument('--preset', choices=['auto', 'base', 'tiny'], default='auto',
                   help='auto: base on cuda, tiny on cpu and mps')
    shape.add_argument('--n-layer', type=positive_int)
    shape.add_argument('--n-head', type=positive_int)
    shape.add_argument('--n-embd', type=positive_int)
    shape.add_argument('--block-size', type=positive_int)
    shape.add_argument('--dropout', type=probability)
    shape.add_argument('--time', dest='use_time', action=argparse.BooleanOptionalAction, default=None,
                   help='condition on t through adaLN (default: from the preset, off for tiny; --no-time: the model sees only the masks)')
    shape.add_argument('--rope', action=argparse.BooleanOptionalAction, default=None,
                   help='rotary positions (default: on; --no-rope: learned absolute positions)')
    shape.add_argument('--gpt', dest='causal', action='store_true', default=None,
                   help='with --train: the GPT twin (causal attention, next-character loss; into out-gpt/)')
    trainer = p.add_argument_group('training')
    trainer.add_argument('--batch-size', type=positive_int)
    trainer.add_argument('--max-iters', type=nonneg_int)
    trainer.add_argument('--eval-interval', type=positive_int)
    trainer.add_argument('--eval-iters', type=positive_int,
                         help=f'batches per NELBO estimate (--eval: default {EVAL_BATCHES})')
    trainer.add_argument('--infill-eval', action='store_true', default=None,
                   help='with --eval: fill 100 blanked val words of 1, 3 and 5 letters, count the hits')
    trainer.add_argument('--log-interval', type=positive_int)
    trainer.add_argument('--lr', type=positive_float)
    trainer.add_argument('--min-lr', type=nonneg_float)
    trainer.add_argument('--warmup-iters', type=nonneg_int)
    trainer.add_argument('--weight-decay', type=nonneg_float, help='AdamW, on matrices only (default 0.1)')
    trainer.add_argument('--grad-accum', type=positive_int, help='micro-batches per step (default 1)')
    trainer.add_argument('--schedule', choices=['cosine', 'wsd'], help='lr after warmup (default wsd: stable, then '
                   'linear decay over the last 20%%; cosine: cosine decay)')
    trainer.add_argument('--t-proposal', choices=T_PROPOSALS, help='the density training draws t from, '
                   'importance-weighted so the loss stays the NELBO (default cosine)')
    trainer.add_argument('--loss', choices=['nelbo', 'naive'], help='nelbo (default): the bound; naive: the first '
                   'recipe, masked CE pooled over the batch with uniform t (evals still report the NELBO)')
    trainer.add_argument('--complementary', action=argparse.BooleanOptionalAction, default=None,
                   help='each window twice, with complementary masks (default off)')
    trainer.add_argument('--resume', action='store_true', help='continue from <out-dir>/ckpt.pt')
    trainer.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model (default: on a CPU with native bf16, where it was measured faster)')
    sampler = p.add_argument_group('generation')
    sampler.add_argument('--steps', type=positive_int, help='denoising steps per block (default: 8 with the default '
                   'sampler, 64 once --rule or --semi-ar is given)')
    sampler.add_argument('--rule', choices=RULES, help='which proposals to commit (default: confidence in --semi-ar 8 '
                   'blocks, 8 steps each; see README)')
    sampler.add_argument('--temperature', type=nonneg_float, help='0: argmax (default 1; 0 for --infill when it '
                         'is asked for one fill)')
    sampler.add_argument('--top-k', type=positive_int)
    sampler.add_argument('--top-p', type=unit_float, help='nucleus: sample from the fewest tokens whose '
                   'probabilities sum to P (default 1: all)')
    sampler.add_argument('--choice-temperature', type=nonneg_float, metavar='TAU',
                   help='--rule confidence: Gumbel noise on the ranking, annealed to 0 (default 0)')
    sampler.add_argument('--threshold', type=probability, metavar='P',
                   help='--rule threshold: commit every proposal surer than P (default 0.9)')
    sampler.add_argument('--remask', type=probability, metavar='ETA',
                   help='--rule ancestral: ReMDM-cap remasking, at most ETA per step (default 0)')
    sampler.add_argument('--best-of', type=positive_int, metavar='N',
                   help='--infill: draw N fills, keep the one the model finds likeliest (default 1)')
    sampler.add_argument('--semi-ar', type=positive_int, metavar='N',
                   help='commit N characters at a time, left to right, --steps steps each (LLaDA)')
    sampler.add_argument('--num-samples', type=positive_int, default=1)
    sampler.add_argument('--length', type=positive_int, help='characters to generate (default: block_size)')
    sampler.add_argument('--show', action='store_true', default=None, help='watch the denoising, step by step')
    sampler.add_argument('--judge', metavar='DIR', help='score the samples with the GPT checkpoint in DIR')
    common = p.add_argument_group('common')
    common.add_argument('--data', default=DEFAULT_DATA, help='UTF-8 text (Tiny Shakespeare downloaded if absent)')
    common.add_argument('--out-dir', help='where the checkpoint lives (default out/; out-gpt/ for --train --gpt)')
    common.add_argument('--device', help='cuda, mps or cpu (default: the best available)')
    common.add_argument('--dtype', choices=['auto', 'float32', 'bfloat16'], default='auto')
    common.add_argument('--seed', type=seed_int, default=SEED)
    common.add_argument('--png', metavar='FILE', help='draw a picture into FILE: --show-noise, --plot, --eval (loss '
                        'per noise level), --frontier, and --sample/--complete/--infill with --show (frames)')
    return p

def resolve(args, device):
    """Fill the flags left unset from the preset."""
    preset = args.preset if args.preset != 'auto' else ('base' if device.split(':')[0] == 'cuda' else 'tiny')
    refuse_diffusion_flags(args, args.causal)
    values = {**DEFAULTS, **PRESETS[preset]}
    if args.loss == 'naive':             # the first recipe as taught: t uniform, unless --t-proposal says
        values['t_proposal'] = 'uniform'
    if args.causal:                      # the GPT twin: no time input
        values['use_time'] = False
    cpu_bf16 = device.split(':')[0] == 'cpu' and (args.dtype == 'bfloat16' or args.dtype == 'auto' and cpu_has_bf16())
    values['compile'] = cpu_bf16         # measured faster there (warm-up included); elsewhere not measured or slower
    if isinstance(values['max_iters'], tuple):   # (steps with native bf16 or a GPU, steps in float32 on a CPU)
        values['max_iters'] = values['max_iters'][device.split(':')[0] != 'cuda' and not cpu_bf16]   # mps: float32
    for k, v in values.items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise CliError(f'--n-embd {args.n_embd} must split into --n-head {args.n_head} heads of even size')
    return preset

def main(argv=None):
    for stream in (sys.stdout, sys.stderr):   # a terminal that cannot draw the mask glyph gets an escape
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.show_noise is not None:
            if not args.show_noise:
                raise CliError('give some text to show the forward process on')
            tok = Tokenizer.from_text(load_text(args.data, allow_download=args.data == DEFAULT_DATA))
            picture = show_noise(args.show_noise, tok, args.seed)
            print(picture)
            if args.png:
                text_picture(picture.split('\n'), args.png, 'the forward process: each character masked with probability t')
            return 0
        if args.plot is not None:
            return run_plot(args)
        args.explicit = {k for k, v in vars(args).items() if v is not None}
        if args.out_dir is None:
            args.out_dir = 'out-gpt' if args.train and args.causal else 'out'
        if args.causal and not args.train:
            raise CliError('--gpt is for --train; every other mode reads the kind from the checkpoint')
        if args.infill_eval and not args.eval:
            raise CliError('--infill-eval is for --eval')
        if args.png and (args.train or args.bench or args.score is not None or not (args.eval or args.frontier or args.show)):
            raise CliError('--png draws for --show-noise, --plot, --eval, --frontier, or a generation with --show')
        if args.train:
            train(args)
            return 0
        if args.bench:
            return run_bench(args)
        if args.eval:
            return run_eval(args)
        if args.score is not None:
            return run_score(args)
        if args.frontier:
            return run_frontier(args)
        return run_generation(args)
    except CliError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130

if __name__ == '__main__' and not NOTEBOOK:   # a notebook's kernel has arguments of its own
    sys.exit(main())
